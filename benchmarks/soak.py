"""A bounded soak test of the steering server: many concurrent clients sending random mixes
of unsteered requests, shared specs, inline per-request vectors and notebook features,
streaming or not, some cancelled mid-stream. Then every completed greedy response is
compared with the same request sent alone, the steering slots are counted (all must be
free) and the server's memory is compared with its baseline.

    python -m benchmarks.soak                      # starts `vllm-steer serve` (the demo) itself
    python -m benchmarks.soak --url http://127.0.0.1:8000 --model demo --requests 500 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks import common
from vllm_steer.lab import launcher

PROMPTS = ["Tell me a story.", "Who are you?", "Tell me about the ocean.", "What should I cook tonight?", "Paris"]


@dataclass(frozen=True)
class Job:
    prompt: str
    spec: str | None  # JSON text, so jobs hash and compare by content
    stream: bool
    cancel: bool
    max_tokens: int


def make_jobs(count: int, hidden: int, features: list[list], seed: int = 0) -> list[Job]:
    generator = random.Random(seed)
    # features: [layer, feature_id, strength] with strength ~ the vector's norm (reduced_strengths off)
    shared = [
        {"features": [features[0]], "scale": 1.0, "clamp": True, "reduced_strengths": False},
        {"features": features[:2], "scale": 0.8, "reduced_strengths": False},
    ]
    jobs = []
    for _ in range(count):
        kind = generator.choice(["none", "shared", "inline", "features"])
        if kind == "none":
            spec = None
        elif kind == "shared":
            spec = generator.choice(shared)
        elif kind == "inline":  # a distinct vector per request
            vector = [generator.gauss(0.0, 1.0) for _ in range(hidden)]
            spec = {"vectors": [{"vector": vector, "layers": [generator.randrange(0, 2)], "scale": generator.uniform(1, 4)}]}
        else:
            spec = {"features": [generator.choice(features)], "scale": generator.uniform(0.5, 2.0),
                    "clamp": generator.random() < 0.5, "reduced_strengths": False}
        stream = generator.random() < 0.5
        jobs.append(Job(generator.choice(PROMPTS), None if spec is None else json.dumps(spec), stream,
                        stream and generator.random() < 0.2, generator.randrange(4, 17)))
    return jobs


def body(job: Job, model: str, stream: bool) -> dict:
    request = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "stream": stream}
    if job.spec is not None:
        request["steering"] = json.loads(job.spec)
    return request


async def run_job(client: httpx.AsyncClient, model: str, job: Job) -> tuple[str, str | None]:
    """(outcome, text): outcome is "ok", "cancelled" or an error kind."""
    try:
        if not job.stream:
            response = await client.post("/v1/completions", json=body(job, model, False))
            if response.status_code != 200:
                return f"http {response.status_code}", None
            return "ok", response.json()["choices"][0]["text"]
        text, chunks = "", 0
        async with client.stream("POST", "/v1/completions", json=body(job, model, True)) as response:
            if response.status_code != 200:
                return f"http {response.status_code}", None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                text += "".join(choice["text"] for choice in chunk["choices"])
                chunks += 1
                if job.cancel and chunks >= 2:
                    return "cancelled", None  # leaving the block closes the connection mid-stream
        return "ok", text
    except httpx.HTTPError as exc:
        return type(exc).__name__, None


async def soak(url: str, model: str, jobs: list[Job], concurrency: int, headers: dict) -> list[tuple[str, str | None]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:

        async def one(job: Job):
            async with limit:
                return await run_job(client, model, job)

        return await asyncio.gather(*(one(job) for job in jobs))


def alone(url: str, model: str, jobs: list[Job], headers: dict) -> dict[Job, str]:
    """Each distinct request, sent by itself and not streamed."""
    answers = {}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        for job in jobs:
            key = Job(job.prompt, job.spec, False, False, job.max_tokens)
            if key not in answers:
                response = client.post("/v1/completions", json=body(job, model, False))
                response.raise_for_status()
                answers[key] = response.json()["choices"][0]["text"]
    return answers


def settled_slots(url: str, model: str, headers: dict) -> list[int]:
    """Slots held per worker once finished requests are released (vLLM tells workers about
    finished requests with the next step: send one unsteered token first)."""
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}).raise_for_status()
        return [w["slots_in_use"] for w in client.get("/v1/steering/stats").json()["workers"]]


def served_vectors(url: str, headers: dict) -> tuple[int, list[list]]:
    """The server's hidden size, and its notebook features as ``[layer, feature_id, norm]``."""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        listed = client.get("/v1/steering/vectors").json()["data"]
    features = [
        [int(e["name"][1:].split("/F")[0]), int(e["name"].split("/F")[1]), round(e["norm"], 3)]
        for e in listed if e["name"].startswith("L") and "/F" in e["name"]
    ]
    return listed[0]["dimension"], features


def soak_arguments(doc: str, *, requests: int, concurrency: int, out: str) -> argparse.ArgumentParser:
    """The options both soaks take (each adds its own ``--url``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--concurrency", type=int, default=concurrency)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(common.RESULTS / out))
    return parser


def auth(api_key: str | None) -> dict:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def run(url: str, model: str, count: int, concurrency: int, headers: dict, server_pid: int | None, seed: int = 0) -> dict:
    hidden, features = served_vectors(url, headers)
    jobs = make_jobs(count, hidden, features, seed)
    # Warm up (compile, allocator pools at full concurrency), then take the memory baseline.
    asyncio.run(soak(url, model, make_jobs(2 * concurrency, hidden, features, seed + 1), concurrency, headers))
    settled_slots(url, model, headers)
    baseline = common.tree_rss(server_pid) / 2**20 if server_pid else None
    started = time.perf_counter()
    outcomes = asyncio.run(soak(url, model, jobs, concurrency, headers))
    elapsed = time.perf_counter() - started
    slots = settled_slots(url, model, headers)
    after = common.tree_rss(server_pid) / 2**20 if server_pid else None
    expected = alone(url, model, [job for job, (kind, _) in zip(jobs, outcomes) if kind == "ok"], headers)
    mismatches = sum(
        1 for job, (kind, text) in zip(jobs, outcomes)
        if kind == "ok" and text != expected[Job(job.prompt, job.spec, False, False, job.max_tokens)]
    )
    kinds = Counter(kind for kind, _ in outcomes)
    return {
        "requests": count,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "completed": kinds.pop("ok", 0),
        "cancelled": kinds.pop("cancelled", 0),
        "errors": dict(kinds),
        "mismatches": mismatches,
        "distinct_requests": len(expected),
        "slots_in_use_after": slots,
        "rss_mib_before": None if baseline is None else round(baseline, 1),
        "rss_mib_after": None if after is None else round(after, 1),
    }


def main() -> None:
    parser = soak_arguments(__doc__, requests=500, concurrency=64, out="soak.json")
    parser.add_argument("--url", default=None, help="a running server (default: start the demo server)")
    args = parser.parse_args()
    headers = auth(args.api_key)
    process = None
    url = args.url
    if url is None:
        process, url = launcher.start_server(["--max-num-seqs", "64"], Path(args.out).with_suffix(".server.log"), timeout=600)
    try:
        report = run(url, args.model, args.requests, args.concurrency, headers, process.pid if process else None, args.seed)
    finally:
        if process is not None:
            launcher.stop_server(process)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
