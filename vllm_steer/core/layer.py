"""The steering layer: branch-free tensor math over persistent slot tables, mixed into a
decoder layer of any family whose layers return ``(hidden, residual)`` with the residual
stream ``hidden + residual``. Torch only (no vLLM import), so the math can be exercised on a
machine that has torch but not vLLM (``benchmarks.gpu_check``).

Every steerable layer reads the same persistent row pool (rows.py; row 0 stays zero: no
steering) through its own per-token row index ``token_row``, which the step writer fills. The
math has no data-dependent branch, so it runs unchanged eagerly, under torch.compile and
inside CUDA graphs, and costs the same however many distinct configs share a batch.

Tables and math are float32 whatever the model's dtype, and the result is cast once: in
bfloat16, unit directions, targets and the projection ``<h, d>`` would lose most of their
digits (a clamp would land ~0.3% off its target).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from vllm_steer.core.kernels import steer_op, steer_triton
from vllm_steer.core.rows import split_entry


class SteeringLayer:
    """Mixed in before a vLLM decoder layer class: its output stream may be steered per
    token, and recorded (capture)."""

    max_directions: int | None = None  # None: not steerable (set by attach_steering)
    captures = False  # set by attach_capture
    kernel = "torch"  # or "triton": the fused kernel of kernels.py

    def attach_steering(self, token_row: torch.Tensor, pool: Any, kernel: str = "torch",
                        token_slot: torch.Tensor | None = None, gate_sum: torch.Tensor | None = None) -> None:
        """Read ``pool`` (a rows.RowPool: its tables, and ``direction_index [K, 1]``, 0..K-1) at
        the rows ``token_row`` names per token, and add each token's reading of its row's first
        direction into ``gate_sum[token_slot]`` (conditions: runtime.py)."""
        # Non-persistent: the weight loader skips them. Allocated once, written in place,
        # shared with the runtime (token_row) and with every other steerable layer (pool).
        self.register_buffer("token_row", token_row, persistent=False)
        self.register_buffer("token_slot", torch.zeros_like(token_row) if token_slot is None else token_slot, persistent=False)
        gate_sum = torch.zeros(1, dtype=torch.float32) if gate_sum is None else gate_sum
        self.register_buffer("gate_sum", gate_sum, persistent=False)
        self.register_buffer("steer_add", pool.add, persistent=False)
        self.register_buffer("steer_dirs", pool.dirs, persistent=False)
        self.register_buffer("steer_count", pool.count, persistent=False)
        self.max_directions = pool.dirs.shape[0]
        self.register_buffer("direction_index", pool.direction_index, persistent=False)
        self.kernel = kernel
        if kernel == "triton":
            steer_op()  # registered here, outside any compiled region

    def attach_capture(self, token_slot: torch.Tensor, token_weight: torch.Tensor, num_slots: int, hidden: int) -> None:
        self.register_buffer("capture_slot", token_slot, persistent=False)
        self.register_buffer("capture_weight", token_weight, persistent=False)
        self.register_buffer("capture_sum", torch.zeros(num_slots, hidden, dtype=torch.float32), persistent=False)
        self.captures = True

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(*args, **kwargs)
        if self.max_directions is not None:
            residual = self.steer(hidden_states, residual)
        if self.captures:
            self.capture(hidden_states + residual)
        return hidden_states, residual

    def capture(self, stream: torch.Tensor) -> None:
        """Add each token's stream, weighted, into its request's capture row. Tokens of
        weight 0 add an exact 0 (``where``, not a product: a padded row may hold inf or NaN,
        and NaN * 0 is NaN)."""
        count = stream.shape[0]
        weight = self.capture_weight[:count].unsqueeze(-1)
        weighted = torch.where(weight != 0, stream.float() * weight, 0.0)
        self.capture_sum.index_add_(0, self.capture_slot[:count], weighted)

    def steer(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return steer(hidden, residual, self.token_row, self.steer_add, self.steer_dirs, self.steer_count,
                     direction_index=self.direction_index, token_slot=self.token_slot, gate_sum=self.gate_sum,
                     kernel=self.kernel)


def steer(hidden: torch.Tensor, residual: torch.Tensor, token_row: torch.Tensor, add: torch.Tensor,
          dirs: torch.Tensor, count: torch.Tensor, *, direction_index: torch.Tensor | None = None,
          token_slot: torch.Tensor | None = None, gate_sum: torch.Tensor | None = None,
          kernel: str = "torch") -> torch.Tensor:
    """The stream after a layer is ``hidden + residual``; return the new residual, steered by
    the row each token reads (``token_row``) of the tables ``add``, ``dirs``, ``count`` (the
    layout of rows.py). Each token's reading of its row's first direction is added into
    ``gate_sum[token_slot]`` when both are given (conditions).

    Adds first, then each direction holds the current stream's component to its bounds,
    in order: ``x <- x + (clip(a, lo, hi) - a) d`` with ``a = <x, d>`` (clamp: ``lo = hi``)
    or an SAE feature's activation (rows.Direction). Row 0 and unused directions are zero, so
    the delta is exactly 0 and unsteered tokens keep ``residual`` bit for bit.
    """
    count_tokens = hidden.shape[0]
    directions = dirs.shape[0]
    reads = gate_sum is not None and token_slot is not None and directions > 0
    if kernel == "triton":
        residual, reading = steer_triton(hidden, residual, token_row, add, dirs, count)
        if reads:
            gate_sum.index_add_(0, token_slot[:count_tokens], reading)
        return residual
    row = token_row[:count_tokens]
    if not directions:
        delta = add[row]
    else:
        stream = hidden.float() + residual.float()
        steered = stream + add[row]
        width = stream.shape[-1]
        if direction_index is None:
            direction_index = torch.arange(directions, device=dirs.device).unsqueeze(-1)
        # A direction a token's row leaves unused is zero there and in row 0 alike: reading
        # row 0 gives the same result from one row that stays in cache, not from every
        # request's own (the rows of distinct requests are megabytes, read each step).
        used = count.index_select(0, row)
        direction_rows = torch.where(direction_index < used, row, 0)  # [K, tokens]
        for k in range(directions):
            # One gather per direction (all K at once would hold K times the prefill's
            # stream in float32); its edit, probe and params are views of it.
            direction, probe, lo, hi, offset, threshold, floor = split_entry(dirs[k].index_select(0, direction_rows[k]), width)
            along = (steered * probe).sum(dim=-1, keepdim=True) + offset
            along = torch.where(along > threshold, along, 0.0)  # a feature's activation, or the projection
            if k == 0 and reads:
                # A condition's reading: a gate row's only direction (every other row's
                # lands in a sum nobody reads; row 0 reads exactly 0).
                gate_sum.index_add_(0, token_slot[:count_tokens], along.view(-1))
            change = torch.where(along > floor, torch.clamp(along, lo, hi) - along, 0.0)
            steered = torch.addcmul(steered, change, direction)
        # Exactly 0 where nothing changed: (stream + 0) - stream.
        delta = steered - stream
    # One cast back (residual -> float32 -> residual's dtype is exact, so a zero delta
    # changes no bit), into a new tensor: the next layer's fused add+norm may write its
    # inputs in place.
    return (residual.float() + delta).to(residual.dtype)


@functools.cache
def steerable_class(layer_class: type[nn.Module]) -> type[nn.Module]:
    return type(f"Steerable{layer_class.__name__}", (SteeringLayer, layer_class), {"__module__": __name__})


def make_steerable(layer: nn.Module) -> nn.Module:
    """Turn a built vLLM decoder layer into its steerable subclass, in place. Swapping the
    class (rather than wrapping the module) keeps every parameter name, so vLLM's weight
    loader, quantization and compilation see the layer they expect."""
    if not isinstance(layer, SteeringLayer):
        layer.__class__ = steerable_class(type(layer))
    return layer
