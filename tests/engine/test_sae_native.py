"""SAE-native steering, ``feature_clamp``: the SAE's activation of a feature becomes ``t``,
``h <- h + (t - a(h)) d``, with ``a(h) = act(<e, h - b_dec> + b)`` (ReLU, JumpReLU, or a
BatchTopK SAE's inference threshold; ``b_dec`` subtracted where the suite's reference does:
dictionary_learning, not Gemma Scope), at every token or, with ``only_active``, only where
the feature fires. tests/test_sae_encoders.py checks every suite's encoder. Checked against a transformers forward hook written here from that formula
and the SAE's raw arrays (not from the plugin's reference code), on small synthetic SAEs of
each encoder kind, in one mixed batch on the session's model runner."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from support.engines import CACHE, start_engine
from support.helpers import Generation, assert_same_tokens_close_logprobs, reference, run
from vllm_steer.lab.reference import ReferenceSteerer, edit_layer_outputs

HIDDEN, FEATURES, FEATURE = 256, 16, 3


@dataclass
class Sae:
    kind: str  # "relu", "jumprelu" or "topk" (BatchTopK's threshold)
    layer: int
    source: str  # what the engine loads
    encoder: np.ndarray  # [d_sae, d_model]: row f is feature f's encoder
    b_enc: np.ndarray
    decoder: np.ndarray  # [d_sae, d_model]: row f is feature f's decoder direction
    b_dec: np.ndarray
    threshold: np.ndarray  # [d_sae]
    subtracts_b_dec: bool  # dictionary_learning reads h - b_dec; Gemma Scope's JumpReLUSAE reads h

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """The feature's activation on each token, from the formula."""
        e = torch.from_numpy(self.encoder[FEATURE]).double()
        read = h.double() - torch.from_numpy(self.b_dec).double() if self.subtracts_b_dec else h.double()
        pre = read @ e + float(self.b_enc[FEATURE])
        return torch.where(pre > float(self.threshold[FEATURE]), pre, torch.zeros_like(pre))


def make_sae(kind: str, layer: int, streams: torch.Tensor, folder) -> Sae:
    """A random SAE whose feature FEATURE fires on about half of ``streams`` (the model's own
    stream at ``layer``), written in the layout of a suite that has this encoder kind."""
    rng = np.random.default_rng(layer)
    encoder = (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    b_dec = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    norm = float(streams.norm(dim=-1).mean())
    decoder = (rng.standard_normal((FEATURES, HIDDEN)) * norm / (2 * np.sqrt(HIDDEN))).astype(np.float32)
    subtracts = kind != "jumprelu"
    pre = (streams.double().numpy() - (b_dec if subtracts else 0.0)) @ encoder[FEATURE].astype(np.float64)
    b_enc = (0.05 * rng.standard_normal(FEATURES)).astype(np.float32)
    threshold = np.zeros(FEATURES, np.float32) if kind == "relu" else np.abs(0.2 * rng.standard_normal(FEATURES)).astype(np.float32)
    if kind == "topk":
        threshold[:] = 0.15  # BatchTopK keeps one number
    # About half the tokens over the threshold, none near it (float32 and float64 must agree).
    ordered = np.sort(pre)
    middle = len(ordered) // 2
    b_enc[FEATURE] = np.float32(threshold[FEATURE] - (ordered[middle - 1] + ordered[middle]) / 2)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jumprelu":  # Gemma Scope: W_enc [d_model, d_sae], W_dec [d_sae, d_model]
        path = folder / f"layer_{layer}" / "width_16" / "params.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, W_enc=encoder.T.copy(), W_dec=decoder, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    else:  # dictionary_learning: encoder.weight [d_sae, d_model], decoder.weight [d_model, d_sae]
        path = folder / f"resid_post_layer_{layer}" / kind / "ae.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"encoder.weight": torch.from_numpy(encoder), "encoder.bias": torch.from_numpy(b_enc),
                 "decoder.weight": torch.from_numpy(decoder.T.copy()), "b_dec": torch.from_numpy(b_dec)}
        if kind == "topk":
            state |= {"threshold": torch.tensor(0.15), "k": torch.tensor(4)}
        torch.save(state, path)
    return Sae(kind, layer, str(path), encoder, b_enc, decoder, b_dec, threshold, subtracts)


@pytest.fixture(scope="module")
def saes(hf_model, prompt_ids) -> dict[str, Sae]:
    with torch.no_grad():
        states = hf_model(torch.tensor([prompt_ids[1]]), output_hidden_states=True).hidden_states
    folder = CACHE / "test-saes"
    # Layers 0-2: hidden_states[4] is after the final norm, not layer 3's output.
    return {kind: make_sae(kind, layer, states[layer + 1][0], folder / kind) for kind, layer in (("relu", 0), ("jumprelu", 1), ("topk", 2))}


@pytest.fixture(scope="module")
def sae_engine(tiny_model, feature_file, saes, runner):
    """The session's tiny Llama with the three SAEs loaded (in-process and eager: starts in
    seconds), for this module only. 32 tokens per step: long prompts take several steps."""
    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                       sae=[sae.source for sae in saes.values()], enforce_eager=True, max_num_batched_tokens=32)
    yield llm
    llm.shutdown()


class HookSteerer(ReferenceSteerer):
    """Greedy decoding with one hand-written edit of a layer's output, at every token."""

    def __init__(self, model, layer: int, edit):
        super().__init__(model, {})
        self.layer, self.edit = layer, edit

    @contextmanager
    def hooks(self, steering, prompt_len):
        with edit_layer_outputs(self.model, {self.layer: lambda h, positions: self.edit(h)}):
            yield


def oracle(hf_model, sae: Sae, prompt: list[int], target: float, only_active: bool, gen_len: int) -> Generation:
    decoder = torch.from_numpy(sae.decoder[FEATURE])

    def edit(h):
        active = sae.activation(h).unsqueeze(-1)
        moved = h + ((target - active) * decoder.double()).to(h.dtype)
        return torch.where(active > 0, moved, h) if only_active else moved

    output = HookSteerer(hf_model, sae.layer, edit).generate(prompt, None, gen_len)
    return Generation(output.token_ids, output.logprobs)


CASES = {
    "relu, set to 6": ("relu", 6.0, False),
    "jumprelu, off where it fires": ("jumprelu", 0.0, True),
    "jumprelu, set to 4 where it fires": ("jumprelu", 4.0, True),
    "topk threshold, set to 8": ("topk", 8.0, False),
}


@pytest.fixture(scope="module")
def batch(sae_engine, prompt_ids, gen_len):
    """Every case and an unsteered request in one batch."""
    specs = [None] + [
        {"vectors": [{"feature": [{"relu": 0, "jumprelu": 1, "topk": 2}[kind], FEATURE], "mode": "feature_clamp",
                      "scale": target, "only_active": only_active}]}
        for kind, target, only_active in CASES.values()
    ]
    return dict(zip(["unsteered", *CASES], run(sae_engine, [prompt_ids[1]] * len(specs), specs, gen_len)))


@pytest.mark.parametrize("case", list(CASES))
def test_feature_clamp_equals_the_formula(batch, saes, hf_model, prompt_ids, gen_len, case):
    kind, target, only_active = CASES[case]
    expected = oracle(hf_model, saes[kind], prompt_ids[1], target, only_active, gen_len)
    assert_same_tokens_close_logprobs(batch[case], expected)
    assert batch[case].token_ids != batch["unsteered"].token_ids or only_active  # the clamp changes the text


def test_only_active_leaves_tokens_where_the_feature_is_silent(saes, hf_model, prompt_ids):
    """The synthetic feature fires on some prompt tokens and not others, so only_active matters."""
    with torch.no_grad():
        states = hf_model(torch.tensor([prompt_ids[1]]), output_hidden_states=True).hidden_states
    active = saes["jumprelu"].activation(states[saes["jumprelu"].layer + 1][0])
    assert 0 < int((active > 0).sum()) < len(active)


def test_feature_clamp_errors_name_the_field(sae_engine):
    from vllm_steer.core.spec import SteeringError

    with pytest.raises(SteeringError) as info:  # layer 3 has the notebook's feature vectors, no SAE
        sae_engine.frontend.resolve({"vectors": [{"feature": [3, 5], "mode": "feature_clamp"}]})
    assert info.value.field == "steering.vectors[0].feature" and "no SAE is loaded for layer 3" in str(info.value)
    with pytest.raises(SteeringError, match="out of range"):
        sae_engine.frontend.resolve({"vectors": [{"feature": [1, FEATURES], "mode": "feature_clamp"}]})


# ---- conditions (CAST) -------------------------------------------------------------------
def prompt_streams(hf_model, prompt: list[int], layer: int) -> torch.Tensor:
    """The unsteered stream after ``layer`` at every prompt token."""
    with torch.no_grad():
        return hf_model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[layer + 1][0]


@pytest.fixture(scope="module")
def gated(sae_engine, saes, hf_model, prompt_ids, gen_len):
    """Four gated requests and an unsteered one in one batch. The conditions' thresholds sit
    halfway between two prompts' means, computed here from the formula: a vector's mean
    projection at layer 2 (above), and the JumpReLU feature's mean activation (below), on a
    short prompt and on a long one that takes several chunked-prefill steps."""
    short, long = prompt_ids[1], (prompt_ids[2] + prompt_ids[0]) * 3
    assert len(long) > 64
    generator = torch.Generator().manual_seed(5)
    probe = torch.randn(HIDDEN, generator=generator).double()
    unit_probe = probe / probe.norm()
    steer = (torch.randn(HIDDEN, generator=generator) * 0.5).tolist()

    def projection(prompt):
        return float((prompt_streams(hf_model, prompt, 2).double() @ unit_probe).mean())

    def activation(prompt):
        return float(saes["jumprelu"].activation(prompt_streams(hf_model, prompt, 1)).mean())

    conditions = {
        "vector": ({"vector": probe.tolist(), "layer": 2, "compare": "above"}, projection),
        "feature": ({"feature": [1, FEATURE], "compare": "below"}, activation),
    }
    cases, specs, prompts = {}, [None], [short]
    for kind, (condition, measure) in conditions.items():
        means = {"short": measure(short), "long": measure(long)}
        threshold = (means["short"] + means["long"]) / 2
        assert abs(means["short"] - means["long"]) > 1e-3  # no rounding can flip the outcome
        for name, prompt in (("short", short), ("long", long)):
            holds = means[name] > threshold if condition["compare"] == "above" else means[name] < threshold
            cases[f"{kind}, {name}"] = (prompt, holds)
            prompts.append(prompt)
            specs.append({"vectors": [{"vector": steer, "layers": [0, 2], "scale": 6.0}],
                          "condition": {**condition, "threshold": threshold}})
    outputs = run(sae_engine, prompts, specs, gen_len)
    steered_spec = {"vectors": [{"vector": steer, "layers": [0, 2], "scale": 6.0}], "apply_to": "generated"}
    return {name: (output, prompt, holds, steered_spec) for (name, (prompt, holds)), output in zip(cases.items(), outputs[1:])}


@pytest.mark.parametrize("case", ["vector, short", "vector, long", "feature, short", "feature, long"])
def test_a_condition_steers_only_the_prompts_that_match(gated, sae_engine, hf_model, gen_len, case):
    output, prompt, holds, steered_spec = gated[case]
    expected = reference(hf_model, sae_engine, prompt, steered_spec if holds else None, gen_len)
    assert_same_tokens_close_logprobs(output, expected)
    unsteered = reference(hf_model, sae_engine, prompt, None, gen_len)
    assert (output.token_ids != unsteered.token_ids) == holds  # the steering changes the text


def test_each_condition_holds_for_one_prompt_of_the_batch(gated):
    outcomes = {name: holds for name, (_, _, holds, _) in gated.items()}
    assert outcomes["vector, short"] != outcomes["vector, long"]
    assert outcomes["feature, short"] != outcomes["feature, long"]


def test_condition_errors_name_the_field(sae_engine):
    from vllm_steer.core.spec import SteeringError

    steer = {"vectors": [{"name": sae_engine.frontend.registry.names()[0], "layers": [1]}]}
    with pytest.raises(SteeringError) as info:  # layer 3 has feature vectors, but no SAE: no encoder
        sae_engine.frontend.resolve({**steer, "condition": {"feature": [3, 5], "threshold": 0.0}})
    assert info.value.field == "steering.condition.feature" and "no SAE is loaded for layer 3" in info.value.reason
    with pytest.raises(SteeringError) as info:
        sae_engine.frontend.resolve({**steer, "condition": {"vector": [1.0] * HIDDEN, "layer": 9, "threshold": 0.0}})
    assert info.value.field == "steering.condition.layer" and "out of range" in info.value.reason


def test_the_sweep_sweeps_a_feature_clamp_target(sae_engine, gen_len):
    """``vllm-steer sweep --sae-feature``: each scale is the activation the feature is set to."""
    from vllm_steer.lab import sweep

    steering = sweep.Steering(sae_features=[[1, FEATURE]])
    result = sweep.run_sweep(sae_engine, ["Who are you?", "The Eiffel Tower in Paris"], steering, scales=[0.0, 8.0],
                             modes=["feature_clamp"], max_tokens=gen_len, capability_pairs=None)
    assert [(row.mode, row.scale) for row in result.rows] == [("feature_clamp", 0.0), ("feature_clamp", 8.0)]
    by_scale = {scale: [o.text for o in result.outputs if o.mode == "feature_clamp" and o.scale == scale] for scale in (0.0, 8.0)}
    unsteered = [o.text for o in result.outputs if o.mode is None]
    assert by_scale[8.0] != unsteered and by_scale[8.0] != by_scale[0.0]
