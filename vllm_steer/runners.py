"""The two per-step writers that tell the layers which slot each token reads.

- Model Runner V1 (vLLM's CPU runner, and GPUs with V1 forced): a wrap of
  ``GPUModelRunner._model_forward``, which runs every real step outside any captured graph.
  V1 moves rows between steps, so slots are looked up by request id.
- Model Runner V2 (the GPU default): ``SteeringModelState``, vLLM's per-model hook. Its
  request index is stable while a request lives, so admission writes the request's slot
  into ``slot_of_req_index`` once and each step is a gather on the device.

Neither may raise during a step: that would kill the engine. On any failure the step runs
unsteered and the error is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vllm_steer")


def _runtime_of(model: Any):
    return getattr(model, "steering", None)


# ---- Model Runner V1 -------------------------------------------------------------------
def write_v1(runtime, runner: Any, positions: torch.Tensor) -> None:
    """Admit requests new to the batch, release those gone, fill token_slot."""
    runtime.runner = "v1"
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    req_ids = batch.req_ids[:num_reqs]
    live = set(req_ids)
    for req_id in runtime.tracked():
        if req_id not in live:  # finished or preempted: a preempted one is re-admitted later
            runtime.release(req_id)
    slots = []
    for req_id in req_ids:
        slot = runtime.slot_of(req_id)
        if slot is None:
            state = runner.requests[req_id]
            slot = runtime.admit(req_id, state.sampling_params, state.num_prompt_tokens)
        slots.append(slot)
    tokens = np.diff(runner.query_start_loc.np[: num_reqs + 1])
    runtime.fill_token_slot(
        torch.tensor(slots, dtype=torch.int64, device=runtime.token_slot.device),
        torch.from_numpy(tokens.astype(np.int64)).to(runtime.token_slot.device),
        positions,
        int(tokens.sum()),
        positions.shape[-1],
    )


def install_v1_writer() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_vllm_steer", False):
        return

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        runtime = _runtime_of(self.get_model())
        if runtime is not None:
            try:
                write_v1(runtime, self, positions)
            except Exception:  # noqa: BLE001 - never kill the engine
                logger.exception("steering writer failed; this step runs unsteered")
                runtime.clear_step()
        return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)

    _model_forward._vllm_steer = True
    GPUModelRunner._model_forward = _model_forward


# ---- Model Runner V2 -------------------------------------------------------------------
_STATE_CLS = None


def steering_model_state_cls():
    global _STATE_CLS
    if _STATE_CLS is None:
        _STATE_CLS = _make_state_cls()
    return _STATE_CLS


class V2SlotWriter:
    """Model Runner V2's side of the slots, kept apart from vLLM's ModelState so its logic
    can be tested on constructed batches. V2 keeps a request at one ``req_index`` while it
    lives (a preempted request is removed and later added again as a new one)."""

    def __init__(self, runtime, max_num_reqs: int, device):
        self.runtime = runtime
        runtime.runner = "v2"
        self.slot_of_req_index = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        slot = self.runtime.admit(new_req_data.req_id, new_req_data.sampling_params, new_req_data.prompt_len)
        self.slot_of_req_index[req_index] = slot

    def remove_request(self, req_id: str) -> None:
        self.runtime.release(req_id)

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> None:
        num_reqs = input_batch.num_reqs
        num_padded = input_batch.num_tokens_after_padding
        try:
            if num_reqs and input_batch.req_ids[0] not in req_states.req_id_to_index:
                # A dummy batch (warmup, DP padding): its rows are not real requests.
                self.runtime.clear_step(num_padded)
                return
            start = input_batch.query_start_loc[: num_reqs + 1]
            self.runtime.fill_token_slot(
                self.slot_of_req_index[input_batch.idx_mapping[:num_reqs]],
                (start[1:] - start[:-1]).to(torch.int64),
                input_batch.positions,
                input_batch.num_tokens,
                num_padded,
            )
        except Exception:  # noqa: BLE001 - never kill the engine
            logger.exception("steering writer failed; this step runs unsteered")
            self.runtime.clear_step()

    def prepare_dummy_inputs(self, num_tokens: int) -> None:
        # Warmup and graph capture: every token reads the zero slot.
        self.runtime.clear_step(num_tokens)


def _make_state_cls():
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    class SteeringModelState(DefaultModelState):
        """vLLM's default model state plus the steering slot writer."""

        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.steering = V2SlotWriter(_runtime_of(model), self.max_num_reqs, device)

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


# ---- control plane -----------------------------------------------------------------------
def steering_rpc(worker: Any, op: str, *args: Any) -> Any:
    """Worker method reached with ``collective_rpc("steering_rpc", args=(op, ...))``."""
    runtime = _runtime_of(worker.get_model())
    if runtime is None:
        raise RuntimeError("this worker's model is not SteeredLlamaForCausalLM")
    return runtime.rpc(op, *args)


def install_worker_rpc() -> None:
    """Add ``steering_rpc`` to vLLM's worker base class, so registry changes reach every
    worker without a custom ``worker_extension_cls`` (plain ``vllm serve`` included)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, "steering_rpc"):
        WorkerBase.steering_rpc = steering_rpc
