"""The whole benchmark: engine throughput scenarios, stock vLLM, the notebook's method and the
server, per model; writes a JSON report (every pass, the machine), a markdown table and PNG
plots.

    vllm-steer bench --quick            # < 5 min on a 2-core CPU (= python -m benchmarks.run --quick)
    vllm-steer bench                    # CPU: the demo model and a 1B-shaped one
    vllm-steer bench --model meta-llama/Llama-3.1-8B-Instruct --dtype bfloat16   # a GPU
    vllm-steer bench --quick --docs     # --docs also refreshes docs/bench_*

Parts (``--parts``, all by default):
  engine    scenarios on one steered engine per model, alternating unsteered/steered passes
  stock     stock vLLM (no steerable layers) on the same prompts: the cost of the steerable
            architecture itself, and peak RSS with steering off (separate engine, not alternated)
  notebook  transformers + forward hooks: one chat at a time, and batched with left padding
  server    ``vllm-steer serve`` + vLLM's benchmark client, unsteered vs steered
Models: ``demo`` (the bundled demo model), ``tiny``, ``small``, ``llama-1b`` (random weights,
Llama 3.2 1B's shape, built once under .cache/), a local folder or a hub id.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common, plots, serving, throughput
from vllm_steer.lab import launcher

PARTS = ("engine", "stock", "notebook", "server")


# ---- settings ------------------------------------------------------------------------------
def defaults(quick: bool, gpu: bool) -> dict[str, Any]:
    if gpu:
        return dict(models=None, batches=[1, 8, 32, 128, 256], configs=[1, 16, 256], fractions=[0, 0.25, 0.5],
                    prompt_len=128, max_tokens=128, pairs=3, chats=4, parts=list(PARTS), server_models=None,
                    server_requests=512, server_concurrency=256, server_pairs=2, server_max_tokens=128)
    if quick:
        return dict(models=["smollm2", "llama-1b"], batches=[1, 8], configs=[1, 8], fractions=[0.5],
                    prompt_len=32, max_tokens=16, pairs=2, chats=1, parts=["engine", "notebook", "server"],
                    server_models=["demo"], server_requests=32, server_concurrency=8, server_pairs=2,
                    server_max_tokens=16)
    # CPU prefill is slow (a 1B model: ~20 s for 32 prompts of 32 tokens), so prompts stay short.
    return dict(models=["demo", "smollm2", "llama-1b"], batches=[1, 8, 32], configs=[1, 4, 32], fractions=[0, 0.25, 0.5],
                prompt_len=32, max_tokens=64, pairs=3, chats=2, parts=list(PARTS), server_models=None,
                server_requests=64, server_concurrency=32, server_pairs=2, server_max_tokens=32)


def parse_args(argv: list[str], prog: str = "python -m benchmarks.run") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small configuration that finishes in < 5 min on 2 CPU cores")
    parser.add_argument("--models", nargs="+", default=None, help="models for the engine, stock and notebook parts")
    parser.add_argument("--model", action="append", default=None, help="one more model (repeatable), e.g. a hub id on a GPU")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes; the largest is the base scenario's")
    parser.add_argument("--configs", type=int, nargs="+", default=None, help="distinct configs at the largest batch (1 = one shared spec)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="shares of the batch steered (1.0 is always run)")
    parser.add_argument("--no-layers", action="store_true", help="skip the 1-layer scenario")
    parser.add_argument("--no-modes", action="store_true", help="skip the clamp, range and condition scenarios")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (ignore_eos)")
    parser.add_argument("--pairs", type=int, default=None, help="steered passes per scenario, each between two unsteered ones")
    parser.add_argument("--min-pass-seconds", type=float, default=2.0,
                        help="a pass repeats its batch often enough to last this long, counted once per scenario "
                             "(small models finish a batch in ms); 0: one generation per pass")
    parser.add_argument("--max-directions", type=int, default=4)
    parser.add_argument("--engine-args", default="{}", help="JSON of extra vllm.LLM keyword arguments")
    parser.add_argument("--chats", type=int, default=None, help="prompts the notebook generates one at a time")
    parser.add_argument("--notebook-threads", type=int, default=None,
                        help="torch threads of the notebook baseline (default: torch's, all cores; the engine's "
                             "CPU worker computes on all cores but one)")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="run the notebook baseline with glibc's default malloc (slower on some VMs; see notebook.py)")
    parser.add_argument("--server-models", nargs="+", default=None, help="default: the same models")
    parser.add_argument("--server-requests", type=int, default=None)
    parser.add_argument("--server-concurrency", type=int, default=None)
    parser.add_argument("--server-max-tokens", type=int, default=None)
    parser.add_argument("--server-pairs", type=int, default=None)
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/quick or benchmarks/results/full")
    parser.add_argument("--docs", action="store_true", help="also write docs/bench_results.md and docs/bench_*.png")
    args = parser.parse_args(argv)
    import torch  # torch: ~2.5 s; --help and the report code (tests, write_outputs) do not need it

    gpu = torch.cuda.is_available()
    chosen_models = args.models is not None or args.model is not None
    args.models = (args.models or []) + (args.model or []) if chosen_models else None
    for key, value in defaults(args.quick, gpu).items():
        if key == "parts":
            args.parts = args.parts.split(",") if args.parts else value
        elif key == "server_models" and chosen_models:
            args.server_models = args.server_models or args.models
        elif getattr(args, key, None) is None:
            setattr(args, key, value)
    if not args.models:
        parser.error("name a model: --model meta-llama/Llama-3.1-8B-Instruct --dtype bfloat16")
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.server_models = args.server_models or args.models
    args.dtype = args.dtype or common.default_dtype()
    args.out_dir = Path(args.out_dir or common.RESULTS / ("quick" if args.quick else "full"))
    args.engine_args = json.loads(args.engine_args)
    return args


# ---- one model -------------------------------------------------------------------------------
def model_entry(name: str) -> dict[str, Any]:
    from transformers import AutoConfig  # transformers: ~4.5 s with torch; --help and the report code do not need it

    path, label = common.resolve_model(name)
    config = AutoConfig.from_pretrained(path)
    return {
        "name": name,
        "label": label,
        "path": path,
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None),
            "intermediate_size": getattr(config, "intermediate_size", None),
            "vocab_size": config.vocab_size,
        },
    }


def run_engine_parts(entry: dict[str, Any], args, log) -> None:
    config = entry["config"]
    top = max(args.batches)
    prompts = common.make_prompts(top, args.prompt_len, config["vocab_size"])
    max_model_len = args.prompt_len + args.max_tokens + 16
    chosen = common.default_scenarios(args.batches, args.configs, args.fractions,
                                      layers=not args.no_layers, modes=not args.no_modes)
    if "engine" in args.parts:
        log(f"[{entry['label']}] starting the steered engine (max_num_seqs {top})")
        with common.RssSampler() as rss:
            engine = throughput.Engine(entry["path"], steered=True, dtype=args.dtype, max_num_seqs=top,
                                       max_model_len=max_model_len, max_directions=args.max_directions,
                                       extra=args.engine_args)
            log(f"[{entry['label']}] engine up in {engine.start_seconds:.0f} s")
            try:
                throughput.warm_up(engine, common.Scenario(top, top), prompts, args.max_tokens)
                results = [throughput.run_scenario(engine, s, prompts, args.max_tokens, args.pairs, log, args.min_pass_seconds)
                           for s in common.unique_scenarios(chosen)]
                tables = engine.table_bytes()
                scheduler = dict(zip(("max_num_seqs", "max_num_batched_tokens"), engine.scheduler_limits()))
                start_seconds = engine.start_seconds
            finally:
                engine.shutdown()
        factors: dict[str, list[str]] = {}
        for factor, scenario in chosen:
            factors.setdefault(factor, []).append(scenario.label)
        entry["engine"] = {"start_seconds": start_seconds, **scheduler, "max_model_len": max_model_len,
                           "engine_args": args.engine_args, "scenarios": results, "factors": factors,
                           "peak_rss_bytes": rss.peak}
        entry.setdefault("memory", {})["steering_tables"] = tables
        entry["memory"]["peak_rss_steered_engine"] = rss.peak
    if "stock" in args.parts:
        log(f"[{entry['label']}] starting stock vLLM")
        with common.RssSampler() as rss:
            engine = throughput.Engine(entry["path"], steered=False, dtype=args.dtype, max_num_seqs=top,
                                       max_model_len=max_model_len, extra=args.engine_args)
            try:
                throughput.warm_up(engine, common.Scenario(top, top), prompts, args.max_tokens)
                batches = throughput.run_stock(engine, args.batches, prompts, args.max_tokens, args.pairs, log,
                                               args.min_pass_seconds)
            finally:
                engine.shutdown()
        entry["stock"] = {"batches": batches, "peak_rss_bytes": rss.peak}
        entry.setdefault("memory", {})["peak_rss_stock_engine"] = rss.peak
    if "notebook" in args.parts:
        from benchmarks import notebook  # imports torch (~2.5 s): --help and the report code do not need it

        log(f"[{entry['label']}] the notebook's method (transformers + hooks, in a subprocess)")
        result = notebook.run_subprocess(entry["name"], dtype=args.dtype, batch=top, prompt_len=args.prompt_len,
                                         max_tokens=args.max_tokens, chats=args.chats,
                                         out=args.out_dir / f"notebook-{entry['name'].replace('/', '_')}.json",
                                         tuned_malloc=not args.plain_malloc, threads=args.notebook_threads)
        entry["notebook"] = result
        log(f"  notebook: one chat at a time {result['one_at_a_time']['output_tok_s']:.2f} tok/s, "
            f"batched x{top} {result['batched']['output_tok_s']:.2f} tok/s")
    entry["speedup"] = speedups(entry)


def run_server_part(entry: dict[str, Any], args, log) -> None:
    config = entry["config"]
    prompts = common.make_prompts(args.server_requests, args.prompt_len, config["vocab_size"], seed=2)
    specs = common.scenario_specs(common.Scenario(args.server_requests, args.server_requests),
                                  config["hidden_size"], config["num_hidden_layers"])
    log(f"[{entry['label']}] starting vllm-steer serve")
    started = time.perf_counter()
    process, url = serving.start_server(entry["path"], args.out_dir / f"server-{entry['name'].replace('/', '_')}.log",
                                        dtype=args.dtype, max_num_seqs=args.server_concurrency,
                                        max_model_len=args.prompt_len + args.server_max_tokens + 16)
    try:
        with common.RssSampler(process.pid, include_root=True) as rss:
            result = serving.run(url, entry["path"], entry["path"], prompts, specs,
                                 args.server_max_tokens, args.server_concurrency, args.server_pairs, log=log)
    finally:
        launcher.stop_server(process)
    entry["server"] = {"start_seconds": time.perf_counter() - started, "peak_rss_bytes": rss.peak, **result}


def speedups(entry: dict[str, Any]) -> dict[str, Any]:
    """vllm-steer (steered, every request its own vector) over the notebook's method."""
    notebook = entry.get("notebook")
    engine = entry.get("engine")
    if not notebook or not engine:
        return {}
    steered = {}
    for result in engine["scenarios"]:
        s = result["scenario"]
        if s["configs"] == s["batch"] and s["layers"] == "all" and s["mode"] == "add" and s["fraction"] == 1.0:
            steered[s["batch"]] = result["median"][common.STEERED]["output_tok_s"]
    one = notebook["one_at_a_time"]["output_tok_s"]
    batched = notebook["batched"]
    return {
        "vs_one_at_a_time": {str(b): v / one for b, v in sorted(steered.items())},
        "vs_batched": {str(batched["batch"]): steered[batched["batch"]] / batched["output_tok_s"]}
        if batched["batch"] in steered else {},
    }


def find(entry: dict[str, Any], **fields) -> dict[str, Any] | None:
    for result in (entry.get("engine") or {}).get("scenarios", []):
        if all(result["scenario"].get(k) == v for k, v in fields.items()):
            return result
    return None


def targets(entry: dict[str, Any]) -> dict[str, Any]:
    """The issues' targets, measured (never asserted): all-distinct every-layer ratio >= 0.95;
    every fully steered scenario at the largest batch >= 0.98; 1 vs batch-size distinct configs
    within 2%; >= 10x the notebook one chat at a time at batch 32."""
    engine = entry.get("engine")
    if not engine:
        return {}
    top = engine["max_num_seqs"]
    base = find(entry, batch=top, configs=top, layers="all", mode="add", fraction=1.0)
    shared = find(entry, batch=top, configs=1, layers="all", mode="add", fraction=1.0)
    out: dict[str, Any] = {}
    if base:
        out["all_distinct_every_layer_ratio"] = base["ratio"]["output_tok_s"]
        out["all_distinct_every_layer_ratio_ok"] = base["ratio"]["output_tok_s"] >= 0.95
    full = [r for r in engine["scenarios"] if r["scenario"]["batch"] == top and r["scenario"]["fraction"] == 1.0]
    if full:
        lowest = min(full, key=lambda r: r["ratio"]["output_tok_s"])
        out["lowest_fully_steered_ratio"] = lowest["ratio"]["output_tok_s"]
        out["lowest_fully_steered_scenario"] = lowest["scenario"]["label"]
        out["lowest_fully_steered_ratio_ok"] = lowest["ratio"]["output_tok_s"] >= 0.98
    if base and shared:
        gap = abs(base["ratio"]["output_tok_s"] - shared["ratio"]["output_tok_s"])
        out["shared_vs_distinct_gap"] = gap
        out["shared_vs_distinct_gap_ok"] = gap <= 0.02
    vs_one = (entry.get("speedup") or {}).get("vs_one_at_a_time") or {}
    if vs_one:
        batch = "32" if "32" in vs_one else max(vs_one, key=int)
        out["speedup_vs_notebook_batch"] = int(batch)
        out["speedup_vs_notebook"] = vs_one[batch]
        out["speedup_vs_notebook_ok"] = vs_one[batch] >= 10
    return out


# ---- markdown ---------------------------------------------------------------------------------
def render_markdown(report: dict[str, Any]) -> str:
    S, U = common.STEERED, common.UNSTEERED
    lines = [f"Machine: {common.describe_machine(report['machine'])}; load average at start "
             f"{report['machine'].get('load_average_at_start')}, at end {report.get('load_average_at_end')}.",
             f"Command: `{report['command']}` ({report['seconds']:.0f} s)."]
    settings = report["settings"]
    for entry in report["models"]:
        lines += ["", f"### {entry['label']}", ""]
        cfg = entry["config"]
        lines.append(f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / "
                     f"{cfg['num_key_value_heads']} KV heads, vocab {cfg['vocab_size']}; {settings['dtype']}; prompts of "
                     f"{settings['prompt_len']} tokens, {settings['max_tokens']} output tokens each (ignore_eos, greedy); "
                     f"{settings['pairs']} steered passes per row, each between two unsteered ones.")
        engine = entry.get("engine")
        if engine:
            lines += ["", "Engine, one process, alternating passes (tok/s: each side's median; ratio: the median over "
                          "steered passes of each one's tok/s over the mean of the unsteered passes either side of it, "
                          "which cancels the machine's drift; IQR: the interquartile range of those ratios; spread: the "
                          "widest (max - min) / median of either side's passes):", "",
                      common.markdown_table(
                ["varies", "batch", "distinct configs", "steered", "layers", "mode", "unsteered tok/s", "steered tok/s",
                 "ratio (output)", "IQR", "ratio (total)", "spread"],
                [[factor, r["scenario"]["batch"], r["scenario"]["distinct"], f"{r['scenario']['fraction']:.0%}",
                  r["scenario"]["layers"], r["scenario"]["mode"], r["median"][U]["output_tok_s"],
                  r["median"][S]["output_tok_s"], r["ratio"]["output_tok_s"], _iqr(r), r["ratio"]["total_tok_s"],
                  _spread(r)]
                 for factor, r in unique_rows(entry)])]
        stock = entry.get("stock")
        if stock and engine:
            steerable = {r["scenario"]["batch"]: r["median"][U]["output_tok_s"] for _, r in engine_rows(entry, "batch")}
            lines += ["", "Stock vLLM (no steerable layers; a separate engine, run after, so not drift-cancelled):", "",
                      common.markdown_table(
                          ["batch", "stock vLLM tok/s", "vllm-steer unsteered tok/s", "vllm-steer steered tok/s", "steered / stock"],
                          [[r["batch"], r["median"][U]["output_tok_s"], steerable.get(r["batch"]),
                            steered_at(entry, r["batch"]),
                            None if steered_at(entry, r["batch"]) is None else steered_at(entry, r["batch"]) / r["median"][U]["output_tok_s"]]
                           for r in stock["batches"]])]
        notebook = entry.get("notebook")
        if notebook:
            speed = entry.get("speedup") or {}
            batched = notebook["batched"]
            top = batched["batch"]
            lines += ["", "The notebook's method (transformers + forward hooks, the same steering: every request its own "
                          "vector on every layer):", "",
                      common.markdown_table(
                          ["method", "output tok/s", f"vllm-steer b{top} steered, speedup"],
                          [["one chat at a time" + f" ({notebook['one_at_a_time']['requests']} timed)",
                            notebook["one_at_a_time"]["output_tok_s"], _times(speed.get("vs_one_at_a_time", {}).get(str(top)))],
                           [f"batched x{top}, left padding", batched["output_tok_s"], _times(speed.get("vs_batched", {}).get(str(top)))],
                           [f"vllm-steer b{top}, steered", steered_at(entry, top), None]])]
        server = entry.get("server")
        if server:
            rows = [[name, server["median"][U].get(name), server["median"][S].get(name), server["ratio"].get(name)]
                    for name in server["ratio"]]
            lines += ["", f"Server (`vllm-steer serve`, vLLM's benchmark client, {server['requests']} requests, "
                          f"{server['concurrency']} concurrent, {server['max_tokens']} output tokens; steered: every "
                          f"request its own vector on every layer):", "",
                      common.markdown_table(["metric", "unsteered", "steered", "ratio"], rows)]
        memory = entry.get("memory") or {}
        tables = memory.get("steering_tables")
        if tables:
            lines += ["", f"Steering tables (max_num_seqs {engine['max_num_seqs']}, max_directions {settings['max_directions']}): "
                          f"a pool of {tables['rows']} rows ({tables['pool'] / 2**20:.2f} MiB; every request steering "
                          f"every layer differently would need {tables['worst_case_rows']}), {tables['total'] / 2**20:.1f} MiB in all."
                          + _rss_sentence(memory)]
        goals = entry.get("targets") or {}
        if goals:
            lines += ["", "Targets: " + "; ".join(_target_sentences(goals)) + "."]
    return "\n".join(lines) + "\n"


def _rss_sentence(memory: dict[str, Any]) -> str:
    on, off = memory.get("peak_rss_steered_engine"), memory.get("peak_rss_stock_engine")
    if on and off:
        return f" Engine peak RSS: {on / 2**30:.2f} GiB steerable, {off / 2**30:.2f} GiB stock ({(on - off) / 2**20:+.0f} MiB)."
    if on:
        return f" Engine peak RSS: {on / 2**30:.2f} GiB (steerable; stock not measured in this run)."
    return ""


def _target_sentences(goals: dict[str, Any]) -> list[str]:
    out = []
    if "all_distinct_every_layer_ratio" in goals:
        out.append(f"all distinct, every layer {goals['all_distinct_every_layer_ratio']:.3f} "
                   f"({'meets' if goals['all_distinct_every_layer_ratio_ok'] else 'misses'} >= 0.95)")
    if "lowest_fully_steered_ratio" in goals:
        out.append(f"lowest fully steered scenario {goals['lowest_fully_steered_ratio']:.3f} "
                   f"({goals['lowest_fully_steered_scenario']}; "
                   f"{'meets' if goals['lowest_fully_steered_ratio_ok'] else 'misses'} >= 0.98)")
    if "shared_vs_distinct_gap" in goals:
        out.append(f"1 vs all distinct configs differ by {goals['shared_vs_distinct_gap']:.3f} "
                   f"({'within' if goals['shared_vs_distinct_gap_ok'] else 'outside'} 0.02)")
    if "speedup_vs_notebook" in goals:
        batch = goals["speedup_vs_notebook_batch"]
        verdict = ("meets" if goals["speedup_vs_notebook_ok"] else "misses") if batch == 32 else "the target is at batch 32"
        out.append(f"batch {batch} vs the notebook one chat at a time {goals['speedup_vs_notebook']:.1f}x ({verdict}: >= 10x)")
    return out


def _times(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}x"


def engine_rows(entry: dict[str, Any], only: str | None = None):
    engine = entry.get("engine") or {}
    by_label = {r["scenario"]["label"]: r for r in engine.get("scenarios", [])}
    for factor, labels in engine.get("factors", {}).items():
        if only is None or factor == only:
            for label in labels:
                if label in by_label:
                    yield factor, by_label[label]


def unique_rows(entry: dict[str, Any]):
    """Each scenario once: the base (largest batch, all distinct, every layer, add, all
    steered) first, then each other one under the factor it varies."""
    top = (entry.get("engine") or {}).get("max_num_seqs")
    rows, seen = [], set()
    for factor, result in engine_rows(entry):
        s = result["scenario"]
        if s["label"] in seen:
            continue
        seen.add(s["label"])
        base = (s["batch"], s["configs"], s["layers"], s["mode"], s["fraction"]) == (top, top, "all", "add", 1.0)
        rows.append(("base", result) if base else (factor, result))
    return sorted(rows, key=lambda row: row[0] != "base")


def _iqr(result: dict[str, Any]) -> str | None:
    iqr = (result.get("ratio_iqr") or {}).get("output_tok_s")
    return None if not iqr else f"{iqr[0]:.3f}-{iqr[1]:.3f}"


def _spread(result: dict[str, Any]) -> str | None:
    spread = result.get("spread")
    if not spread:
        return None
    return f"{max(spread.values()):.1%}"


def steered_at(entry: dict[str, Any], batch: int) -> float | None:
    found = find(entry, batch=batch, configs=batch, layers="all", mode="add", fraction=1.0)
    return None if found is None else found["median"][common.STEERED]["output_tok_s"]


# ---- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None, program: str = "python -m benchmarks.run") -> dict[str, Any]:
    """``program`` is how the report names the command that made it."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, program)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    clock = common.Stopwatch()

    def log(message: str) -> None:
        print(f"[{clock():6.0f}s] {message}", flush=True)

    report: dict[str, Any] = {
        "command": " ".join([program, *argv]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": common.machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": [],
    }
    log(f"machine: {common.describe_machine(report['machine'])}; load average {report['machine']['load_average_at_start']}")
    entries: dict[str, dict[str, Any]] = {}
    if set(args.parts) & {"engine", "stock", "notebook"}:
        for name in args.models:
            entries[name] = model_entry(name)
            run_engine_parts(entries[name], args, log)
            save(report, entries, clock(), args)
    if "server" in args.parts:
        for name in args.server_models:
            entries.setdefault(name, model_entry(name))
            run_server_part(entries[name], args, log)
            save(report, entries, clock(), args)
    report = save(report, entries, clock(), args)
    written = write_outputs(report, args.out_dir, docs=args.docs)
    log("wrote " + ", ".join(str(p) for p in written))
    print(render_markdown(report))
    return report


def save(report: dict[str, Any], entries: dict[str, dict[str, Any]], seconds: float, args) -> dict[str, Any]:
    for entry in entries.values():
        entry["targets"] = targets(entry)
    report.update(models=list(entries.values()), seconds=seconds, load_average_at_end=common.load_average())
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def write_outputs(report: dict[str, Any], out_dir: Path, docs: bool = False) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    table = out_dir / "report.md"
    table.write_text(render_markdown(report))
    written = [out_dir / "report.json", table, *plots.plot_report(report, out_dir)]
    if docs:
        target = common.ROOT / "docs"
        target.mkdir(exist_ok=True)
        shutil.copy(table, target / "bench_results.md")
        for path in written[2:]:
            shutil.copy(path, target / path.name)
        written += [target / "bench_results.md", *(target / p.name for p in written[2:])]
    return written


if __name__ == "__main__":
    main()
