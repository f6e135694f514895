"""The two per-step writers that tell the layers which slot each token reads.

- Model Runner V1 (vLLM's CPU runner, and GPUs with V1 forced): before V1 updates its batch,
  the slots of finished and preempted requests are released; before each forward, requests
  new to the runtime are admitted and ``token_slot`` is filled. V1 moves rows between steps
  (and drops running requests that are merely not scheduled this step), so slots are kept
  by request id, not by row.
- Model Runner V2 (the GPU default): ``SteeringModelState``, vLLM's per-model hook. Its
  request index is stable while a request lives, so admission writes the request's slot
  into ``slot_of_req_index`` once and each step is a gather on the device.

Neither may raise into the engine: that would kill it. On any failure the step runs
unsteered and the error is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from vllm_steer.core.staging import to_device
from vllm_steer.engine import seam
from vllm_steer.engine.rpc import RPC_METHOD

logger = logging.getLogger("vllm_steer")


def runtime_of(model: Any):
    """The SteeringRuntime of a model (None when the model is not steerable)."""
    return getattr(model, "steering", None)


# ---- Model Runner V1 -------------------------------------------------------------------
def release_v1(runtime, scheduler_output: Any) -> None:
    try:
        for req_id in seam.v1_leaving(scheduler_output):
            runtime.release(req_id)
    except Exception:  # noqa: BLE001 - never kill the engine
        logger.exception("steering: releasing finished requests failed")


def write_v1(runtime, runner: Any, positions: torch.Tensor) -> None:
    """Admit requests new to the runtime and fill token_slot (never raises)."""
    try:
        runtime.runner = "v1"
        req_ids, tokens = seam.v1_batch(runner)
        slots = []
        for req_id in req_ids:
            slot = runtime.slot_of(req_id)
            if slot is None:
                slot = runtime.admit(req_id, *seam.v1_request(runner, req_id))
            slots.append(slot)
        device = runtime.token_slot.device
        runtime.fill_token_slot(
            to_device(torch.from_numpy(np.array(slots, dtype=np.int64)), device),  # numpy: a third of torch.tensor's time
            to_device(torch.from_numpy(tokens.astype("int64")), device),
            positions,
            int(tokens.sum()),
            positions.shape[-1],
            scheduled=(slots, tokens),
        )
    except Exception:  # noqa: BLE001 - never kill the engine
        logger.exception("steering writer failed; this step runs unsteered")
        runtime.clear_step()


# ---- Model Runner V2 -------------------------------------------------------------------
class V2SlotWriter:
    """Model Runner V2's side of the slots, kept apart from vLLM's ModelState so its logic
    can be tested on constructed batches. V2 keeps a request at one ``req_index`` while it
    lives (a preempted request is removed and later added again as a new one)."""

    def __init__(self, runtime, max_num_reqs: int, device):
        self.runtime = runtime
        runtime.runner = "v2"
        self.slot_of_req_index = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        self.host_slot_of_req_index = np.zeros(max_num_reqs, dtype=np.int64)  # the same, on the host

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        slot = 0
        try:
            slot = self.runtime.admit(*seam.v2_new_request(new_req_data))
        except Exception:  # noqa: BLE001 - never kill the engine
            logger.exception("steering: admitting a request failed; it runs unsteered")
        self.slot_of_req_index[req_index] = slot
        self.host_slot_of_req_index[req_index] = slot

    def remove_request(self, req_id: str) -> None:
        try:
            self.runtime.release(req_id)
        except Exception:  # noqa: BLE001 - never kill the engine
            logger.exception("steering: releasing request %s failed", req_id)

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> None:
        try:
            if seam.v2_is_dummy(input_batch, req_states):
                self.runtime.clear_step(seam.v2_padded_tokens(input_batch))
                return
            req_index, tokens, positions, num_tokens, num_padded = seam.v2_step(input_batch)
            host_req_index, host_tokens = seam.v2_scheduled(input_batch)
            self.runtime.fill_token_slot(self.slot_of_req_index[req_index], tokens.to(torch.int64), positions, num_tokens, num_padded,
                                         scheduled=(self.host_slot_of_req_index[host_req_index], host_tokens))
        except Exception:  # noqa: BLE001 - never kill the engine
            logger.exception("steering writer failed; this step runs unsteered")
            self.runtime.clear_step()

    def prepare_dummy_inputs(self, num_tokens: int) -> None:
        # Warmup and graph capture: every token reads the zero slot.
        self.runtime.clear_step(num_tokens)


def v2_writer(model: Any, max_num_reqs: int, device) -> V2SlotWriter:
    return V2SlotWriter(runtime_of(model), max_num_reqs, device)


def steering_model_state_cls() -> type:
    """vLLM's default V2 model state with the steering slot writer (seam.py builds it)."""
    return seam.steering_model_state_cls(v2_writer)


# ---- control plane -----------------------------------------------------------------------
def steering_rpc(worker: Any, op: str, *args: Any) -> Any:
    """Worker method reached with ``collective_rpc("steering_rpc", args=(op, ...))``."""
    runtime = runtime_of(worker.get_model())
    if runtime is None:
        raise RuntimeError("this worker's model is not steerable")
    return runtime.rpc(op, *args)


def install_worker_hooks() -> None:
    seam.wrap_v1_runner(runtime_of, release_v1, write_v1)
    seam.add_worker_method(RPC_METHOD, steering_rpc)
