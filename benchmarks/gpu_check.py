"""The steering math on one GPU, without vLLM: ``python -m benchmarks.gpu_check``.

No machine here runs vLLM's GPU build, so this check takes the torch-only half of the plugin
(layer math, slot tables and their writers, the Triton kernel) to a GPU and measures what
decides whether steering is cheap there:

(a) sync: admission, the per-step ``token_slot``/``token_row`` write (fed device tensors, as Model Runner
    V2 does), the layer math and release, each under ``torch.cuda.set_sync_debug_mode
    ("error")``: an operation that makes the host wait for the GPU fails with torch's message.
(b) timing: the layer math per decode step (eager ``SteeringLayer.steer``, the same under
    torch.compile, the fused Triton kernel) for Llama 3.1 8B and 70B widths, as a ratio to
    that decoder layer's own matmuls timed in the same run. Each is timed inside a CUDA
    graph (as vLLM replays decode steps), so the ratio is device time, not launch overhead.
(c) memory: the steering row pool and index buffers at vLLM's GPU defaults and the default
    budget, from the formula the benchmarks use, checked against the buffers a small runtime
    really allocates.
(d) kernel: the Triton kernel's path for rows wider than one block, bit-identical unsteered
    rows, and the op under torch.compile (Inductor) and in a CUDA graph, on this device.

On a CPU everything runs at tiny sizes (Triton through its interpreter when
``TRITON_INTERPRET=1``; (a) is skipped) so the check cannot rot. Writes ``gpu_check.json``
and ``gpu_check.md`` into ``--out``. Never imports vLLM.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, markdown_table, package_version, steering_table_bytes
from vllm_steer.core.kernels import steer_op, steer_triton, triton_available
from vllm_steer.core.layer import make_steerable, steer
from vllm_steer.core.plan import ModelShape
from vllm_steer.core.resolve import resolve
from vllm_steer.core.rows import MAX_DEFAULT_BUDGET, PARAM_NAMES, budget_rows
from vllm_steer.core.runtime import SteeringRuntime
from vllm_steer.core.spec import encode_b64
from vllm_steer.core.registry import VectorRegistry

# name: (hidden, kv projection width, intermediate, decoder layers)
MODELS = {
    "Llama-3.1-8B": (4096, 1024, 14336, 32),
    "Llama-3.1-70B": (8192, 1024, 28672, 80),
}
TINY_MODELS = {"tiny": (64, 16, 128, 2)}
TOKENS, TINY_TOKENS = (1, 64, 256, 512), (1, 4)
DIRECTIONS = (0, 1, 4)
TIMING_ROWS = 257  # 256 distinct rows + the zero row
# vLLM 0.32's GPU defaults (engine/arg_utils.py, offline LLM class): (max_num_seqs,
# max_num_batched_tokens) on H100/H200-class GPUs and on smaller ones.
GPU_DEFAULTS = ((1024, 16384), (256, 8192))
TABLE_DIRECTIONS = 4  # SteeringConfig's default max_directions


def steerable_stub() -> nn.Module:
    """The steering half of a steerable decoder layer, without vLLM's attention and MLP."""
    return make_steerable(nn.Module())


def steer_eager(hidden, residual, token_row, add, dirs, count, reading: bool = False):
    """``layer.steer`` on these tables: the new residual, and with ``reading`` each token's
    reading too (as ``steer_triton`` returns). The tables are arguments, so one compiled
    function serves every table size (as vLLM's compiled model sees its buffers)."""
    slots = token_row.shape[0]
    gate_sum = torch.zeros(slots, device=token_row.device)  # each token's reading in its own entry
    out = steer(hidden, residual, token_row, add, dirs, count, token_slot=torch.arange(slots, device=token_row.device),
                gate_sum=gate_sum)
    return (out, gate_sum[: hidden.shape[0]]) if reading else out


def triton_residual(hidden, residual, *tables, **options):
    """The kernel's new residual (what ``steer_eager`` returns)."""
    return steer_triton(hidden, residual, *tables, **options)[0]


def random_tables(rows: int, directions: int, hidden: int, device, seed: int = 0) -> list[torch.Tensor]:
    """(add, dirs, count) as the row pool holds them: float32, every direction
    used, row 0 zero. Direction 0 is a clamp (unit, ``lo = hi``), 1 a range (``lo < hi``),
    2 an SAE feature_clamp (an encoder row as probe, an offset, a threshold; raw decoder row),
    3 a range open above, then the same again with ``only_active`` on the feature."""
    generator = torch.Generator().manual_seed(seed)
    add = torch.randn(rows, hidden, generator=generator)
    dirs = F.normalize(torch.randn(rows, directions, hidden, generator=generator), dim=-1)
    probes = dirs.clone()
    lo = 4 * torch.randn(rows, directions, generator=generator)
    hi = lo.clone()
    hi[:, 1::2] += 2
    hi[:, 3::4] = torch.inf
    param = {name: index for index, name in enumerate(PARAM_NAMES)}  # rows.Direction.params
    params = torch.full((rows, directions, len(PARAM_NAMES)), -torch.inf)
    params[..., param["lo"]], params[..., param["hi"]], params[..., param["offset"]] = lo, hi, 0.0
    features = [k for k in range(directions) if k % 4 == 2]
    for k in features:  # magnitudes like an SAE's: encoder rows ~ 1/sqrt(H), activations of a few units
        probes[:, k] = 2 * torch.randn(rows, hidden, generator=generator) / hidden ** 0.5
        dirs[:, k] *= 3
        params[:, k, param["offset"]] = torch.randn(rows, generator=generator)
        params[:, k, param["threshold"]] = 0.5 * torch.rand(rows, generator=generator)
        if k % 8 == 6:
            params[:, k, param["floor"]] = 0.0  # only_active
    count = torch.full((rows,), directions, dtype=torch.int32)
    directions = torch.cat([dirs, probes, params], dim=-1).transpose(0, 1).contiguous()  # [K, R, E]
    add[0], directions[:, 0], count[0] = 0, 0, 0
    return [table.to(device) for table in (add, directions, count)]


def one_rounding_gap(out: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference in units of "one rounding" of ``out``'s dtype (float32 sums agree
    to ~1e-6 of the values' scale, which is added as slack): <= 1 passes."""
    out, ref = out.float(), expected.float()
    eps = max(torch.finfo(expected.dtype).eps, 1e-6)
    bound = eps * torch.maximum(out.abs(), ref.abs()) + 1e-6 * ref.abs().max() + 1e-30
    return float(((out - ref).abs() / bound).max()) if out.numel() else 0.0


# ---- timing -----------------------------------------------------------------------------------
def seconds_per_call(fn: Callable[[], Any], device: torch.device, calls: int, repeats: int) -> tuple[float, str]:
    """Median over ``repeats`` of the time per call of ``fn``, and how it was timed. On a GPU:
    ``calls`` calls captured in one CUDA graph, replayed between CUDA events (a capture that
    fails falls back to a plain loop, and says why); on a CPU: the host clock."""
    fn()  # compile / autotune outside the timed region
    run, how = (lambda: [fn() for _ in range(calls)]), "host clock"
    if device.type == "cuda":
        try:
            run, how = _capture(fn, calls)[0].replay, "cuda graph"
        except Exception as exc:  # noqa: BLE001 - reported, and timed without a graph
            torch.cuda.synchronize()
            how = f"stream loop (capture failed: {exc})"[:300]
    run()
    return statistics.median(_elapsed(run, device) / calls for _ in range(repeats)), how


def _elapsed(run: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cuda":
        began = time.perf_counter()
        run()
        return time.perf_counter() - began
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _capture(fn: Callable[[], Any], calls: int) -> tuple[torch.cuda.CUDAGraph, list[Any]]:
    """``calls`` calls of ``fn`` captured in a CUDA graph, and their outputs (filled on replay)."""
    side = torch.cuda.Stream()  # warm up off the capture stream, as torch's docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [fn() for _ in range(calls)]
    return graph, outputs


def layer_matmuls(hidden: int, kv: int, intermediate: int, device, dtype) -> Callable[[int], Callable[[], Any]]:
    """The decoder layer's matmuls in ``dtype`` (vLLM's [out, in] weights): q, k, v, o,
    gate, up and down. Returns tokens -> a step of them."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
              (intermediate, hidden), (intermediate, hidden)]
    weights = [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]
    down = torch.randn(hidden, intermediate, device=device, dtype=dtype)

    def step_of(tokens: int) -> Callable[[], Any]:
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        act = torch.randn(tokens, intermediate, device=device, dtype=dtype)

        def step():
            for weight in weights:
                F.linear(x, weight)
            F.linear(act, down)

        return step

    return step_of


def timing(device: torch.device, models: dict, tokens_list, calls: int, repeats: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = {"eager": steer_eager, "compile": torch.compile(steer_eager, dynamic=True, fullgraph=True)}
    notes = [] if device.type == "cuda" else ["CPU: tiny sizes; these times only show that the check runs."]
    if triton_available():
        steer_op()  # registered outside the compiled region
        variants["triton"] = triton_residual
    else:
        notes.append("triton: not run (no GPU and TRITON_INTERPRET is not 1, or Triton is missing)")
    # One compiled function: a graph per directions count, and one more for a single token.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(DIRECTIONS))
    rows = []
    for name, (hidden, kv, intermediate, _) in models.items():
        step_of = layer_matmuls(hidden, kv, intermediate, device, dtype)
        baseline = {tokens: seconds_per_call(step_of(tokens), device, calls, repeats) for tokens in tokens_list}
        for directions in DIRECTIONS:
            tables = random_tables(TIMING_ROWS, directions, hidden, device, seed=directions)
            for tokens in tokens_list:
                # Every token its own row (the most gather traffic): 1..256.
                token_row = (torch.arange(tokens, device=device) % (TIMING_ROWS - 1) + 1)
                hidden_states = torch.randn(tokens, hidden, device=device, dtype=dtype)
                residual = torch.randn(tokens, hidden, device=device, dtype=dtype)
                args = (hidden_states, residual, token_row, *tables)
                expected = steer_eager(*args)
                matmul_s, matmul_how = baseline[tokens]
                for variant, fn in variants.items():
                    seconds, how = seconds_per_call(lambda: fn(*args), device, calls, repeats)
                    rows.append({
                        "model": name, "hidden": hidden, "tokens": tokens, "directions": directions,
                        "variant": variant, "us": seconds * 1e6, "layer_matmuls_us": matmul_s * 1e6,
                        "ratio": seconds / matmul_s, "timer": how, "matmul_timer": matmul_how,
                        "gap_vs_eager_roundings": one_rounding_gap(fn(*args), expected),
                    })
    return {"dtype": str(dtype).removeprefix("torch."), "calls_per_sample": calls, "samples": repeats,
            "notes": notes, "rows": rows, "kernel_choice": kernel_choice(rows)}


def kernel_choice(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which ``steering.kernel`` this device should default to: the Triton kernel against the
    torch math as vLLM runs it (compiled), by the geometric mean of their time ratios over
    every (model, tokens, directions) cell."""
    times = {(r["model"], r["tokens"], r["directions"], r["variant"]): r["us"] for r in rows}
    cells = {key[:3] for key in times}
    ratios = [times[cell + ("triton",)] / times[cell + ("compile",)] for cell in cells if cell + ("triton",) in times]
    if not ratios:
        return {"recommendation": None, "reason": "the Triton kernel did not run"}
    mean = float(np.exp(np.mean(np.log(ratios))))
    return {"recommendation": "triton" if mean < 1 else "torch", "triton_over_compile_geomean": mean,
            "triton_faster_cells": sum(ratio < 1 for ratio in ratios), "cells": len(ratios)}


# ---- (a) host synchronization -----------------------------------------------------------------
SYNC_HIDDEN, SYNC_LAYERS, SYNC_SLOTS, SYNC_TOKENS = 512, 4, 17, 256


def steered_params(shape: ModelShape, seed: int, capture: bool = False) -> dict:
    """A request's ``extra_args`` as the front end hands them on: several layers, add + clamp + ablate,
    inline vectors (as floats and as base64); odd seeds steer generated tokens only, seed 1
    under a condition."""
    generator = np.random.default_rng(seed)
    first, second, third = (generator.standard_normal(shape.hidden_size).astype(np.float32) for _ in range(3))
    spec = {"vectors": [
        {"vector": first.tolist(), "layers": [0, 1, 2], "scale": 4.0},
        {"vector_b64": encode_b64(second), "layers": [1, 3], "mode": "clamp", "scale": 2.0},
        {"vector_b64": encode_b64(third), "layers": [2], "mode": "ablate"},
    ], "apply_to": "generated" if seed % 2 else "all"}
    if seed == 1:
        spec["condition"] = {"vector": third.tolist(), "layer": 1, "threshold": 0.0}
    extra = {"steering": resolve(spec, shape, VectorRegistry()).wire}
    if capture:
        extra["steering_capture"] = json.dumps({"key": f"k{seed}", "layers": [1, 2], "reduce": "mean"})
    return extra


class _Warnings(logging.Handler):
    """Admission never raises (it logs and runs the request unsteered): keep what it logs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def sync_check(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no CUDA device: torch.cuda.set_sync_debug_mode only reports CUDA synchronizations"}
    shape = ModelShape(num_layers=SYNC_LAYERS, hidden_size=SYNC_HIDDEN,
                       steerable_layers=tuple(range(SYNC_LAYERS)), max_directions=4)
    with torch.device(device):  # as vLLM builds the model: every buffer on the GPU
        layers = {index: steerable_stub() for index in range(SYNC_LAYERS)}
        runtime = SteeringRuntime(shape, VectorRegistry(), layers, SYNC_SLOTS, SYNC_TOKENS, capture=True)
        slot_of_req_index = torch.zeros(SYNC_SLOTS, dtype=torch.int64)  # V2SlotWriter's
    requests = {f"r{i}": steered_params(shape, i, capture=i == 3) for i in range(4)}
    # The step's inputs as Model Runner V2 holds them, already on the GPU.
    prompt_lens = [5, 3, 7, 4]
    idx_mapping = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
    query_start_loc = torch.tensor([0, 5, 6, 13, 17], dtype=torch.int32, device=device)
    positions = torch.tensor([0, 1, 2, 3, 4, 3] + list(range(7)) + [0, 1, 2, 3], device=device)
    num_tokens, num_padded = 17, 24
    hidden = torch.randn(num_padded, SYNC_HIDDEN, device=device, dtype=torch.bfloat16)
    residual = torch.randn_like(hidden)
    warnings = _Warnings()
    logging.getLogger("vllm_steer").addHandler(warnings)

    def admit():
        for index, (req_id, params) in enumerate(requests.items()):
            slot = runtime.admit(req_id, params, prompt_lens[index])
            slot_of_req_index[index] = slot
            if slot == 0:
                raise RuntimeError(f"{req_id} was admitted unsteered: {' | '.join(warnings.messages)}")

    def fill():
        start = query_start_loc
        runtime.fill_token_slot(slot_of_req_index[idx_mapping], (start[1:] - start[:-1]).to(torch.int64),
                                positions, num_tokens, num_padded)

    def layer_math(kernel):
        def run():
            for layer in layers.values():
                layer.kernel = kernel
                layer.capture(hidden + layer.steer(hidden, residual))
        return run

    ops = [("admit 4 requests (add + clamp + ablate on 4 layers, inline vectors; one with capture "
            "and one with a condition)", admit),
           ("fill_token_slot (slots and rows) from device tensors (Model Runner V2)", fill),
           ("layer math, eager (steer + capture)", layer_math("torch"))]
    if triton_available():
        steer_op()
        ops.append(("layer math, Triton kernel (+ capture)", layer_math("triton")))
    ops += [("release 4 requests (capture rows copied back asynchronously)",
             lambda: [runtime.release(req_id) for req_id in requests]),
            ("flush after release (the condition's outcome copied back asynchronously)", runtime.flush),
            ("clear_step (dummy run / graph capture)", lambda: runtime.clear_step(num_padded))]
    results = []
    try:
        for name, op in ops:
            results.append({"op": name, **_without_sync(op)})
    finally:
        logging.getLogger("vllm_steer").removeHandler(warnings)
    return {"ops": results, "ok": all(result["ok"] for result in results)}


def _without_sync(op: Callable[[], Any]) -> dict[str, Any]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op()
        return {"ok": True, "error": None}
    except Exception as exc:  # noqa: BLE001 - the report is the point
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


# ---- (c) table memory -------------------------------------------------------------------------
def memory() -> dict[str, Any]:
    """The formula against a real allocation (small), then the formula at vLLM's defaults."""
    hidden, layers, seqs, tokens = 64, 3, 7, 32
    shape = ModelShape(num_layers=layers, hidden_size=hidden, steerable_layers=tuple(range(layers)),
                       max_directions=TABLE_DIRECTIONS, table_rows=9)
    stubs = {index: steerable_stub() for index in range(layers)}
    runtime = SteeringRuntime(shape, VectorRegistry(), stubs, seqs + 1, tokens)
    pool = runtime.pool
    buffers = [runtime.token_slot, runtime.token_row, runtime.row_of_slot, runtime.stages, runtime.gate,
               runtime.gate_sum, pool.add, pool.dirs, pool.count, pool.direction_index]
    allocated = sum(buffer.numel() * buffer.element_size() for buffer in buffers)
    formula = steering_table_bytes(hidden, layers, seqs, TABLE_DIRECTIONS, tokens, table_rows=9)["total"]
    rows = []
    for name, (width, _, _, num_layers) in MODELS.items():
        table_rows = budget_rows(MAX_DEFAULT_BUDGET, width, TABLE_DIRECTIONS)
        for max_num_seqs, max_tokens in GPU_DEFAULTS:
            sizes = steering_table_bytes(width, num_layers, max_num_seqs, TABLE_DIRECTIONS, max_tokens, table_rows)
            unbounded = steering_table_bytes(width, num_layers, max_num_seqs, TABLE_DIRECTIONS, max_tokens)
            rows.append({"model": name, "hidden": width, "layers": num_layers, "max_num_seqs": max_num_seqs,
                         "max_num_batched_tokens": max_tokens, "max_directions": TABLE_DIRECTIONS,
                         "pool_rows": sizes["rows"], "total_mib": sizes["total"] / 2**20,
                         "unbounded_gib": unbounded["total"] / 2**30})
    return {"small_case": {"hidden": hidden, "layers": layers, "max_num_seqs": seqs,
                           "max_num_batched_tokens": tokens, "allocated_bytes": allocated,
                           "formula_bytes": formula, "match": allocated == formula},
            "rows": rows}


# ---- (d) the kernel on this device -----------------------------------------------------------
def kernel_checks(device: torch.device) -> dict[str, Any]:
    if not triton_available():
        return {"skipped": "Triton cannot run here (no GPU and TRITON_INTERPRET is not 1, or Triton is missing)"}
    steer_op()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Hidden no multiple of the swept block (the last block is partial).
    hidden, pool_rows, tokens, block = (5000, 9, 48, 1024) if device.type == "cuda" else (72, 5, 6, 32)
    tables = random_tables(pool_rows, 4, hidden, device, seed=7)
    add, directions, count = tables
    add[pool_rows - 1], directions[:, pool_rows - 1] = 0, 0  # a row whose steering is all zeros
    directions[2:, pool_rows - 2] = 0  # a row using 2 of its 4 directions
    count[pool_rows - 2] = 2
    token_row = torch.arange(tokens, device=device) % pool_rows  # row 0 and the zero row included
    unsteered = (token_row == 0) | (token_row == pool_rows - 1)
    args = (torch.randn(tokens, hidden, device=device, dtype=dtype), torch.randn(tokens, hidden, device=device, dtype=dtype),
            token_row, *tables)
    (expected, expected_reading), (out, reading) = steer_eager(*args, reading=True), steer_triton(*args)
    swept = triton_residual(*args, max_block=block)
    compiled = torch.compile(lambda: triton_residual(*args), fullgraph=True)()
    checks = [
        {"check": "one block per row: within one rounding of eager", "gap": one_rounding_gap(out, expected)},
        {"check": "first direction's reading (conditions): equal to eager's up to summation order",
         "ok": torch.allclose(reading, expected_reading, rtol=1e-4, atol=1e-4)},
        {"check": f"row swept in blocks of {block}: within one rounding of eager",
         "gap": one_rounding_gap(swept, expected)},
        {"check": "row 0 and all-zero rows: residual bit for bit", "ok": torch.equal(out[unsteered], args[1][unsteered])},
        {"check": "torch.compile (Inductor, fullgraph): same bits as the eager op", "ok": torch.equal(compiled, out)},
    ]
    if device.type == "cuda":
        graph, (graph_out,) = _capture(lambda: triton_residual(*args), 1)
        graph_out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        checks.append({"check": "CUDA graph replay: same bits as the eager op", "ok": torch.equal(graph_out, out)})
    for check in checks:
        check.setdefault("ok", check.get("gap", 2) <= 1)
    return {"dtype": str(dtype).removeprefix("torch."), "hidden": hidden, "checks": checks,
            "ok": all(check["ok"] for check in checks)}


# ---- report -----------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": package_version("triton"),
            "python": platform.python_version()}


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    parts = [f"# GPU check: steering math without vLLM\n\n{env['device']}; torch {env['torch']}, CUDA {env['cuda']}, "
             f"Triton {env['triton']}; {'quick' if report['quick'] else 'full'} run, {report['seconds']:.0f} s."]
    sync = report["sync"]
    parts.append("## (a) No host synchronization at admission and per step\n\n" + (
        f"Skipped: {sync['skipped']}" if "skipped" in sync else
        markdown_table(["operation", "result", "error"], [(o["op"], "pass" if o["ok"] else "FAIL", o["error"]) for o in sync["ops"]])))
    timing_part = report["timing"]
    table = {}
    for row in timing_part["rows"]:
        key = (row["model"], row["tokens"], row["directions"])
        table.setdefault(key, {"matmuls": row["layer_matmuls_us"]})[row["variant"]] = row
    variants = sorted({row["variant"] for row in timing_part["rows"]}, key=["eager", "compile", "triton"].index)
    parts.append(
        f"## (b) Layer math per step, as a ratio to the decoder layer's matmuls\n\n{timing_part['dtype']} activations, "
        f"float32 tables, {TIMING_ROWS} rows, every token its own row; median of {timing_part['samples']} samples of "
        f"{timing_part['calls_per_sample']} calls (timers: {', '.join(sorted({r[t] for r in timing_part['rows'] for t in ('timer', 'matmul_timer')}))}). "
        "Cells: microseconds (ratio to matmuls; largest gap to eager in roundings of the output dtype).\n\n"
        + markdown_table(["model", "tokens", "directions", "matmuls us"] + variants, [
            (model, tokens, k, cells["matmuls"], *(
                f"{cells[v]['us']:.1f} ({cells[v]['ratio']:.4f}; {cells[v]['gap_vs_eager_roundings']:.2g})" for v in variants))
            for (model, tokens, k), cells in table.items()])
        + "".join(f"\n\n{note}" for note in timing_part["notes"]))
    choice = timing_part["kernel_choice"]
    if choice["recommendation"] is not None:
        parts[-1] += (f"\n\n**Kernel choice:** `steering.kernel: \"{choice['recommendation']}\"` (the Triton kernel takes "
                      f"{choice['triton_over_compile_geomean']:.3f}x the compiled torch math's time, geometric mean; faster in "
                      f"{choice['triton_faster_cells']} of {choice['cells']} cells).")
    mem = report["memory"]
    small = mem["small_case"]
    parts.append(
        f"## (c) Steering memory at vLLM's GPU defaults (max_directions {TABLE_DIRECTIONS}, float32, "
        f"default budget {MAX_DEFAULT_BUDGET >> 20} MiB)\n\n"
        f"Formula checked against a real allocation ({small['layers']} layers x hidden {small['hidden']}, "
        f"{small['max_num_seqs']} seqs): {small['allocated_bytes']} allocated vs {small['formula_bytes']} "
        f"({'match' if small['match'] else 'MISMATCH'}). Unbounded: a row for every request at every layer.\n\n"
        + markdown_table(["model", "layers", "max_num_seqs", "max_num_batched_tokens", "pool rows", "total MiB", "unbounded GiB"],
                         [(r["model"], r["layers"], r["max_num_seqs"], r["max_num_batched_tokens"], r["pool_rows"],
                           r["total_mib"], r["unbounded_gib"]) for r in mem["rows"]]))
    kernel = report["kernel"]
    parts.append("## (d) Triton kernel on this device\n\n" + (
        f"Skipped: {kernel['skipped']}" if "skipped" in kernel else
        f"{kernel['dtype']}, hidden {kernel['hidden']}.\n\n" + markdown_table(
            ["check", "result"], [(c["check"], ("pass" if c["ok"] else "FAIL") + (f" (gap {c['gap']:.2g})" if "gap" in c else ""))
                                  for c in kernel["checks"]])))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check", help="folder for gpu_check.json and .md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few samples (also what a CPU runs)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda" and not args.quick
    calls, repeats = (20, 15) if full else (2, 3)
    report = {
        "environment": environment(device),
        "quick": not full,
        "sync": sync_check(device),
        "timing": timing(device, MODELS if full else TINY_MODELS, TOKENS if full else TINY_TOKENS, calls, repeats),
        "memory": memory(),
        "kernel": kernel_checks(device),
    }
    report["seconds"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
