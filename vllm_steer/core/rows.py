"""The steering rows: what a request's steering at one layer becomes on the device, kept in
one pool shared by every steerable layer and every request.

A row holds one layer's steering: the pre-summed add, up to ``max_directions`` directions
with the bounds their component is held to (clamp: ``[t, t]``, ablate: ``[0, 0]``, range:
``[min, max]``, open sides infinite; a feature_clamp reads an SAE feature's activation
instead: ``Direction``), and how many directions are used. Its content is named by
``ResolvedSteering.row_keys`` (the layer's ops, in order), so requests with the same steering
share rows, and so do layers steered identically. Row 0 is zeros: no steering. Memory
follows what is in use, within a budget (``steering.table_budget_mib``; default
``min(256 MiB, 1% of device memory)``); the scheduler (``scheduler.py``) keeps requests
waiting while their rows would not fit, counting rows with the same keys as the pool does.
Torch only (no vLLM import), like ``layer.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_steer.core.plan import Gate, ResolvedSteering, unit
from vllm_steer.core.staging import to_device

MAX_DEFAULT_BUDGET = 256 << 20  # bytes; the default budget is also at most 1% of the device

# ---- the row layout on the device, defined once (the layer math, the Triton kernel and the
# GPU check read it from here): ``add [R, H]``, ``dirs [K, R, entry_width(H)]`` and ``count
# [R]`` (int32). A direction's entry is its edit vector, its probe vector, then its params
# (``Direction.params`` says what each means), side by side: one gather reads it whole.
PARAM_NAMES = ("lo", "hi", "offset", "threshold", "floor")
PARAMS = len(PARAM_NAMES)


def entry_width(hidden: int) -> int:
    return 2 * hidden + PARAMS


def split_entry(entry: torch.Tensor, hidden: int) -> tuple[torch.Tensor, ...]:
    """A direction entry's views: edit ``[..., H]``, probe ``[..., H]``, then each param ``[..., 1]``."""
    edit, probe, params = entry.split([hidden, hidden, PARAMS], dim=-1)
    return (edit, probe, *params.split(1, dim=-1))


def row_bytes(hidden: int, max_directions: int) -> int:
    """One row: the add (float32 [H]), a direction entry per direction (float32), the count (int32)."""
    return 4 * (hidden + max_directions * entry_width(hidden) + 1)


def worst_case_rows(requests: int, layers: int, max_directions: int) -> int:
    """Rows (row 0 included) that ``requests`` requests can hold at most: a row per layer
    each, and one for a condition (read through a direction, so only when there are any)."""
    return 1 + requests * (layers + (1 if max_directions else 0))


def default_budget(device_bytes: int) -> int:
    return min(MAX_DEFAULT_BUDGET, device_bytes // 100)


def budget_rows(budget_bytes: int, hidden: int, max_directions: int) -> int:
    """Rows a budget holds, row 0 included; at least one row beyond row 0 or a clear error."""
    rows = budget_bytes // row_bytes(hidden, max_directions)
    if rows < 2:
        raise ValueError(
            f"steering.table_budget_mib = {budget_bytes / (1 << 20):.4g} holds no steering row: one row takes "
            f"{row_bytes(hidden, max_directions)} bytes at hidden size {hidden} and max_directions {max_directions}"
        )
    return rows


class PoolFull(RuntimeError):
    pass


@dataclass
class Direction:
    """One direction op of a row: the component ``s = <x, probe> + offset`` of the stream
    ``x`` (for an SAE feature, its pre-activation, and ``a = s if s > threshold else 0``; else
    ``a = s``) is held within ``[lo, hi]`` by moving ``x`` along ``edit``:
    ``x += (clip(a, lo, hi) - a) * edit``, at every token, or with ``only_active`` only where
    ``a > 0``. A clamp/ablate/range reads and moves along the same unit direction."""

    edit: torch.Tensor
    probe: torch.Tensor
    lo: float
    hi: float
    offset: float = 0.0
    threshold: float = 0.0
    feature: bool = False
    only_active: bool = False

    def params(self) -> list[float]:
        """The scalars after the vectors (``PARAM_NAMES``, in order): lo, hi, offset, the threshold ``a``
        must exceed to count (-inf: not a feature, ``a = s``) and the floor ``a`` must
        exceed for the token to change (0: only_active; -inf: every token). Flags as bounds
        keep the layer math to comparisons, no branches."""
        return [self.lo, self.hi, self.offset, self.threshold if self.feature else -math.inf,
                0.0 if self.only_active else -math.inf]



@dataclass
class LayerRow:
    """One row's content, on the host (float32)."""

    add: torch.Tensor  # [hidden]: every add of the layer, summed in op order
    directions: list[Direction] = field(default_factory=list)


def build_row(resolved: ResolvedSteering, layer: int, vectors: dict[str, np.ndarray], hidden: int) -> LayerRow:
    row = LayerRow(torch.zeros(hidden))
    for op in resolved.ops:
        if op.layer != layer:
            continue
        vector = torch.from_numpy(vectors[op.digest].copy())
        direction = unit(vector) if op.normalize else vector
        if op.mode == "add":
            row.add += op.coeff * direction
        elif op.mode == "feature_clamp":
            encoder, offset, threshold = op.probe
            probe = torch.from_numpy(vectors[encoder].copy())
            row.directions.append(Direction(direction, probe, op.coeff, op.coeff, offset, threshold, True, op.only_active))
        else:
            row.directions.append(Direction(direction, direction, *projection_bounds(op.mode, op.coeff, op.bounds)))
    return row


def build_gate_row(gate: Gate, vectors: dict[str, np.ndarray], hidden: int) -> LayerRow:
    """The row a gated request's prompt tokens read at the condition's layer: one direction
    that only reads (``a``, which the layer sums per request) and moves nothing (zero edit,
    unbounded)."""
    probe = torch.from_numpy(vectors[gate.digest].copy())
    direction = Direction(torch.zeros(hidden), unit(probe) if gate.normalize else probe, -math.inf, math.inf,
                          gate.offset, gate.feature_threshold or 0.0, gate.feature_threshold is not None)
    return LayerRow(torch.zeros(hidden), [direction])


def projection_bounds(mode: str, coeff: float, bounds: tuple[float | None, float | None] | None) -> tuple[float, float]:
    """The interval a direction op holds the stream's component to."""
    if mode == "range":
        lo, hi = bounds
        return (-math.inf if lo is None else lo, math.inf if hi is None else hi)
    target = coeff if mode == "clamp" else 0.0
    return target, target


def stack_rows(rows: list[LayerRow], max_directions: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """Rows as the pool's tables hold them, stacked, unused directions zero: (adds [N, H],
    directions [K, N, entry_width(H)], counts [N]), so one copy per table moves them all."""
    adds = torch.stack([row.add for row in rows])
    directions = torch.zeros(max_directions, len(rows), entry_width(hidden))
    counts = torch.tensor([len(row.directions) for row in rows], dtype=torch.int32)
    for k in range(max_directions):  # a few ops per direction index, not per row
        using = [(n, row.directions[k]) for n, row in enumerate(rows) if len(row.directions) > k]
        if not using:
            break
        index = torch.tensor([n for n, _ in using])
        directions[k, index] = torch.cat([torch.stack([direction.edit for _, direction in using]),
                                          torch.stack([direction.probe for _, direction in using]),
                                          torch.tensor([direction.params() for _, direction in using])], dim=1)
    return adds, directions, counts


class RowPool:
    """The device tables every steerable layer reads, indexed by row, in the layout above (a
    row's k-th direction is ``dirs[k, row]``). Rows are refcounted by content key; a
    row whose last user leaves is free again. New rows are written by ``flush``, before the
    step that reads them: requests admitted together cost one copy per table."""

    def __init__(self, rows: int, hidden: int, max_directions: int):
        self.hidden, self.max_directions = hidden, max_directions
        self.add = torch.zeros(rows, hidden, dtype=torch.float32)
        self.dirs = torch.zeros(max_directions, rows, entry_width(hidden), dtype=torch.float32)
        self.count = torch.zeros(rows, dtype=torch.int32)
        self.direction_index = torch.arange(max_directions).unsqueeze(-1)  # [K, 1]: compared with count
        self._free = list(range(rows - 1, 0, -1))
        self._row_of: dict[Hashable, int] = {}
        self._users: Counter[Hashable] = Counter()
        self._unwritten: dict[int, LayerRow] = {}  # row -> its content, until flush

    @property
    def capacity(self) -> int:
        return self.add.shape[0] - 1

    @property
    def in_use(self) -> int:
        return len(self._row_of)

    def held(self, key: Hashable) -> bool:
        return key in self._row_of

    def acquire(self, keys: Iterable[Hashable], contents: dict[Hashable, LayerRow]) -> dict[Hashable, int]:
        """The row of each key (one more user each), giving the keys not held yet new rows that
        will hold ``contents`` (which must cover those) from the next ``flush``. All or
        nothing: raises ``PoolFull`` before changing anything."""
        keys = set(keys)
        new = [key for key in keys if key not in self._row_of]
        missing = [key for key in new if key not in contents]
        if missing:
            raise KeyError(f"no content for the new steering rows {missing}")
        if len(new) > len(self._free):
            raise PoolFull(f"{len(new)} new steering rows needed, {len(self._free)} of {self.capacity} free (steering.table_budget_mib)")
        for key in new:
            row = self._free.pop()
            self._row_of[key] = row
            self._unwritten[row] = contents[key]  # a row freed and taken again keeps its newest content
        self._users.update(keys)
        return {key: self._row_of[key] for key in keys}

    def flush(self) -> None:
        """Write the rows acquired since the last flush, one copy per table."""
        if not self._unwritten:
            return
        device = self.add.device
        index = to_device(torch.tensor(list(self._unwritten), dtype=torch.int64), device)
        adds, directions, counts = stack_rows(list(self._unwritten.values()), self.max_directions, self.hidden)
        for table, values, dim in ((self.add, adds, 0), (self.dirs, directions, 1), (self.count, counts, 0)):
            table.index_copy_(dim, index, to_device(values, device))
        self._unwritten.clear()  # only once written: a failed step (run unsteered) tries again

    def release(self, keys: Iterable[Hashable]) -> None:
        """One user fewer for each key (the keys of one ``acquire``)."""
        for key in set(keys):
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                self._free.append(self._row_of.pop(key))
