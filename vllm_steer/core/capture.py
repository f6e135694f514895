"""Worker side of activation capture: record a request's residual stream at chosen layers.

Like steering, capture is branch-free tensor math over persistent buffers: each steerable
layer owns ``capture_sum[slot]`` (float32) and every step adds ``stream * weight`` of each
token into its request's row, where the step writer sets ``weight`` to 1 for the last
prompt token ("last") or 1/prompt_len for every prompt token ("mean"), and 0 elsewhere.
Chunked prefill simply accumulates. When the request leaves, its rows are kept under the
request's ``key`` until the client collects them. Buffers exist only when the engine is
started with capture on (``hf_overrides`` steering.capture): the extra math costs one
``index_add`` per layer per step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from vllm_steer.core.spec import CaptureSpec
from vllm_steer.core.staging import HostCopy

logger = logging.getLogger("vllm_steer")

MAX_UNCOLLECTED = 4096  # results kept for clients that have not collected them yet


class CaptureTables:
    def __init__(self, layers: dict[int, Any], num_slots: int, max_tokens: int, hidden: int):
        self.layers = layers
        self.token_slot = torch.zeros(max_tokens, dtype=torch.int64)
        self.token_weight = torch.zeros(max_tokens, dtype=torch.float32)
        self.lo = torch.zeros(num_slots, dtype=torch.int64)
        self.hi = torch.zeros(num_slots, dtype=torch.int64)
        self.scale = torch.zeros(num_slots, dtype=torch.float32)
        for layer in layers.values():
            layer.attach_capture(self.token_slot, self.token_weight, num_slots, hidden)
        self._spec_of: dict[int, CaptureSpec] = {}
        self._results: OrderedDict[str, dict[int, HostCopy]] = OrderedDict()

    def start(self, slot: int, spec: CaptureSpec, prompt_len: int) -> None:
        self._results.pop(spec.key, None)  # a resumed request starts over
        for layer in self.layers.values():  # whatever a failed release left behind
            layer.capture_sum[slot] = 0
        lo = prompt_len - 1 if spec.reduce == "last" else 0
        self.lo[slot], self.hi[slot] = lo, prompt_len
        self.scale[slot] = 1.0 / (prompt_len - lo)
        self._spec_of[slot] = spec

    def finish(self, slot: int) -> None:
        """Keep the slot's rows under its key (copied to the host without waiting for the
        device: this runs in the step path), then clear the slot."""
        spec = self._spec_of.pop(slot, None)
        if spec is None:
            return
        self._results[spec.key] = self._read(slot, spec)
        while len(self._results) > MAX_UNCOLLECTED:
            key, _ = self._results.popitem(last=False)
            logger.warning("capture %s was never collected; dropped", key)
        for layer in self.layers.values():
            layer.capture_sum[slot] = 0
        self.scale[slot] = 0

    def _read(self, slot: int, spec: CaptureSpec) -> dict[int, HostCopy]:
        return {i: HostCopy(self.layers[i].capture_sum[slot]) for i in spec.layers if i in self.layers}

    def collect(self, keys: list[str]) -> dict[str, dict[int, bytes]]:
        """Results by key (float32 bytes per local layer), from finished or still-held slots."""
        live = {spec.key: slot for slot, spec in self._spec_of.items()}
        found = {}
        for key in keys:
            if key in self._results:
                rows = self._results.pop(key)
            elif key in live:
                rows = self._read(live[key], self._spec_of[live[key]])
            else:
                continue
            found[key] = {layer: row.numpy().astype("<f4").tobytes() for layer, row in rows.items()}
        return found

    @property
    def active(self) -> bool:
        return bool(self._spec_of)

    def fill(self, slots: torch.Tensor, positions: torch.Tensor, num_tokens: int, num_padded: int) -> None:
        """Per token: its request's slot and capture weight (0 outside the captured positions)."""
        inside = (positions >= self.lo[slots]) & (positions < self.hi[slots])
        self.token_slot[:num_tokens] = slots
        self.token_slot[num_tokens:num_padded] = 0
        self.token_weight[:num_tokens] = torch.where(inside, self.scale[slots], 0.0)
        self.token_weight[num_tokens:num_padded] = 0

    def clear(self, num_tokens: int | None) -> None:
        self.token_weight[:num_tokens].zero_()
