"""Server throughput and latency, steered vs unsteered: many concurrent streaming clients
against ``vllm-steer serve`` on a local port, driven by vLLM's own benchmark client
(``vllm.benchmarks.serve.benchmark``: its request functions, TTFT/TPOT/ITL accounting and
percentiles), with steering added per request through the body's ``steering`` field
(``SampleRequest.request_overrides``). Runs alternate (unsteered, steered, ...) against the
one server; the report is the median of each metric per side and the steered/unsteered
ratio of the throughputs.

    python -m benchmarks.serving --model llama-1b --requests 32 --concurrency 16 --max-tokens 32
    python -m benchmarks.serving --url http://127.0.0.1:8000 --served-model demo   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from vllm_steer.lab import launcher

PERCENTILES = [50.0, 90.0, 99.0]
LATENCIES = ["ttft", "tpot", "itl", "e2el"]
THROUGHPUTS = ["request_throughput", "output_throughput", "total_token_throughput"]


def start_server(model: str, log: Path, *, dtype: str, max_num_seqs: int, max_model_len: int,
                 extra: Sequence[str] = (), timeout: float = 900) -> tuple[subprocess.Popen, str]:
    """``vllm-steer serve`` for ``model``, sized for the benchmark; returns (process, url)."""
    import torch  # torch and transformers: ~4.5 s; the client side (run, summarize_runs) needs neither
    from transformers import AutoConfig

    args = [
        "--model", model, "--dtype", dtype, "--seed", "0",
        "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len), "--no-enable-prefix-caching",
    ]
    if not torch.cuda.is_available():
        config = AutoConfig.from_pretrained(model)
        args += ["--kv-cache-memory-bytes", str(common.kv_cache_bytes(config, max_num_seqs, max_model_len, dtype))]
    return launcher.start_server([*args, *extra], log, timeout=timeout)


def sample_requests(prompts: Sequence[Sequence[int]], max_tokens: int, specs: Sequence[dict | None] | None):
    from vllm.benchmarks.datasets import SampleRequest  # vLLM: ~8 s to import; run.py and the tests import this module

    specs = specs or [None] * len(prompts)
    return [
        SampleRequest(prompt=list(p), prompt_len=len(p), expected_output_len=max_tokens,
                      request_overrides=None if spec is None else {"steering": spec})
        for p, spec in zip(prompts, specs)
    ]


async def _benchmark(url: str, served_model: str, tokenizer, requests, concurrency: int, api_key: str | None) -> dict:
    from vllm.benchmarks.serve import TaskType, benchmark  # vLLM: ~8 s to import

    return await benchmark(
        task_type=TaskType.GENERATION, endpoint_type="openai", api_url=f"{url}/v1/completions", base_url=url,
        model_id=served_model, model_name=served_model, tokenizer=tokenizer, input_requests=requests,
        logprobs=None, request_rate=float("inf"), burstiness=1.0, disable_tqdm=True, num_warmups=0, profile=False,
        selected_percentile_metrics=LATENCIES, selected_percentiles=PERCENTILES, ignore_eos=True,
        goodput_config_dict={}, max_concurrency=concurrency, lora_modules=None,
        extra_headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        extra_body={"temperature": 0.0}, ready_check_timeout_sec=60,
    )


def one_run(url: str, served_model: str, tokenizer, requests, concurrency: int, kind: str, index: int,
            api_key: str | None = None) -> dict[str, Any]:
    """One run of vLLM's benchmark client; scalar metrics only (its per-request lists dropped)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):  # its prints and progress bars
        result = asyncio.run(_benchmark(url, served_model, tokenizer, requests, concurrency, api_key))
    if result["failed"]:
        errors = [e for e in result["errors"] if e]
        raise RuntimeError(f"{result['failed']} of {len(requests)} requests failed, e.g. {errors[:1]}")
    record = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    record.update(kind=kind, index=index, load_average=common.load_average())
    return record


def metric_names(record: dict[str, Any]) -> list[str]:
    names = [m for m in THROUGHPUTS if m in record]
    for latency in LATENCIES:
        names += [k for k in record if k.endswith(f"_{latency}_ms") and k.startswith("p")]
    return names


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every throughput and latency metric per side; steered/unsteered ratios."""
    names = metric_names(runs[0])
    return common.summarize(runs, names)


def run(url: str, served_model: str, tokenizer_path: str, prompts, specs, max_tokens: int, concurrency: int,
        pairs: int, api_key: str | None = None, log=print) -> dict[str, Any]:
    from vllm.tokenizers import get_tokenizer  # vLLM: ~8 s to import; run.py and the tests import this module

    tokenizer = get_tokenizer(tokenizer_path)
    unsteered = sample_requests(prompts, max_tokens, None)
    steered = sample_requests(prompts, max_tokens, specs)
    # Warm up both paths with the timed request sets themselves: a smaller warm-up left the
    # first timed pass meeting new batch shapes (its TTFT was 10x the others').
    one_run(url, served_model, tokenizer, unsteered, concurrency, "warmup", -1, api_key)
    one_run(url, served_model, tokenizer, steered, concurrency, "warmup", -1, api_key)
    runs = []
    for index, kind in enumerate(common.alternation(pairs)):
        runs.append(one_run(url, served_model, tokenizer, steered if kind == common.STEERED else unsteered,
                            concurrency, kind, index, api_key))
        log(f"  server {kind}: {runs[-1]['output_throughput']:.1f} tok/s, "
            f"p50 TTFT {runs[-1]['median_ttft_ms']:.0f} ms, p50 TPOT {runs[-1]['median_tpot_ms']:.0f} ms")
    summary = summarize_runs(runs)
    return {"requests": len(prompts), "concurrency": concurrency, "max_tokens": max_tokens, "runs": runs,
            "server_steering_counters": steering_counters(url, api_key), **summary}


def steering_counters(url: str, api_key: str | None = None) -> dict[str, float]:
    """The server's own count of requests by steering kind (``vllm_steer_requests_total``):
    evidence that the steered runs were steered."""
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    counters = {}
    for line in text.splitlines():
        if line.startswith("vllm_steer_requests_total"):
            name, value = line.rsplit(" ", 1)
            counters[name] = float(value)
    return counters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="demo, tiny, small, llama-1b, a folder or a hub id")
    parser.add_argument("--url", default=None, help="a running server (default: start vllm-steer serve)")
    parser.add_argument("--served-model", default=None, help="the model name the running server answers to")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", default=str(common.RESULTS / "serving.json"))
    args = parser.parse_args(argv)
    from transformers import AutoConfig  # transformers: ~4.5 s with torch; --help does not need it

    path, label = common.resolve_model(args.model)
    config = AutoConfig.from_pretrained(path)
    prompts = common.make_prompts(args.requests, args.prompt_len, config.vocab_size)
    specs = common.scenario_specs(common.Scenario(args.requests, args.requests), config.hidden_size, config.num_hidden_layers)
    process = None
    url = args.url
    if url is None:
        process, url = start_server(path, Path(args.out).with_suffix(".server.log"), dtype=args.dtype or common.default_dtype(),
                                    max_num_seqs=args.concurrency, max_model_len=args.prompt_len + args.max_tokens + 16)
    try:
        report = run(url, args.served_model or path, path, prompts, specs, args.max_tokens, args.concurrency, args.pairs, args.api_key)
    finally:
        if process is not None:
            launcher.stop_server(process)
    report = {"model": label, **report}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median", "ratio")}, indent=2))


if __name__ == "__main__":
    main()
