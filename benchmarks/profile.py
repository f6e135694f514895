"""Where a steered step's host time goes: py-spy samples the engine's worker process while
one engine runs unsteered passes, then steered passes, of the same batch; the report is the
share of samples under the steering code (the V1 writer, admission, release, the slot
fill) and under the model's forward, for each side.

    .venv/bin/pip install py-spy
    python -m benchmarks.profile --model tiny --batch 32 --max-tokens 64 --seconds 20

Raw collapsed stacks go to benchmarks/results/profile/ (``py-spy record --format raw``), for
flame graphs (``flamegraph.pl``, speedscope).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks import common
from benchmarks.throughput import Engine

# Frames (function names in py-spy's "function (file:line)" form) worth a line of their own.
MARKERS = {
    "steering writer (write_v1)": "write_v1 (",
    "  admit": "admit (",
    "  release": "release (",
    "  fill_token_slot": "fill_token_slot (",
    "model forward": "_model_forward (",
    "  steer (eager frames)": "steer (",
    "sampling": "sample",
}


def worker_pid(root: int) -> int:
    """The process that runs the model: the deepest descendant of ours using CPU."""
    import psutil  # optional: not a dependency of vllm-steer (vLLM brings it)

    children = psutil.Process(root).children(recursive=True)
    workers = [p for p in children if not p.children()]
    return max(workers, key=lambda p: p.cpu_times().user).pid


def shares(collapsed: Path) -> dict[str, float]:
    """Share of samples whose stack contains each marker (py-spy raw: 'frame;frame;... count')."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for name, marker in MARKERS.items():
            if marker in stack:
                counts[name] += int(count)
    return {name: counts[name] / total for name in MARKERS} | {"samples": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--configs", type=int, default=None, help="distinct configs (default: the batch)")
    parser.add_argument("--layers", choices=["one", "all"], default="all")
    parser.add_argument("--mode", choices=["add", "clamp"], default="add")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=20, help="sampling time per side")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out-dir", default=str(common.RESULTS / "profile"))
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    path, label = common.resolve_model(args.model)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine(path, steered=True, dtype=args.dtype or common.default_dtype(), max_num_seqs=args.batch,
                    max_model_len=args.prompt_len + args.max_tokens + 16)
    config = engine.config
    prompts = common.make_prompts(args.batch, args.prompt_len, config.vocab_size)
    scenario = common.Scenario(args.batch, args.configs or args.batch, args.layers, args.mode)
    specs = common.scenario_specs(scenario, config.hidden_size, config.num_hidden_layers)
    pid = worker_pid(os.getpid())
    report = {"model": label, "scenario": scenario.as_dict(), "worker_pid": pid, "sides": {}}
    try:
        engine.generate(prompts, 4, specs)  # warm up
        for kind, side_specs in (("unsteered", None), ("steered", specs)):
            stop = threading.Event()
            passes: list[float] = []

            def load(side_specs=side_specs, stop=stop, passes=passes):
                while not stop.is_set():
                    start = time.perf_counter()
                    outputs = engine.generate(prompts, args.max_tokens, side_specs)
                    passes.append(sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start))

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(1.0)
            collapsed = out_dir / f"{kind}.txt"
            subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", str(args.rate),
                            "--format", "raw", "--output", str(collapsed), "--nonblocking"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stop.set()
            thread.join()
            report["sides"][kind] = {"passes_tok_s": passes, **shares(collapsed)}
    finally:
        engine.shutdown()
    (out_dir / "profile.json").write_text(json.dumps(report, indent=2))
    print(f"{label}, {scenario.label}: share of worker samples")
    print(common.markdown_table(["frames", *report["sides"]],
                                [[name, *(report["sides"][k][name] for k in report["sides"])] for name in [*MARKERS, "samples"]]))


if __name__ == "__main__":
    main()
