"""The notebook's method as the baseline: transformers + forward hooks (vllm_steer.lab.reference),
generating the same prompts with the same steering and token counts as the engine,

(a) one chat at a time, as the notebook does, and
(b) batched with left padding, every row with its own steering.

    python -m benchmarks.notebook --model llama-1b --batch 8 --max-tokens 32 --chats 2

Both decode greedily without EOS stops and compute only the last position's logits (as
``transformers``' ``generate`` does), so they do the engine's work and no more. The hooks are
reference.py's op-by-op math with one row of tables per batch row: the k-th op of every
row is applied together (an add row has a zero direction, a clamp/ablate row a zero add),
masked by each row's own steering phase, so a batch of one matches
``ReferenceSteerer.generate`` token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from benchmarks import common
from vllm_steer.lab.reference import NEVER, ReferenceOutput, edit_layer_outputs, layer_ops, phase_bounds
from vllm_steer.core.plan import ModelShape, ResolvedSteering
from vllm_steer.core.resolve import resolve
from vllm_steer.core.registry import VectorRegistry


def resolve_specs(specs: Sequence[dict | None], num_layers: int, hidden: int, max_directions: int = 4):
    """Resolve specs as the engine's front end would (inline vectors need no registry):
    (resolved per row, digest -> vector)."""
    shape = ModelShape(num_layers, hidden, tuple(range(num_layers)), max_directions)
    registry = VectorRegistry()
    resolved = [None if spec is None else resolve(spec, shape, registry) for spec in specs]
    vectors: dict[str, np.ndarray] = {}
    for steering in resolved:
        if steering is not None:
            vectors.update(steering.arrays(registry))
    return resolved, vectors


def layer_tables(steerings: Sequence[ResolvedSteering | None], layer: int, vectors: dict[str, np.ndarray],
                 hidden: int, dtype: torch.dtype):
    """Per op index k and batch row: the add (coeff * vector), the direction and the target,
    each zero where the row has no such op. Shapes [depth, batch, 1, hidden] / [depth, batch, 1, 1]."""
    per_row = [layer_ops(s, layer, vectors, dtype) if s is not None else [] for s in steerings]
    depth = max((len(ops) for ops in per_row), default=0)
    add = torch.zeros(depth, len(per_row), 1, hidden, dtype=dtype)
    direction = torch.zeros_like(add)
    target = torch.zeros(depth, len(per_row), 1, 1, dtype=dtype)
    for row, ops in enumerate(per_row):
        for k, (op, vector, _) in enumerate(ops):
            if op.mode not in ("add", "clamp", "ablate"):
                raise ValueError(f"the notebook baseline applies add, clamp and ablate, not {op.mode!r}")
            if op.mode == "add":
                add[k, row, 0] = op.coeff * vector
            else:
                direction[k, row, 0] = vector
                target[k, row, 0, 0] = op.coeff if op.mode == "clamp" else 0.0
    return add, direction, target


@contextmanager
def batch_hooks(model, steerings: Sequence[ResolvedSteering | None], vectors: dict[str, np.ndarray],
                prompt_lens: Sequence[int]) -> Iterator[None]:
    """Forward hooks steering each row of a left-padded batch with its own steering."""
    dtype = model.dtype
    hidden = model.config.hidden_size
    bounds = [phase_bounds(s.apply_to, n) if s is not None else (0, NEVER) for s, n in zip(steerings, prompt_lens)]
    device = model.device
    lo = torch.tensor([b[0] for b in bounds], device=device).unsqueeze(-1)
    hi = torch.tensor([b[1] for b in bounds], device=device).unsqueeze(-1)
    layers = sorted({op.layer for s in steerings if s is not None for op in s.ops})
    edits = {}
    for layer in layers:
        tables = tuple(t.to(device) for t in layer_tables(steerings, layer, vectors, hidden, dtype))

        def edit(hidden_states, positions, tables=tables):
            inside = ((positions >= lo) & (positions < hi)).unsqueeze(-1).to(hidden_states.dtype)
            add, direction, target = tables
            for k in range(add.shape[0]):
                along = (hidden_states * direction[k]).sum(-1, keepdim=True)
                hidden_states = hidden_states + inside * (add[k] + (target[k] - along) * direction[k])
            return hidden_states

        edits[layer] = edit
    with edit_layer_outputs(model, edits):
        yield


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], steerings: Sequence[ResolvedSteering | None],
                   vectors: dict[str, np.ndarray], max_new_tokens: int, pad_id: int = 0) -> list[ReferenceOutput]:
    """Greedy decoding of a left-padded batch, no EOS stop; each row steered by its own spec."""
    from transformers import DynamicCache  # transformers: ~2 s beyond torch; run.py imports this module to start it in a subprocess

    count, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((count, width), pad_id, dtype=torch.long)
    mask = torch.zeros(count, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    with batch_hooks(model, steerings, vectors, [len(p) for p in prompts]):
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        for _ in range(max_new_tokens):
            raw = torch.log_softmax(logits.float(), dim=-1)
            chosen = torch.argmax(logits.float(), dim=-1)
            picked = raw.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
            for row, token in enumerate(chosen.tolist()):
                tokens[row].append(token)
                logprobs[row].append(picked[row])
            mask = torch.cat([mask, mask.new_ones(count, 1)], dim=-1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=chosen.unsqueeze(-1), attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return [ReferenceOutput(t, lp) for t, lp in zip(tokens, logprobs)]


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM  # transformers: ~2 s beyond torch; run.py imports this module to start it in a subprocess

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def run(model, prompts: Sequence[Sequence[int]], specs: Sequence[dict | None], max_new_tokens: int,
        chats: int, batch: int | None = None) -> dict[str, Any]:
    """Time (a) the first ``chats`` prompts one at a time and (b) all prompts batched
    ``batch`` at a time (default: all at once). Tokens/s of each; one warm-up chat first."""
    config = model.config
    resolved, vectors = resolve_specs(specs, config.num_hidden_layers, config.hidden_size)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    # Warm up both shapes (in a process that imported vLLM, the first padded batch pays a
    # one-time cost of seconds).
    generate_batch(model, [prompts[0]], [resolved[0]], vectors, 2, pad_id)
    generate_batch(model, prompts[: batch or len(prompts)], resolved[: batch or len(prompts)], vectors, 2, pad_id)
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens, "torch_threads": torch.get_num_threads()}

    one = []
    for index in range(min(chats, len(prompts))):
        start = time.perf_counter()
        out = generate_batch(model, [prompts[index]], [resolved[index]], vectors, max_new_tokens, pad_id)[0]
        one.append(common.pass_record("one_at_a_time", index, time.perf_counter() - start, len(prompts[index]), len(out.token_ids)))
    report["one_at_a_time"] = _totals(one)

    batch = batch or len(prompts)
    batched = []
    for index, start_row in enumerate(range(0, len(prompts), batch)):
        rows = slice(start_row, start_row + batch)
        start = time.perf_counter()
        outs = generate_batch(model, prompts[rows], resolved[rows], vectors, max_new_tokens, pad_id)
        batched.append(common.pass_record("batched", index, time.perf_counter() - start,
                                          sum(len(p) for p in prompts[rows]), sum(len(o.token_ids) for o in outs)))
    report["batched"] = {**_totals(batched), "batch": batch}
    return report


def _totals(passes: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(p["seconds"] for p in passes)
    output = sum(p["output_tokens"] for p in passes)
    prompt = sum(p["prompt_tokens"] for p in passes)
    return {"passes": passes, "requests": len(passes), "seconds": seconds, "output_tokens": output,
            "output_tok_s": output / seconds, "total_tok_s": (prompt + output) / seconds}


# glibc returns big freed blocks to the OS and maps fresh ones on the next allocation; on
# this kind of VM the page faults make PyTorch's CPU matmuls of a few rows ~7x slower
# (transformers, batch 8, 1B shape: 3.1 s per decode step instead of 0.44 s). vLLM does not
# suffer from it; the baseline runs with big blocks kept in the heap, the stronger baseline.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34), "MALLOC_TOP_PAD_": str(1 << 30)}


def run_subprocess(model: str, *, dtype: str, batch: int, prompt_len: int, max_tokens: int, chats: int,
                   out: Path, tuned_malloc: bool = True, threads: int | None = None) -> dict[str, Any]:
    """``run`` in a fresh process (its own allocator settings; the model's memory goes with
    it), on the prompts and specs the engine scenarios use (same seeds)."""
    command = [sys.executable, "-m", "benchmarks.notebook", "--model", model, "--dtype", dtype, "--batch", str(batch),
               "--prompt-len", str(prompt_len), "--max-tokens", str(max_tokens), "--chats", str(chats), "--out", str(out)]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, **(MALLOC_ENV if tuned_malloc else {})}
    subprocess.run(command, check=True, env=env, cwd=common.ROOT)
    report = json.loads(Path(out).read_text())
    report["malloc"] = MALLOC_ENV if tuned_malloc else "default"
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="demo, tiny, small, llama-1b, a folder or a hub id")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chats", type=int, default=2, help="prompts timed one at a time (tok/s is per chat)")
    parser.add_argument("--layers", choices=["one", "all"], default="all")
    parser.add_argument("--mode", choices=["add", "clamp"], default="add")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(common.RESULTS / "notebook.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path, label = common.resolve_model(args.model)
    model = load_model(path, args.dtype)
    config = model.config
    scenario = common.Scenario(args.batch, args.batch, args.layers, args.mode)
    prompts = common.make_prompts(args.batch, args.prompt_len, config.vocab_size)
    specs = common.scenario_specs(scenario, config.hidden_size, config.num_hidden_layers)
    with common.RssSampler(include_root=True) as rss:
        result = run(model, prompts, specs, args.max_tokens, args.chats)
    report = {"model": label, "scenario": scenario.as_dict(), **result, "peak_rss_bytes": rss.peak,
              "load_average": common.load_average()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{label}: one chat at a time {report['one_at_a_time']['output_tok_s']:.2f} tok/s, "
          f"batched x{args.batch} {report['batched']['output_tok_s']:.2f} tok/s")


if __name__ == "__main__":
    main()
