"""The request path's hand-offs: the middleware's sealed spec, ``SteeredLLM``'s
``hf_overrides`` merge, and content freed from every process's registry."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_steer.engine.config import hf_overrides
from vllm_steer.engine.families import FAMILIES
from vllm_steer.engine.frontend import SteeringFrontend, SteeringRequestError, prepare_request
from vllm_steer.core.plan import ResolvedSteering

SPEC = {"vectors": [{"name": "v", "layers": [1], "scale": 2.0}]}

ARCHITECTURE = FAMILIES["LlamaForCausalLM"].steered



@pytest.fixture
def frontend() -> SteeringFrontend:
    config = SimpleNamespace(num_hidden_layers=4, hidden_size=8, architectures=[ARCHITECTURE], steering={})
    frontend = SteeringFrontend(config)
    frontend.registry.add("v", np.arange(8, dtype=np.float32))
    return frontend


def request(steering, cache_salt=None, prompt_len=3):
    return SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args={"steering": steering}), cache_salt=cache_salt, prompt_token_ids=list(range(prompt_len))
    )


def test_a_sealed_spec_is_decoded_not_resolved_again(frontend, monkeypatch):
    resolved = frontend.resolve(SPEC)
    sealed = frontend.seal(resolved)
    monkeypatch.setattr(frontend, "resolve", lambda spec: pytest.fail("resolved twice"))
    req = request(sealed)
    prepare_request(frontend, req)
    assert ResolvedSteering.from_wire(req.sampling_params.extra_args["steering"]) == resolved


@pytest.mark.parametrize("bound", ["count", "length"])
def test_a_seal_no_longer_kept_is_checked_and_decoded_again(frontend, monkeypatch, bound):
    specs = [{"vectors": [{"name": "v", "layers": [1], "scale": float(scale)}]} for scale in (1, 2, 3)]
    length = len(frontend.seal(frontend.resolve(specs[0])))  # the three are as long
    monkeypatch.setattr("vllm_steer.engine.frontend.SEALED_KEPT", 2 if bound == "count" else 100)
    monkeypatch.setattr("vllm_steer.engine.frontend.SEALED_KEPT_CHARS", 2.5 * length if bound == "length" else 2**30)
    sealed = [frontend.seal(frontend.resolve(spec)) for spec in specs]
    mac, checked = frontend._mac, []
    monkeypatch.setattr(frontend, "_mac", lambda wire: checked.append(wire) or mac(wire))
    for value, spec in zip(sealed, specs):
        req = request(value)
        prepare_request(frontend, req)
        assert ResolvedSteering.from_wire(req.sampling_params.extra_args["steering"]) == frontend.resolve(spec)
    # Only the oldest was checked: the two latest were kept as resolved.
    assert len(checked) == 1 and sealed[0].endswith(checked[0])


def test_a_forged_or_foreign_seal_is_refused(frontend):
    other = SteeringFrontend(SimpleNamespace(num_hidden_layers=4, hidden_size=8, architectures=[ARCHITECTURE], steering={}))
    other.registry.add("v", np.arange(8, dtype=np.float32))
    foreign = other.seal(other.resolve(SPEC))
    with pytest.raises(SteeringRequestError, match="sealed spec must come from this server's own front end"):
        prepare_request(frontend, request(foreign))
    tampered = frontend.seal(frontend.resolve(SPEC)).replace('"add"', '"clamp"')
    with pytest.raises(SteeringRequestError, match="sealed spec"):
        prepare_request(frontend, request(tampered))


def test_phase_limited_namespaces_follow_the_prompt_length(frontend):
    def salt(spec, prompt_len):
        req = request(spec, prompt_len=prompt_len)
        prepare_request(frontend, req)
        return req.cache_salt

    for phase in ("prompt", "generated"):
        phased = {**SPEC, "apply_to": phase}
        assert salt(phased, 10) == salt(phased, 10) != salt(phased, 11)
    assert salt(SPEC, 10) == salt(SPEC, 11)  # every position steered: one namespace


def test_hf_overrides_merge_key_by_key_and_refuse_conflicts():
    merged = hf_overrides(
        {"steering": {"sae": ["a.pt"], "capture": True}, "rope_theta": 5.0}, architecture=ARCHITECTURE, vector_files=("v.pt",), max_directions=2
    )
    assert merged == {
        "architectures": [ARCHITECTURE],
        "rope_theta": 5.0,
        "steering": {"vector_files": ("v.pt",), "max_directions": 2, "sae": ["a.pt"], "capture": True},
    }
    with pytest.raises(ValueError, match=r"hf_overrides\['steering'\]\['max_directions'\] = 3 conflicts with the max_directions argument"):
        hf_overrides({"steering": {"max_directions": 3}}, architecture=ARCHITECTURE, max_directions=2)
    with pytest.raises(ValueError, match="architectures"):
        hf_overrides({"architectures": ["LlamaForCausalLM"]}, architecture=ARCHITECTURE)
    with pytest.raises(ValueError, match="bogus"):
        hf_overrides({"steering": {"bogus": 1}}, architecture=ARCHITECTURE)


def test_steered_llm_keeps_every_steering_setting_given_in_hf_overrides(monkeypatch):
    """It used to merge shallowly: hf_overrides={"steering": {...}} dropped vectors/sae/capture."""
    seen = {}
    monkeypatch.setattr("vllm_steer.engine.offline.LLM", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr("vllm_steer.engine.offline.architecture_for", lambda *args: ARCHITECTURE)
    from vllm_steer import SteeredLLM

    SteeredLLM("model", vectors=["/abs/v.pt"], capture=True, hf_overrides={"steering": {"max_request_ops": 8, "sae": ["/abs/sae.pt"]}})
    assert seen["hf_overrides"]["steering"] == {
        "vector_files": ("/abs/v.pt",), "capture": True, "max_request_ops": 8, "sae": ["/abs/sae.pt"],
    }


def test_registering_and_deleting_many_vectors_keeps_every_registry_bounded(llm):
    """Deleted and replaced content is freed on the front end and on every worker (a bounded
    number stay retired for requests accepted before the change)."""
    from vllm_steer.core.registry import RETIRED_LIMIT

    before = llm.steering_stats()[0]["arrays"]["live"]
    generator = np.random.default_rng(3)
    for index in range(RETIRED_LIMIT + 40):
        name = f"churn-{index % 4}"
        llm.register_vector(name, generator.standard_normal(256).astype(np.float32), replace=True)
        if index % 3 == 0:
            llm.remove_vector(name)
    for name in {f"churn-{i}" for i in range(4)} & set(llm.frontend.registry.names()):
        llm.remove_vector(name)
    for sizes in [llm.frontend.registry.content_size()] + [stats["arrays"] for stats in llm.steering_stats()]:
        assert sizes["live"] <= before + 1 and sizes["retired"] <= RETIRED_LIMIT, sizes
    assert not any(name.startswith("churn-") for name in llm.frontend.registry.names())


def offline_llm(frontend):
    """A SteeredLLM over ``frontend`` without an engine (what _params needs of one)."""
    from vllm_steer import SteeredLLM

    llm = SteeredLLM.__new__(SteeredLLM)
    llm.llm = SimpleNamespace(llm_engine=SimpleNamespace(input_processor=SimpleNamespace(_vllm_steer=frontend)))
    return llm


def test_steered_llm_resolves_each_distinct_spec_once_and_hands_it_on_sealed(frontend, monkeypatch):
    from vllm import SamplingParams

    resolved = []
    resolve = frontend.resolve
    monkeypatch.setattr(frontend, "resolve", lambda spec: resolved.append(spec) or resolve(spec))
    other = {"vectors": [{"name": "v", "layers": [2], "scale": 1.0}]}
    zero = {**SPEC, "scale": 0.0}
    params = offline_llm(frontend)._params(SamplingParams(), 5, [SPEC, None, dict(SPEC), other, zero])
    assert len(resolved) == 3  # SPEC once for two requests, other, zero
    steering = [(p.extra_args or {}).get("steering") for p in params]
    assert steering[0] == steering[2] and steering[1] is None and steering[4] is None  # scale 0: unsteered
    monkeypatch.setattr(frontend, "resolve", lambda spec: pytest.fail("resolved again"))
    for sealed, spec in ((steering[0], SPEC), (steering[3], other)):
        req = request(sealed)
        prepare_request(frontend, req)
        assert ResolvedSteering.from_wire(req.sampling_params.extra_args["steering"]) == resolve(spec)
        assert req.cache_salt.startswith("vllm-steer:")


def test_a_bad_spec_fails_the_whole_batch_naming_its_request(frontend):
    from vllm import SamplingParams

    llm = offline_llm(frontend)
    bad = {"vectors": [{"name": "v", "layers": [9]}]}
    with pytest.raises(SteeringRequestError, match=r"^steering\[2\]\.vectors\[0\]\.layers\[0\]: layer 9 is out of range") as caught:
        llm._params(SamplingParams(), 3, [SPEC, None, bad])
    assert caught.value.field == "steering[2].vectors[0].layers[0]"
    # One spec for every request: its field is the spec's own.
    with pytest.raises(SteeringRequestError, match=r"^steering\.vectors\[0\]\.layers\[0\]: layer 9"):
        llm._params(SamplingParams(), 3, bad)
