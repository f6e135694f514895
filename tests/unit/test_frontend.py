"""The plugin and the front-end hook, without an engine: registration, salting, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_steer.engine.config import hf_overrides
from vllm_steer.engine.families import FAMILIES
from vllm_steer.engine.frontend import SteeringFrontend, SteeringRequestError, prepare_request, steering_salt
from vllm_steer.core.plan import ResolvedSteering
from vllm_steer.core.spec import SteeringError

ARCHITECTURE = FAMILIES["LlamaForCausalLM"].steered



def test_installing_the_package_registers_the_plugin():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("vllm_steer") == "vllm_steer.engine.plugin:register"


def test_register_is_idempotent_and_registers_the_architecture():
    from vllm import ModelRegistry
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_steer.engine.plugin import register

    register()
    hook = InputProcessor.__dict__["assign_request_id"]
    register()
    assert {family.steered for family in FAMILIES.values()} <= set(ModelRegistry.get_supported_archs())
    assert InputProcessor.__dict__["assign_request_id"] is hook


def test_importing_the_package_does_not_import_vllm():
    code = "import sys, vllm_steer, vllm_steer.core.spec; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_hf_overrides_select_the_architecture():
    assert hf_overrides(architecture=ARCHITECTURE) == {"architectures": [ARCHITECTURE]}
    assert hf_overrides(architecture=ARCHITECTURE, max_directions=2, vector_files=("a.pt",)) == {
        "architectures": [ARCHITECTURE],
        "steering": {"max_directions": 2, "vector_files": ("a.pt",)},
    }


@pytest.fixture
def frontend() -> SteeringFrontend:
    config = SimpleNamespace(num_hidden_layers=4, hidden_size=8, architectures=[ARCHITECTURE], steering={"max_directions": 2})
    frontend = SteeringFrontend(config)
    frontend.registry.add("v", np.arange(8, dtype=np.float32))
    return frontend


def request(steering=None, cache_salt=None, **extra):
    if steering is not None:
        extra["steering"] = steering
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra or None), cache_salt=cache_salt, prompt_token_ids=[1, 2, 3])


def test_steered_request_gets_resolved_spec_and_content_salt(frontend):
    req = request({"vectors": [{"name": "v", "layers": [1], "scale": 2.0}]}, other="kept")
    prepare_request(frontend, req)
    resolved = frontend.resolve({"vectors": [{"name": "v", "layers": [1], "scale": 2.0}]})
    assert req.cache_salt == steering_salt(resolved.fingerprint, None)
    assert ResolvedSteering.from_wire(req.sampling_params.extra_args["steering"]) == resolved
    assert req.sampling_params.extra_args["other"] == "kept"
    assert json.loads(req.sampling_params.extra_args["steering"])["ops"][0][2] == frontend.registry.digest_of("v")
    salted = request({"vectors": [{"name": "v", "layers": [1], "scale": 2.0}]}, cache_salt="tenant")
    prepare_request(frontend, salted)
    assert salted.cache_salt not in (None, "tenant", req.cache_salt)


def test_unsteered_and_no_op_requests_are_left_alone(frontend):
    plain = request(cache_salt="tenant", other=1)
    prepare_request(frontend, plain)
    assert plain.cache_salt == "tenant" and plain.sampling_params.extra_args == {"other": 1}
    zero = request({"vectors": [{"name": "v", "layers": [1]}], "scale": 0})
    prepare_request(frontend, zero)
    assert zero.cache_salt is None and zero.sampling_params.extra_args is None


def test_bad_spec_is_a_400_class_error_that_names_the_field(frontend):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(SteeringRequestError) as info:
        prepare_request(frontend, request({"vectors": [{"name": "w", "layers": [1]}]}))
    error = info.value
    assert isinstance(error, VLLMValidationError) and isinstance(error, SteeringError) and isinstance(error, ValueError)
    assert error.parameter == "steering.vectors[0].name"
    assert str(error) == "steering.vectors[0].name: unknown vector 'w'; loaded: v"


def test_steering_on_an_unsteered_architecture_says_how_to_enable_it():
    with pytest.raises(SteeringRequestError, match=r"needs a steered model: start the engine with vllm-steer serve or vllm_steer.SteeredLLM, or give vLLM hf_overrides"):
        prepare_request(None, request({"vectors": [{"name": "v", "layers": [1]}]}))


def test_a_client_salt_cannot_enter_a_steered_cache_namespace(frontend):
    """An unsteered request salted like a steered one would write KV blocks steered requests reuse."""
    resolved = frontend.resolve({"vectors": [{"name": "v", "layers": [1]}]})
    forged = request(cache_salt=steering_salt(resolved.fingerprint, None))
    with pytest.raises(SteeringRequestError, match="cache_salt: may not start with 'vllm-steer:'"):
        prepare_request(frontend, forged)
    with pytest.raises(SteeringRequestError, match="cache_salt"):
        prepare_request(None, request(cache_salt="vllm-steer:anything"))
