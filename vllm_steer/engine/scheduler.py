"""Scheduler side of the row budget: a request whose steering rows do not fit the pool waits.

vLLM's scheduler asks ``_handle_blocked_waiting_request`` whether each waiting request may
start this step (the mechanism that keeps a request waiting for a LoRA slot). The mixin says
no while the request's rows not already held, added to the rows of the running requests,
would exceed the pool (rows.py). It counts rows by ``ResolvedSteering.row_keys``, as the
workers' pools do, over every layer (a pipeline rank holds fewer: counting all is
conservative), and workers release finished requests' rows before admitting new ones, so a
request let through always finds room. A request that needs more rows than the whole pool is
refused at the front end (resolve.py), so none waits forever. Unsteered requests never wait.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_steer.engine.config import SteeringConfig, text_config
from vllm_steer.engine.families import is_steered
from vllm_steer.core.plan import ResolvedSteering
from vllm_steer.core.rows import worst_case_rows

_ROWS = "_vllm_steer_rows"  # set on vLLM's Request: the row keys, decoded once


def request_rows(request: Any) -> frozenset:
    """The pool rows a request's steering needs (its row keys)."""
    rows = getattr(request, _ROWS, None)
    if rows is None:
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        wire = extra.get("steering")
        rows = ResolvedSteering.from_wire(wire).rows if wire else frozenset()
        setattr(request, _ROWS, rows)
    return rows


def row_capacity(vllm_config: Any, device_bytes: int) -> int | None:
    """Rows the workers' pools hold for requests (row 0 aside), or None when the budget never
    binds: the model is not steered, or every running request can steer every layer."""
    hf_config = vllm_config.model_config.hf_config
    if not is_steered(getattr(hf_config, "architectures", None)):
        return None
    settings = SteeringConfig.from_hf_config(hf_config)
    text = text_config(hf_config)
    rows = settings.table_rows(text.hidden_size, device_bytes)
    worst_case = worst_case_rows(vllm_config.scheduler_config.max_num_seqs,
                                 len(settings.steerable_layers(text.num_hidden_layers)), settings.max_directions)
    return None if rows is None or rows >= worst_case else rows - 1


class SteeringScheduler:
    """Mixed in before vLLM's scheduler class (``scheduler_class``)."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any):
        from vllm_steer.engine import seam

        super().__init__(vllm_config, *args, **kwargs)
        self.steering_rows = row_capacity(vllm_config, seam.device_memory())
        self._rows_in_use: set | None = None

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._rows_in_use = None  # counted again, on first need, from this step's running requests
        return super().schedule(*args, **kwargs)

    def _handle_blocked_waiting_request(self, request: Any) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        if self.steering_rows is None:
            return True
        needed = request_rows(request)
        if not needed:
            return True
        if self._rows_in_use is None:
            self._rows_in_use = set().union(*(request_rows(running) for running in self.running))
        new = needed - self._rows_in_use
        if len(self._rows_in_use) + len(new) > self.steering_rows:
            return False  # waits: rows free up as running requests finish
        # Counted from now on, even if the scheduler then skips the request for another
        # reason: at worst another request waits one step more.
        self._rows_in_use |= new
        return True


@functools.cache
def scheduler_class(base: type) -> type:
    """``base`` with the row budget (vLLM's Scheduler or AsyncScheduler, or a subclass)."""
    return type(f"Steering{base.__name__}", (SteeringScheduler, base), {"__module__": __name__})
