"""Worker side: admit a request into a slot, write its rows, and fill ``token_slot``.

A slot is a row index into every steerable layer's tables. Slot 0 is all zeros (no
steering); slots 1..max_num_seqs are handed to steered requests on admission and zeroed
on release. The rows are computed once per admission from the request's resolved spec, so
the per-step work is only "which slot does each token read", done with tensor ops.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_steer.capture import CaptureTables
from vllm_steer.control import WORKER_OPS
from vllm_steer.resolve import ModelShape, ResolvedSteering, unit
from vllm_steer.spec import CaptureSpec
from vllm_steer.staging import to_device
from vllm_steer.vectors.registry import VectorRegistry, vector_from_wire

logger = logging.getLogger("vllm_steer")

NEVER = torch.iinfo(torch.int64).max
# Histogram bounds for "distinct steering configs among the admitted requests, per step".
STEP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class LayerRows:
    add: torch.Tensor  # [hidden]: every add of this layer, pre-summed
    directions: list[tuple[torch.Tensor, float]]  # (unit direction, target), in order


def build_rows(resolved: ResolvedSteering, vectors: dict[str, np.ndarray], hidden: int) -> dict[int, LayerRows]:
    """Per layer: the summed add row and the ordered clamp/ablate directions (float32)."""
    rows: dict[int, LayerRows] = defaultdict(lambda: LayerRows(torch.zeros(hidden), []))
    for op in resolved.ops:
        vector = torch.from_numpy(vectors[op.digest].copy())
        direction = unit(vector) if op.normalize else vector
        layer = rows[op.layer]
        if op.mode == "add":
            layer.add += op.coeff * direction
        else:
            layer.directions.append((direction, op.coeff if op.mode == "clamp" else 0.0))
    return dict(rows)


def stack_rows(layers: list[LayerRows], max_directions: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each layer's full slot rows, stacked, unused directions zero: (adds [L, H],
    directions [L, K, H], targets [L, K, 1]), so one copy per table kind moves them all."""
    adds = torch.stack([layer.add for layer in layers])
    directions = torch.zeros(len(layers), max_directions, hidden)
    targets = torch.zeros(len(layers), max_directions, 1)
    for n, layer in enumerate(layers):
        for k, (direction, target) in enumerate(layer.directions):
            directions[n, k] = direction
            targets[n, k] = target
    return adds, directions, targets


def phase_bounds(apply_to: str, prompt_len: int) -> tuple[int, int]:
    """Positions [lo, hi) a slot steers: prompt tokens, generated tokens, or all."""
    return {"all": (0, NEVER), "prompt": (0, prompt_len), "generated": (prompt_len, NEVER)}[apply_to]


class SteeringRuntime:
    """Owns the slot tables of one model replica (one worker)."""

    def __init__(
        self,
        shape: ModelShape,
        registry: VectorRegistry,
        layers: dict[int, Any],
        num_slots: int,
        max_tokens: int,
        capture: bool = False,
        kernel: str = "torch",
    ):
        self.shape = shape
        self.registry = registry
        self.layers = layers
        self.num_slots = num_slots
        # Shared by every steerable layer: which slot each token of the flattened batch reads.
        self.token_slot = torch.zeros(max_tokens, dtype=torch.int64)
        self.phase_lo = torch.zeros(num_slots, dtype=torch.int64)
        self.phase_hi = torch.full((num_slots,), NEVER, dtype=torch.int64)
        for layer in layers.values():
            layer.attach_steering(self.token_slot, num_slots, shape.max_directions, shape.hidden_size, kernel)
        self.capture = CaptureTables(layers, num_slots, max_tokens, shape.hidden_size) if capture else None
        self._free = list(range(num_slots - 1, 0, -1))
        self._slot_of: dict[str, int] = {}
        self._layers_of: dict[int, tuple[int, ...]] = {}
        self.runner: str | None = None  # which model runner drives the writes ("v1"/"v2")
        # Requests that asked for steering or capture and run without it (see admit).
        self.unapplied = 0
        # Observability: the steering config (fingerprint) of each slot, and per-step counts.
        self._config_of: dict[int, str] = {}
        self._live_configs: Counter[str] = Counter()
        self._step_counts = [0] * (len(STEP_BUCKETS) + 1)
        self._step_sum = 0

    # ---- admission -------------------------------------------------------------------
    def admit(self, req_id: str, sampling_params: Any, prompt_len: int) -> int:
        """Give ``req_id`` a slot holding its steering (and capture); 0 when it has neither.
        Never raises: an exception here would kill the engine. A request whose steering
        cannot be applied (no slot free, its vector no longer held) runs without it,
        logged and counted in ``unapplied``."""
        self.release(req_id)
        extra = getattr(sampling_params, "extra_args", None) or {}
        slot = 0
        if "steering" in extra or "steering_capture" in extra:
            try:
                slot = self._admit(extra, prompt_len)
            except Exception as exc:  # noqa: BLE001 - see docstring
                self.unapplied += 1
                logger.warning("request %s runs unsteered: its steering could not be applied: %s", req_id, exc)
        self._slot_of[req_id] = slot
        return slot

    def _admit(self, extra: dict, prompt_len: int) -> int:
        # The front end resolved and checked both: here they are only decoded.
        resolved = ResolvedSteering.from_wire(extra["steering"]) if "steering" in extra else None
        capture = CaptureSpec.model_validate_json(extra["steering_capture"]) if "steering_capture" in extra else None
        if capture is not None and self.capture is None:
            raise ValueError("capture is off on this engine (hf_overrides steering.capture)")
        rows = build_rows(resolved, resolved.arrays(self.registry), self.shape.hidden_size) if resolved else {}
        if not self._free:
            raise RuntimeError(f"all {self.num_slots - 1} steering slots are in use")
        slot = self._free.pop()
        try:
            self._fill(slot, rows, resolved, capture, prompt_len)
        except BaseException:
            self._clear(slot)
            self._free.append(slot)
            raise
        return slot

    def _fill(self, slot: int, rows: dict[int, LayerRows], resolved: ResolvedSteering | None, capture: CaptureSpec | None, prompt_len: int) -> None:
        local = tuple(layer for layer in rows if layer in self.layers)
        self._layers_of[slot] = local
        if local:
            # Staged once, copied without blocking, then scattered on the device.
            stacked = stack_rows([rows[index] for index in local], self.shape.max_directions, self.shape.hidden_size)
            adds, directions, targets = (to_device(t, self.token_slot.device) for t in stacked)
            for n, index in enumerate(local):
                table = self.layers[index]
                table.steer_add[slot].copy_(adds[n])
                table.steer_dirs[:, slot].copy_(directions[n])
                table.steer_target[:, slot].copy_(targets[n])
        lo, hi = phase_bounds(resolved.apply_to if resolved else "all", prompt_len)
        self.phase_lo[slot] = lo
        self.phase_hi[slot] = hi
        if capture is not None:
            self.capture.start(slot, capture, prompt_len)
        if resolved is not None:
            self._config_of[slot] = resolved.fingerprint
            self._live_configs[resolved.fingerprint] += 1

    def release(self, req_id: str) -> None:
        slot = self._slot_of.pop(req_id, 0)
        if slot == 0:
            return
        try:
            if self.capture is not None:
                self.capture.finish(slot)
        finally:
            self._clear(slot)
            self._free.append(slot)

    def _clear(self, slot: int) -> None:
        """Zero a slot's rows and forget its bookkeeping."""
        config = self._config_of.pop(slot, None)
        if config is not None:
            self._live_configs[config] -= 1
            if not self._live_configs[config]:
                del self._live_configs[config]
        for index in self._layers_of.pop(slot, ()):
            table = self.layers[index]
            table.steer_add[slot] = 0
            table.steer_dirs[:, slot] = 0
            table.steer_target[:, slot] = 0

    def slot_of(self, req_id: str) -> int | None:
        return self._slot_of.get(req_id)

    def tracked(self) -> list[str]:
        return list(self._slot_of)

    @property
    def slots_in_use(self) -> int:
        return self.num_slots - 1 - len(self._free)

    # ---- per step ----------------------------------------------------------------------
    def fill_token_slot(
        self,
        slot_per_request: torch.Tensor,
        tokens_per_request: torch.Tensor,
        positions: torch.Tensor,
        num_tokens: int,
        num_padded: int,
    ) -> None:
        """token_slot[:num_tokens] = each token's request slot, 0 outside the slot's phase;
        the padded tail reads slot 0."""
        distinct = len(self._live_configs)
        self._step_counts[bisect_left(STEP_BUCKETS, distinct)] += 1
        self._step_sum += distinct
        if self.slots_in_use == 0:
            # Nothing steered: one cheap fill keeps every token (and padding) on slot 0.
            self.clear_step(num_padded)
            return
        slots = torch.repeat_interleave(slot_per_request, tokens_per_request, output_size=num_tokens)
        pos = positions[:num_tokens]
        inside = (pos >= self.phase_lo[slots]) & (pos < self.phase_hi[slots])
        self.token_slot[:num_tokens] = torch.where(inside, slots, torch.zeros_like(slots))
        self.token_slot[num_tokens:num_padded] = 0
        if self.capture is not None:
            self.capture.fill(slots, pos, num_tokens, num_padded)

    def clear_step(self, num_tokens: int | None = None) -> None:
        """Every token reads slot 0 and nothing is captured (dummy runs, writer failures)."""
        self.token_slot[:num_tokens].zero_()
        if self.capture is not None:
            self.capture.clear(num_tokens)

    # ---- control plane (control.py's WORKER_OPS, over collective_rpc) ---------------------
    def rpc(self, op: str, *args: Any) -> Any:
        if op not in WORKER_OPS:
            raise ValueError(f"unknown steering operation {op!r}; known: {', '.join(WORKER_OPS)}")
        return getattr(self, op)(*args)

    def add_vector(self, name: str, raw: Any, source: str) -> str:
        return self.registry.add(name, vector_from_wire(raw), replace=True, source=source)

    def remove_vector(self, name: str) -> None:
        if name in self.registry:
            self.registry.remove(name)

    def collect_captures(self, keys: list[str]) -> dict:
        return self.capture.collect(keys) if self.capture is not None else {}

    def stats(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "slots_in_use": self.slots_in_use,
            "vectors": len(self.registry),
            "arrays": self.registry.content_size(),
            "unapplied_requests": self.unapplied,
            "step_distinct_configs": {"counts": list(self._step_counts), "sum": self._step_sum},
        }
