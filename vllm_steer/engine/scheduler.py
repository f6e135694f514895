"""Scheduler side of the row budget: a request whose steering rows do not fit the pool waits.

vLLM's scheduler asks whether each waiting request may start this step (the mechanism that
keeps a request waiting for a LoRA slot); through the seam (``wrap_scheduler_cls``) it asks
``RowBudget`` too, which says no while the request's rows not already held, added to the
rows of the running requests, would exceed the pool (rows.py). It counts rows by ``ResolvedSteering.row_keys``, as the
workers' pools do, over every layer (a pipeline rank holds fewer: counting all is
conservative), and workers release finished requests' rows before admitting new ones, so a
request let through always finds room. A request that needs more rows than the whole pool is
refused at the front end (resolve.py), so none waits forever. Unsteered requests never wait.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm_steer.core.plan import ResolvedSteering
from vllm_steer.core.rows import worst_case_rows
from vllm_steer.engine import seam
from vllm_steer.engine.config import SteeringConfig, text_config
from vllm_steer.engine.families import is_steered


def request_rows(request: Any) -> frozenset:
    """The pool rows a request's steering needs (its row keys), decoded once per request."""
    rows = seam.attached(request)
    if rows is None:
        wire = (seam.request_extra_args(request) or {}).get("steering")
        rows = ResolvedSteering.from_wire(wire).rows if wire else frozenset()
        seam.attach(request, rows)
    return rows


def row_capacity(vllm_config: Any, device_bytes: int) -> int | None:
    """Rows the workers' pools hold for requests (row 0 aside), or None when the budget never
    binds: the model is not steered, or every running request can steer every layer."""
    hf_config = seam.model_hf_config(vllm_config)
    if not is_steered(getattr(hf_config, "architectures", None)):
        return None
    settings = SteeringConfig.from_hf_config(hf_config)
    text = text_config(hf_config)
    rows = settings.table_rows(text.hidden_size, device_bytes)
    max_num_seqs, _ = seam.scheduler_limits(vllm_config)
    worst_case = worst_case_rows(max_num_seqs, len(settings.steerable_layers(text.num_hidden_layers)), settings.max_directions)
    return None if rows is None or rows >= worst_case else rows - 1


class RowBudget:
    """The gate the engine core's scheduler consults (seam.wrap_scheduler_cls): a waiting
    steered request may start while the rows it needs, added to the running requests', fit."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows_in_use: set | None = None

    def new_step(self) -> None:
        self._rows_in_use = None  # counted again, on first need, from this step's running requests

    def may_start(self, request: Any, running: Iterable[Any]) -> bool:
        needed = request_rows(request)
        if not needed:
            return True
        if self._rows_in_use is None:
            self._rows_in_use = set().union(*(request_rows(other) for other in running))
        new = needed - self._rows_in_use
        if len(self._rows_in_use) + len(new) > self.capacity:
            return False  # waits: rows free up as running requests finish
        # Counted from now on, even if the scheduler then skips the request for another
        # reason: at worst another request waits one step more.
        self._rows_in_use |= new
        return True


def row_budget(vllm_config: Any) -> RowBudget | None:
    """The engine core's gate (None: the budget never binds)."""
    capacity = row_capacity(vllm_config, seam.device_memory())
    return None if capacity is None else RowBudget(capacity)
