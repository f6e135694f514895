"""Every SAE suite encodes exactly as its own reference does (tests/sae_references.py, each
suite's encoder written from its reference code): the per-feature encoder that
``feature_clamp`` and conditions read, the whole encoder that finds features, and the decoder
direction a feature steers along, each on a file with a non-zero ``b_dec`` (and a dataset-wise
input normalization where the suite has one). Each check also shows that reading the suite
the other way round (subtracting ``b_dec`` or not) would fail it.

The unit tests need no engine; the engine tests run ``feature_clamp``, a feature condition and
``top_features`` of every suite through the session's model runner against the same
references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_references import FEATURE, SUITES, TOP_K

from vllm_steer.discovery import top_features_of_streams
from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import load_sae

D_MODEL, D_SAE = 256, 32
THRESHOLD_SUITES = [name for name in SUITES if "TopK" not in name and name != "Qwen-Scope"]
TOPK_SUITES = ["dictionary_learning AutoEncoderTopK", "Qwen-Scope"]


def random_streams(seed: int = 0, tokens: int = 40) -> np.ndarray:
    """Streams shaped like a residual stream: a shared offset, then noise."""
    rng = np.random.default_rng(seed)
    return (2.0 + rng.standard_normal((tokens, D_MODEL)) * 3.0).astype(np.float32)


def engine_activation(encoder, streams: np.ndarray) -> np.ndarray:
    """``act(<row, h> + offset)`` as the steering layer computes it (FeatureEncoder)."""
    pre = streams.astype(np.float64) @ encoder.row.astype(np.float64) + encoder.offset
    return np.where(pre > encoder.threshold, pre, 0.0)


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("suites")
    calibration = random_streams(1)
    return {name: make(root, calibration, 2, D_SAE) for name, make in SUITES.items()}


@pytest.mark.parametrize("name", THRESHOLD_SUITES)
def test_a_features_encoder_is_the_references(suites, name):
    sae = suites[name]
    streams = random_streams(2)
    expected = sae.activation(streams)[:, FEATURE]
    got = engine_activation(load_sae(sae.source).encoder(FEATURE), streams)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert 0 < (expected > 0).sum() < len(expected)  # fires on some tokens, not all
    # Read the other way round (b_dec subtracted or not), tokens' activations move by ~1.5x their spread.
    assert np.abs(sae.other_b_dec(streams)[:, FEATURE] - expected).max() > 0.5


@pytest.mark.parametrize("name", list(SUITES))
@pytest.mark.parametrize("over", ["last", "mean", "token"])
def test_top_features_are_the_references(suites, name, over):
    sae = suites[name]
    streams = [random_streams(3, 5), random_streams(4, 9)]

    def ranked(activations):
        rows = {"last": activations[-1:], "mean": activations.mean(0, keepdims=True), "token": activations}[over]
        return [sorted((i for i in range(D_SAE) if row[i] > 0), key=lambda i: (-row[i], i))[:5] for row in rows]

    got = top_features_of_streams(streams, load_sae(sae.source), 5, over, features_per_chunk=7)
    got_features = [[f.feature for f in group] for result in got
                    for group in ([t.features for t in result.tokens] if over == "token" else [result.features])]
    expected = [group for s in streams for group in ranked(sae.activation(s))]
    assert got_features == expected
    values = [f.activation for result in got
              for group in ([t.features for t in result.tokens] if over == "token" else [result.features]) for f in group]
    reference = [v for s in streams for group_values in _values(sae.activation(s), ranked, over) for v in group_values]
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-4)
    assert expected != [group for s in streams for group in ranked(sae.other_b_dec(s))]


def _values(activations, ranked, over):
    rows = {"last": activations[-1:], "mean": activations.mean(0, keepdims=True), "token": activations}[over]
    return [[row[i] for i in group] for row, group in zip(rows, ranked(activations))]


@pytest.mark.parametrize("name", list(SUITES))
def test_a_features_direction_is_in_the_streams_units(suites, name):
    """The decoder column or row, divided by the input scale where the suite folds one in."""
    sae = suites[name]
    got = load_sae(sae.source).feature(FEATURE)
    np.testing.assert_allclose(got, sae.direction(FEATURE), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", TOPK_SUITES)
def test_topk_suites_cannot_clamp_one_feature(suites, name):
    with pytest.raises(ValueError, match=rf"TopK, k={TOP_K}\) cannot be computed per token"):
        load_sae(suites[name].source).encoder(FEATURE)


def test_subtract_b_dec_overrides_the_suite(suites):
    sae = suites["Gemma Scope"]
    streams = random_streams(5)
    forced = load_sae(f"{sae.source}#subtract_b_dec=1").encoder(FEATURE)
    np.testing.assert_allclose(engine_activation(forced, streams), sae.other_b_dec(streams)[:, FEATURE], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="subtract_b_dec must be 0 or 1, got 2"):
        load_sae(f"{sae.source}#subtract_b_dec=2")


def test_saelens_normalizations_are_honoured_or_refused_by_name(tmp_path, suites):
    import json
    import shutil
    from pathlib import Path

    scaled = suites["SAELens expected_average_only_in"].source.split("#")[0]
    with pytest.raises(ValueError, match=r"normalize_activations 'expected_average_only_in'.*#norm_scaling_factor=S"):
        load_sae(scaled).encoder(FEATURE)
    with pytest.raises(ValueError, match="norm_scaling_factor must be a positive number, got '-1'"):
        load_sae(f"{scaled}#norm_scaling_factor=-1")
    plain = suites["SAELens standard"].source
    with pytest.raises(ValueError, match="norm_scaling_factor is given but cfg.json says normalize_activations 'none'"):
        load_sae(f"{plain}#norm_scaling_factor=2")
    with pytest.raises(ValueError, match="norm_scaling_factor applies to SAELens SAEs"):
        load_sae(f"{suites['Gemma Scope'].source}#norm_scaling_factor=2")
    for normalize in ("constant_norm_rescale", "layer_norm", "covariance_whitening"):
        folder = tmp_path / normalize / Path(plain).name
        shutil.copytree(plain, folder)
        config = json.loads((folder / "cfg.json").read_text()) | {"normalize_activations": normalize}
        (folder / "cfg.json").write_text(json.dumps(config))
        sae = load_sae(str(folder))
        with pytest.raises(ValueError, match=rf"normalize_activations '{normalize}': the encoder normalizes each token"):
            sae.encoder(FEATURE)
        with pytest.raises(ValueError, match=rf"normalize_activations '{normalize}'"):
            sae.encoding  # noqa: B018 - finding features refuses it too
        assert sae.feature(FEATURE).shape == (D_MODEL,)  # its directions still steer


def test_llama_scope_token_wise_normalization_is_refused(suites, tmp_path):
    import json
    import shutil
    from pathlib import Path

    folder = Path(suites["Llama Scope"].source).parent.parent
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "hyperparams.json").read_text()) | {"norm_activation": "token-wise"}
    (copy / "hyperparams.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="norm_activation 'token-wise': the encoder rescales each token by its own norm"):
        load_sae(str(copy)).encoder(FEATURE)


def test_replacing_a_layers_sae_forgets_what_was_read_from_the_old_one(suites):
    from vllm_steer.core.registry import VectorRegistry

    registry = VectorRegistry()
    first, second = (load_sae(suites[name].source) for name in ("Gemma Scope", "Goodfire"))
    registry.add_feature_source(first)
    old = registry.sae_feature(2, FEATURE)
    registry.add_feature_source(second)
    new = registry.sae_feature(2, FEATURE)
    assert registry.array(new[0]).tobytes() == second.feature(FEATURE).tobytes() and new[:2] != old[:2]


# ---- through the engine ------------------------------------------------------------------------
ENGINE_SUITES = THRESHOLD_SUITES
LAYERS = 4  # the tiny model's: four suites a batch, one on each layer


@pytest.fixture(scope="module")
def layer_streams(hf_model, prompt_ids):
    """Each layer's output stream (what a hook on model.layers[L] sees) on two prompts."""
    from vllm_steer.lab.reference import edit_layer_outputs

    prompts = {"short": prompt_ids[1], "long": prompt_ids[2] + prompt_ids[0]}
    seen = {}
    for name, ids in prompts.items():
        recorded = {}

        def record(layer):
            def edit(h, positions):
                recorded[layer] = h[0].double().numpy()
                return h
            return edit

        with edit_layer_outputs(hf_model, {layer: record(layer) for layer in range(LAYERS)}), torch.no_grad():
            hf_model(torch.tensor([ids]))
        seen[name] = recorded
    return prompts, seen


@pytest.fixture(scope="module")
def engine_suites(tmp_path_factory, layer_streams):
    """The suites, each calibrated on the stream of the layer it is loaded at."""
    root = tmp_path_factory.mktemp("engine-suites")
    _, seen = layer_streams
    placed = {}
    for index, name in enumerate(ENGINE_SUITES + TOPK_SUITES):
        layer = index % LAYERS
        sae = SUITES[name](root / str(index), seen["short"][layer], layer, D_SAE)
        placed[name] = sae
    return placed


@pytest.fixture(scope="module")
def suite_engine(tiny_model, feature_file, runner):
    """In-process and eager (starts in seconds), capture on; SAEs are put on layers per batch."""
    from conftest import start_engine

    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, enforce_eager=True,
                       capture=True)
    yield llm
    llm.shutdown()


def load(llm, sae) -> None:
    """Serve features of ``sae.layer`` from this suite's file (replacing the layer's last one)."""
    llm.frontend.registry.add_feature_source(load_sae(f"{sae.source}{'&' if '#' in sae.source else '#'}layer={sae.layer}"))


CLAMP_TARGET = 6.0


def condition_threshold(sae, layer_streams) -> tuple[float, dict[str, bool]]:
    """Halfway between the two prompts' mean activations of FEATURE (the reference's), and
    which prompt it holds for ("below")."""
    prompts, seen = layer_streams
    means = {name: float(sae.activation(seen[name][sae.layer])[:, FEATURE].mean()) for name in prompts}
    assert abs(means["short"] - means["long"]) > 1e-2
    threshold = (means["short"] + means["long"]) / 2
    return threshold, {name: mean < threshold for name, mean in means.items()}


@pytest.fixture(scope="module")
def suite_outputs(suite_engine, engine_suites, layer_streams, gen_len):
    """For every suite: a feature_clamp at every token, one where the feature fires, and a
    condition on the feature gating a steer, on both prompts: four suites per batch."""
    from helpers import run

    prompts, _ = layer_streams
    outputs = {}
    names = ENGINE_SUITES
    for first in range(0, len(names), LAYERS):
        batch = names[first : first + LAYERS]
        requests = []
        for name in batch:
            sae = engine_suites[name]
            load(suite_engine, sae)
            feature = [sae.layer, FEATURE]
            threshold, _ = condition_threshold(sae, layer_streams)
            steer = {"vectors": [{"vector": steer_vector(sae.layer), "layers": [sae.layer], "scale": 6.0}]}
            gated = {**steer, "condition": {"feature": feature, "threshold": threshold, "compare": "below"}}
            requests += [
                (name, "clamp", prompts["short"], {"vectors": [{"feature": feature, "mode": "feature_clamp", "scale": CLAMP_TARGET}]}),
                (name, "clamp where active", prompts["short"],
                 {"vectors": [{"feature": feature, "mode": "feature_clamp", "scale": 0.0, "only_active": True}]}),
                (name, "condition short", prompts["short"], gated),
                (name, "condition long", prompts["long"], gated),
            ]
        got = run(suite_engine, [r[2] for r in requests], [r[3] for r in requests], gen_len)
        outputs.update({(name, case): output for (name, case, _, _), output in zip(requests, got)})
    return outputs


def steer_vector(layer: int) -> list[float]:
    return (torch.randn(D_MODEL, generator=torch.Generator().manual_seed(layer)) * 0.5).tolist()


def clamp_oracle(hf_model, sae, prompt, target: float, only_active: bool, gen_len):
    """Greedy decoding with the reference's feature_clamp at the SAE's layer, every token."""
    from contextlib import contextmanager

    from helpers import Generation
    from vllm_steer.lab.reference import ReferenceSteerer, edit_layer_outputs

    direction = torch.from_numpy(sae.direction(FEATURE))

    def edit(h, positions):
        active = torch.from_numpy(sae.activation(h[0].double().numpy())[:, FEATURE]).unsqueeze(-1)
        moved = h[0].double() + (target - active) * direction.double()
        return torch.where(active > 0, moved, h[0].double()).unsqueeze(0).to(h.dtype) if only_active else moved.unsqueeze(0).to(h.dtype)

    class Hook(ReferenceSteerer):
        @contextmanager
        def hooks(self, steering, prompt_len):
            with edit_layer_outputs(self.model, {sae.layer: edit}):
                yield

    output = Hook(hf_model, {}).generate(prompt, None, gen_len)
    return Generation(output.token_ids, output.logprobs)


@pytest.mark.parametrize("name", ENGINE_SUITES)
def test_feature_clamp_equals_the_suites_reference(suite_outputs, engine_suites, layer_streams, hf_model, gen_len, name):
    from helpers import assert_same_tokens_close_logprobs

    prompts, _ = layer_streams
    sae = engine_suites[name]
    for case, target, only_active in (("clamp", CLAMP_TARGET, False), ("clamp where active", 0.0, True)):
        expected = clamp_oracle(hf_model, sae, prompts["short"], target, only_active, gen_len)
        assert_same_tokens_close_logprobs(suite_outputs[(name, case)], expected)


@pytest.mark.parametrize("name", ENGINE_SUITES)
def test_a_feature_condition_reads_the_suites_activation(suite_outputs, suite_engine, engine_suites, layer_streams,
                                                         hf_model, gen_len, name):
    from helpers import assert_same_tokens_close_logprobs, reference

    prompts, seen = layer_streams
    sae = engine_suites[name]
    _, holds = condition_threshold(sae, layer_streams)
    assert holds["short"] != holds["long"]
    # The other reading of b_dec would judge at least one prompt the other way: the outcomes test it.
    other = {p: float(sae.other_b_dec(seen[p][sae.layer])[:, FEATURE].mean()) for p in prompts}
    threshold, _ = condition_threshold(sae, layer_streams)
    assert {p: other[p] < threshold for p in prompts} != holds
    steered = {"vectors": [{"vector": steer_vector(sae.layer), "layers": [sae.layer], "scale": 6.0}], "apply_to": "generated"}
    for prompt in ("short", "long"):
        expected = reference(hf_model, suite_engine, prompts[prompt], steered if holds[prompt] else None, gen_len)
        assert_same_tokens_close_logprobs(suite_outputs[(name, f"condition {prompt}")], expected)


@pytest.mark.parametrize("name", ENGINE_SUITES + TOPK_SUITES)
def test_top_features_through_the_engine_are_the_suites(suite_engine, engine_suites, name):
    from vllm_steer.discovery import finder

    sae = engine_suites[name]
    prompts = ["The Eiffel Tower in Paris", "Who are you?"]
    source = f"{sae.source}{'&' if '#' in sae.source else '#'}layer={sae.layer}"
    got = suite_engine.top_features(prompts, sae=source, k=5, over="mean")
    plan = finder.plan(suite_engine.llm.get_tokenizer(), finder.FeatureQuery.parse({"prompts": prompts, "over": "mean"}))
    rows = suite_engine.capture([{"prompt_token_ids": p} for p in plan.prefixes()], [sae.layer], use_tqdm=False)
    streams = plan.streams([row[sae.layer] for row in rows])
    for result, stream in zip(got, streams, strict=True):
        mean = sae.activation(stream).mean(0)
        expected = sorted((i for i in range(D_SAE) if mean[i] > 0), key=lambda i: (-mean[i], i))[:5]
        assert [f.feature for f in result.features] == expected
        np.testing.assert_allclose([f.activation for f in result.features], mean[expected], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", TOPK_SUITES)
def test_topk_suites_refuse_a_clamp_naming_the_field(suite_engine, engine_suites, name):
    sae = engine_suites[name]
    load(suite_engine, sae)
    with pytest.raises(SteeringError) as info:
        suite_engine.frontend.resolve({"vectors": [{"feature": [sae.layer, FEATURE], "mode": "feature_clamp"}]})
    assert info.value.field == "steering.vectors[0].feature" and "cannot be computed per token" in info.value.reason
