"""A fused Triton kernel for the steering layer math (``SteeringLayer.steer``), one launch
per layer and step.

The eager math launches about ``5 + 8K`` small kernels (gathers, casts, products, sums),
most reading and writing ``[n, H]`` float32 intermediates; this kernel reads each input row
once and writes the new residual once. Semantics are exactly ``SteeringLayer.steer``'s,
in the same float32 operation order (only the order of the additions inside each dot
product differs):

    delta = add[row]
    for k in range(count[row]):    # the eager math runs all K; unused directions are zero
        edit, probe, (lo, hi, offset, threshold, floor) = dirs[k, row]   # rows.Direction
        a = <hidden + residual + delta, probe> + offset
        a = a if a > threshold else 0                        # an SAE feature's activation
        change = clip(a, lo, hi) - a if a > floor else 0     # floor 0: only where it fires
        delta += change * edit
    new_residual = (residual + delta).to(residual.dtype)
    reading = the first direction's a (0 when the row uses none)   # a condition's (slots.py)

A token pays only for the directions its row uses: an unsteered token (row 0) is one read of
its residual and one write. One program per token. A row is read in blocks of ``BLOCK`` columns (any hidden size,
masked): when the row fits in one block (hidden <= 16384 by default) it stays in registers
across the K projections; a wider row keeps its running ``delta`` in a float32 scratch row
and is swept K + 1 times. Nothing depends on data on the host (no sync, fixed grid), so the
kernel runs eagerly, under torch.compile (as the custom op ``vllm_steer::steer``) and inside
CUDA graphs.

Triton is imported on first use, never at import: this module imports without Triton, and
a test can turn Triton's CPU interpreter on (``TRITON_INTERPRET=1``, read when a kernel is
decorated) before the kernel is defined.
"""

import functools
import importlib.util
import os

import torch

from vllm_steer.core.rows import PARAM_NAMES

# Widest row kept in registers by one program (float32: 64 KiB over up to 16 warps).
MAX_BLOCK = 16384


def triton_available() -> bool:
    """Whether ``steer_triton`` can run here: Triton is installed and there is a GPU, or
    Triton's interpreter is on (CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def steer_triton(hidden: torch.Tensor, residual: torch.Tensor, *tables: torch.Tensor,
                 max_block: int = MAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The new residual for ``hidden + residual`` steered by ``tables``, and each token's
    reading (float32 ``[n]``). ``tables``: ``token_row, add, dirs, count`` in the layout of
    ``rows.RowPool`` (int64 ``token_row`` at least ``n`` long; contiguous float32 ``add [R, H]``
    and ``dirs [K, R, entry_width(H)]``, int32 ``count [R]``). ``hidden`` and ``residual`` may have
    any row stride, each row contiguous. ``max_block`` caps the columns one block holds (tests
    lower it to exercise the swept path)."""
    return steer_op()(hidden, residual, *tables, max_block)


_STEER_OP = None


def steer_op():
    """The custom op ``vllm_steer::steer``, registered on the first call. Make that first
    call outside any compiled region (e.g. when the tables are attached): Dynamo cannot
    trace the registration, only the registered op."""
    global _STEER_OP
    if _STEER_OP is None:
        _STEER_OP = _register()
    return _STEER_OP


def _register():
    import triton  # optional: only with a GPU, or Triton's interpreter (triton_available)

    kernel = _steer_kernel()

    # An opaque custom op (not ``triton_op``): Dynamo and Inductor only need its output
    # shape, and it also traces under Triton's interpreter, whose kernels cannot run on the
    # fake tensors ``triton_op`` traces its body with.
    @torch.library.custom_op("vllm_steer::steer", mutates_args=())
    def steer(
        hidden: torch.Tensor,
        residual: torch.Tensor,
        token_row: torch.Tensor,
        add: torch.Tensor,
        dirs: torch.Tensor,
        count: torch.Tensor,
        max_block: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, width = residual.shape
        directions, rows = dirs.shape[0], dirs.shape[1]
        block = min(triton.next_power_of_2(width), triton.next_power_of_2(max_block))
        blocks = triton.cdiv(width, block)
        out = residual.new_empty((tokens, width))
        reading = residual.new_empty(tokens, dtype=torch.float32)
        # Only a swept row (wider than one block) with directions needs the scratch delta.
        scratch = residual.new_empty((tokens if blocks > 1 and directions else 0, width), dtype=torch.float32)
        if tokens:
            kernel[(tokens,)](
                hidden, residual, out, reading, token_row, add, dirs, count, scratch,
                hidden.stride(0), residual.stride(0), width, rows,
                K=directions, ENTRY=dirs.shape[-1], BLOCK=block, BLOCKS=blocks, num_warps=_num_warps(block),
            )
        return out, reading

    @steer.register_fake
    def _(hidden, residual, token_row, add, dirs, count, max_block):
        return residual.new_empty(residual.shape), residual.new_empty(residual.shape[0], dtype=torch.float32)

    return steer


def _num_warps(block: int) -> int:
    # Enough threads that a register-resident row is a few dozen floats per thread.
    return 4 if block < 2048 else 8 if block < 8192 else 16


@functools.cache
def _steer_kernel():
    # Module globals, defined here (not at import): Triton resolves the names a kernel calls
    # through the module's globals (its interpreter knows no closures), and decorating at
    # first use is what lets a test turn the interpreter on first.
    global tl, load_f32, activation, change, sweep, LO, HI, OFFSET, THRESHOLD, FLOOR
    import triton  # optional (see _register)
    import triton.language as tl

    # Where each param sits after a direction's two vectors (rows.PARAM_NAMES).
    LO, HI, OFFSET, THRESHOLD, FLOOR = (tl.constexpr(PARAM_NAMES.index(name))
                                        for name in ("lo", "hi", "offset", "threshold", "floor"))

    @triton.jit
    def load_f32(row_ptr, cols, width):
        return tl.load(row_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)

    @triton.jit
    def activation(param, dot):
        """``a`` given ``dot = <x, probe>`` and the direction's params (lo, hi, offset,
        threshold, floor)."""
        a = dot + tl.load(param + OFFSET)
        return tl.where(a > tl.load(param + THRESHOLD), a, 0.0)

    @triton.jit
    def change(param, a):
        """How far the stream moves along the edit direction."""
        moved = tl.minimum(tl.maximum(a, tl.load(param + LO)), tl.load(param + HI)) - a
        return tl.where(a > tl.load(param + FLOOR), moved, 0.0)

    @triton.jit
    def sweep(h_row, r_row, add_row, scratch_row, out_row, prev_dir, coeff, next_probe, width,
              FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
        """One pass over a row too wide for registers: finish the previous projection
        (delta += coeff * prev_dir, or delta = add on the first pass), then either write the
        new residual (last pass) or keep delta and return <stream + delta, next_probe>."""
        along = 0.0
        for b in range(BLOCKS):
            cols = b * BLOCK + tl.arange(0, BLOCK)
            if FIRST:
                delta = load_f32(add_row, cols, width)
            else:
                delta = load_f32(scratch_row, cols, width) + coeff * load_f32(prev_dir, cols, width)
            residual = load_f32(r_row, cols, width)
            if LAST:
                tl.store(out_row + cols, (residual + delta).to(out_row.dtype.element_ty), mask=cols < width)
            else:
                tl.store(scratch_row + cols, delta, mask=cols < width)
                stream = load_f32(h_row, cols, width) + residual
                along += tl.sum((stream + delta) * load_f32(next_probe, cols, width), axis=0)
        return along

    @triton.jit
    def steer_kernel(hidden_ptr, residual_ptr, out_ptr, reading_ptr, token_row_ptr, add_ptr, dirs_ptr,
                     count_ptr, scratch_ptr, hidden_stride, residual_stride, width, rows,
                     K: tl.constexpr, ENTRY: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        row = tl.load(token_row_ptr + token)
        h_row = hidden_ptr + token * hidden_stride
        r_row = residual_ptr + token * residual_stride
        out_row = out_ptr + token * width
        add_row = add_ptr + row * width
        # dirs[k, row] is (edit, probe, params) of ENTRY = rows.entry_width(width) numbers; k
        # advances by whole tables (pointer steps: no int32 offset overflows).
        dir_row = dirs_ptr + row * ENTRY
        probe_row = dir_row + width
        param = dir_row + 2 * width
        step = rows * ENTRY
        used = tl.load(count_ptr + row)  # directions this row uses (0 when K is 0)
        reading = 0.0
        if BLOCKS == 1:
            # The whole row in registers: read once, project once per used direction, write once.
            cols = tl.arange(0, BLOCK)
            residual = load_f32(r_row, cols, width)
            delta = load_f32(add_row, cols, width)
            if K > 0:
                stream = load_f32(h_row, cols, width) + residual
                for k in range(used):
                    a = activation(param, tl.sum((stream + delta) * load_f32(probe_row, cols, width), axis=0))
                    reading = tl.where(k == 0, a, reading)
                    delta = delta + change(param, a) * load_f32(dir_row, cols, width)
                    dir_row += step
                    probe_row += step
                    param += step
            tl.store(out_row + cols, (residual + delta).to(out_ptr.dtype.element_ty), mask=cols < width)
        else:
            scratch_row = scratch_ptr + token * width
            if used == 0:
                sweep(h_row, r_row, add_row, scratch_row, out_row, dir_row, 0.0, dir_row, width,
                      True, True, BLOCK, BLOCKS)
            else:
                a = activation(param, sweep(h_row, r_row, add_row, scratch_row, out_row, dir_row, 0.0, probe_row,
                                            width, True, False, BLOCK, BLOCKS))
                reading = a
                for _ in range(1, used):
                    a = activation(param + step, sweep(h_row, r_row, add_row, scratch_row, out_row, dir_row,
                                                       change(param, a), probe_row + step, width, False, False,
                                                       BLOCK, BLOCKS))
                    dir_row += step
                    probe_row += step
                    param += step
                sweep(h_row, r_row, add_row, scratch_row, out_row, dir_row, change(param, a), probe_row,
                      width, False, True, BLOCK, BLOCKS)
        tl.store(reading_ptr + token, reading)

    return steer_kernel
