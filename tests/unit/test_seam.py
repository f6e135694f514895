"""Every vLLM name vllm-steer relies on (see vllm_steer/engine/seam.py) exists on the pinned
vLLM with the signature and attributes used. A vLLM upgrade that breaks one fails here,
naming it, instead of deep inside an engine step."""

from __future__ import annotations

import dataclasses
import inspect

import torch


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def assigned_in_init(cls, *names: str) -> None:
    """Attributes vLLM sets in ``__init__`` (instances are too costly to build here)."""
    source = inspect.getsource(cls.__init__)
    missing = [name for name in names if f"self.{name}" not in source]
    assert not missing, f"{cls.__name__}.__init__ no longer sets {missing}"


def fields(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)} | {
        name for name, value in vars(cls).items() if isinstance(value, property)
    }


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__.startswith("0.32.0"), "touchpoints.py is audited for vLLM 0.32.0; audit it for this version"


def test_front_end_touchpoints():
    from vllm import ModelRegistry
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_steer.engine.seam import _installed

    hook = InputProcessor.__dict__["assign_request_id"]
    # vLLM's own is a staticmethod taking the request; once wrapped, ours takes (self, request).
    assert parameters(hook.__func__ if isinstance(hook, staticmethod) else hook)[-1] == "request"
    assert isinstance(hook, staticmethod) or _installed(hook)
    assert parameters(ModelRegistry.register_model) == ["model_arch", "model_cls"]
    assert {"prompt_token_ids", "prompt_embeds", "sampling_params", "cache_salt"} <= set(EngineCoreRequest.__struct_fields__)
    assert {"parameter", "value"} <= set(parameters(VLLMValidationError.__init__))
    assigned_in_init(InputProcessor, "model_config")
    from vllm import LLM, SamplingParams
    from vllm.config import ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    # The offline LLM's and the server's engine client's front end, engine core and config.
    assigned_in_init(LLM, "llm_engine")
    assigned_in_init(LLMEngine, "input_processor", "engine_core", "vllm_config")
    assigned_in_init(AsyncLLM, "input_processor", "engine_core")
    # Every data-parallel engine's collective_rpc answer (collective_rpc_all), and the engine
    # core's utility it calls: (method, timeout, args, kwargs).
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import AsyncMPClient, DPLBAsyncMPClient

    assert parameters(AsyncMPClient.call_utility_all_async) == ["self", "method", "args"]
    assert issubclass(DPLBAsyncMPClient, AsyncMPClient)
    assert parameters(EngineCore.collective_rpc)[:5] == ["self", "method", "timeout", "args", "kwargs"]
    assert {"extra_args", "skip_reading_prefix_cache"} <= set(inspect.signature(SamplingParams).parameters) | set(
        getattr(SamplingParams, "__struct_fields__", ()))
    assert {"model_config", "scheduler_config", "parallel_config"} <= fields(VllmConfig)
    assert {"hf_config", "dtype"} <= fields(ModelConfig) | set(dir(ModelConfig))
    assert {"max_num_seqs", "max_num_batched_tokens"} <= fields(SchedulerConfig)
    assert "pipeline_parallel_size" in fields(ParallelConfig)


def test_engine_core_touchpoints():
    from vllm.config import SchedulerConfig
    from vllm.platforms import current_platform
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    from vllm_steer.engine.scheduler import row_budget
    from vllm_steer.engine.seam import SteeringScheduler, scheduler_class

    assert parameters(SchedulerConfig.get_scheduler_cls) == ["self"]
    assert parameters(Scheduler._handle_blocked_waiting_request) == ["self", "request"]
    assert parameters(Scheduler.__init__)[1] == "vllm_config"
    assert "self._handle_blocked_waiting_request(request)" in inspect.getsource(Scheduler.schedule)
    assigned_in_init(Scheduler, "running", "vllm_config")
    assigned_in_init(Request, "sampling_params")
    assert not hasattr(Request, "__slots__")  # the scheduler caches a request's rows on it (seam.attach)
    assert issubclass(AsyncScheduler, Scheduler)
    # The mixin's hooks come first in the method order of what vLLM builds.
    built = scheduler_class(AsyncScheduler, row_budget)
    assert built._handle_blocked_waiting_request is SteeringScheduler._handle_blocked_waiting_request
    assert built.schedule is SteeringScheduler.schedule
    assert current_platform.get_device_total_memory() > 0


def test_model_runner_v1_touchpoints():
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert parameters(GPUModelRunner._update_states) == ["self", "scheduler_output"]
    assert parameters(GPUModelRunner._model_forward)[:5] == ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds"]
    assert {"finished_req_ids", "preempted_req_ids"} <= fields(SchedulerOutput)
    assigned_in_init(GPUModelRunner, "requests", "input_batch", "query_start_loc")
    assert isinstance(vars(InputBatch)["req_ids"], property) and "num_reqs" in vars(InputBatch)
    assert {"sampling_params"} <= fields(CachedRequestState)
    assert "num_prompt_tokens" in inspect.getsource(CachedRequestState)


def test_model_runner_v2_touchpoints():
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.states import RequestState

    assert parameters(DefaultModelState.__init__) == ["self", "vllm_config", "model", "encoder_cache", "device"]
    assert parameters(DefaultModelState.add_request) == ["self", "req_index", "new_req_data"]
    assert parameters(DefaultModelState.remove_request) == ["self", "req_id"]
    assert parameters(DefaultModelState.prepare_inputs) == ["self", "input_batch", "req_states"]
    assert parameters(DefaultModelState.prepare_dummy_inputs) == ["self", "num_reqs", "num_tokens"]
    assert {"num_reqs", "num_tokens", "num_tokens_after_padding", "req_ids", "idx_mapping", "query_start_loc", "positions",
            "idx_mapping_np", "num_scheduled_tokens"} <= fields(InputBatch)
    assert {"req_id", "sampling_params", "prompt_len"} <= fields(NewRequestData)
    assigned_in_init(RequestState, "req_id_to_index")
    assert "max_num_reqs" in inspect.getsource(DefaultModelState)


def test_worker_and_model_touchpoints():
    import importlib

    from vllm.model_executor.models.utils import PPMissingLayer
    from vllm.v1.worker.worker_base import WorkerBase

    from vllm_steer.engine.families import FAMILIES
    from vllm_steer.engine.seam import is_missing_layer

    assert is_missing_layer(PPMissingLayer()) and not is_missing_layer(torch.nn.Linear(1, 1))
    from vllm.config import ParallelConfig

    assert isinstance(ParallelConfig.use_ubatching, property)
    for family in FAMILIES.values():
        module, name = family.vllm_class.split(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as error:  # gemma3_mm needs torchvision (see test_family_selection)
            assert error.name == "torchvision"
            continue
        # SteeredModel calls vLLM's constructor by keyword, as vLLM's own loader does.
        assert parameters(cls.__init__)[1:3] == ["vllm_config", "prefix"], family.architecture
        assert name == family.architecture
    from vllm_steer.engine import writers

    assert getattr(WorkerBase, "steering_rpc", None) in (None, writers.steering_rpc)
    from vllm.v1.worker.gpu import model_states

    # V2 asks the model for its state class by this name (our model class defines it).
    assert 'hasattr(model, "get_model_state_cls")' in inspect.getsource(model_states)


def test_server_touchpoints():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup  # noqa: F401
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: F401
    from vllm.v1.metrics.prometheus import get_prometheus_registry  # noqa: F401

    assert parameters(EndpointPlugin.attach_router) == ["self", "app"]
    assert parameters(EndpointPlugin.init_state) == ["self", "engine_client", "state", "args"]
    assert {"subparser_init", "validate", "cmd"} <= set(dir(ServeSubcommand))

    from vllm.v1.engine.async_llm import AsyncLLM

    # POST /v1/steering/features: capture requests through the served engine, tokenized by its tokenizer.
    assert parameters(AsyncLLM.generate)[:4] == ["self", "prompt", "sampling_params", "request_id"]
    assert parameters(AsyncLLM.get_tokenizer) == ["self"]


# vLLM's internals the seam reaches (its docstring lists them): no other module may.
INTERNAL_ATTRIBUTES = {
    "llm_engine", "engine_core", "input_processor", "model_config", "scheduler_config", "parallel_config",
    "_handle_blocked_waiting_request", "get_scheduler_cls", "assign_request_id", "skip_reading_prefix_cache",
    "cache_salt", "prompt_embeds", "num_tokens_after_padding", "idx_mapping", "idx_mapping_np", "query_start_loc",
    "num_scheduled_tokens", "req_id_to_index", "max_num_reqs", "num_prompt_tokens", "finished_req_ids",
    "preempted_req_ids", "use_ubatching",
}


def test_only_the_seam_reaches_vllm_internals():
    """A vLLM upgrade means reading seam.py: every other module imports only vLLM's public
    top-level names (``LLM``, ``SamplingParams``; the benchmarks also vLLM's own benchmark
    client) and touches none of the internal attributes the seam reads."""
    import ast

    from support.engines import REPO

    found = []
    for path in sorted([*(REPO / "vllm_steer").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]):
        if path.name == "seam.py":
            continue
        allowed = {"vllm"} | ({"vllm.benchmarks", "vllm.tokenizers"} if path.parent.name == "benchmarks" else set())
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for module in modules:
                if (module == "vllm" or module.startswith("vllm.")) and not any(
                        module == ok or module.startswith(ok + ".") and ok != "vllm" for ok in allowed):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {module}")
            if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRIBUTES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} reads .{node.attr}")
    assert not found, "vLLM internals outside seam.py:\n" + "\n".join(found)
