"""Every SAE suite through the engine, on the session's model runner: ``feature_clamp``, a
feature condition and ``top_features`` equal the suite's own reference encoder
(tests/support/sae_references.py) on files with a non-zero ``b_dec`` and, where the suite has
one, a dataset-wise input normalization. The unit side is tests/unit/test_sae_encoders.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.sae_references import FEATURE, SUITES

from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import load_sae

D_MODEL, D_SAE = 256, 32
TOPK_SUITES = ["dictionary_learning AutoEncoderTopK", "Qwen-Scope"]  # one feature's activation needs all of them
ENGINE_SUITES = [name for name in SUITES if name not in TOPK_SUITES]

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
    from support.engines import start_engine

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
    from support.helpers import run

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

    from support.helpers import Generation
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
    from support.helpers import assert_same_tokens_close_logprobs

    prompts, _ = layer_streams
    sae = engine_suites[name]
    for case, target, only_active in (("clamp", CLAMP_TARGET, False), ("clamp where active", 0.0, True)):
        expected = clamp_oracle(hf_model, sae, prompts["short"], target, only_active, gen_len)
        assert_same_tokens_close_logprobs(suite_outputs[(name, case)], expected)


@pytest.mark.parametrize("name", ENGINE_SUITES)
def test_a_feature_condition_reads_the_suites_activation(suite_outputs, suite_engine, engine_suites, layer_streams,
                                                         hf_model, gen_len, name):
    from support.helpers import assert_same_tokens_close_logprobs, reference

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
    """The last token of each prompt (one capture request each; every ``over`` is
    tests/engine/test_discovery_engine.py's)."""
    from vllm_steer.discovery import finder

    sae = engine_suites[name]
    prompts = ["The Eiffel Tower in Paris", "Who are you?", "Give me three business ideas."]
    source = f"{sae.source}{'&' if '#' in sae.source else '#'}layer={sae.layer}"
    got = suite_engine.top_features(prompts, sae=source, k=5, over="last")
    plan = finder.plan(suite_engine.llm.get_tokenizer(), finder.FeatureQuery.parse({"prompts": prompts, "over": "last"}))
    rows = suite_engine.capture([{"prompt_token_ids": p} for p in plan.prefixes()], [sae.layer], use_tqdm=False)
    streams = plan.streams([row[sae.layer] for row in rows])
    for result, stream in zip(got, streams, strict=True):
        last = sae.activation(stream)[-1]
        expected = sorted((i for i in range(D_SAE) if last[i] > 0), key=lambda i: (-last[i], i))[:5]
        assert [f.feature for f in result.features] == expected
        np.testing.assert_allclose([f.activation for f in result.features], last[expected], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", TOPK_SUITES)
def test_topk_suites_refuse_a_clamp_naming_the_field(suite_engine, engine_suites, name):
    sae = engine_suites[name]
    load(suite_engine, sae)
    with pytest.raises(SteeringError) as info:
        suite_engine.frontend.resolve({"vectors": [{"feature": [sae.layer, FEATURE], "mode": "feature_clamp"}]})
    assert info.value.field == "steering.vectors[0].feature" and "cannot be computed per token" in info.value.reason
