"""A bounded soak of replicas sharing one registry directory, as behind a router with no
affinity: each request (and each turn of a conversation) goes to a random replica, while
vectors are registered, replaced and deleted on random replicas.

Traffic: unsteered, shared specs, distinct inline vectors, notebook features, conditions,
stable named vectors, two-turn chats, and names that churn during the run. Afterwards every
completed answer is compared with the same request sent alone; a churned name's answer with
the version its fingerprint names (an inline vector has the fingerprint of a named one with
the same content). A churned name may be refused (400) once deleted: those are the only
errors allowed. Then every replica must hold the same registry, on its front end and its
workers, and no steering slot.

    python -m benchmarks.fleet_soak                 # starts two servers on the demo model
    python -m benchmarks.fleet_soak --url http://a:8000 --url http://b:8000 --model demo
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.soak import PROMPTS, auth, make_jobs, served_vectors, settled_slots, soak_arguments
from vllm_steer.lab import launcher

STABLE = ("fleet-a", "fleet-b")
CHURNED = ("churn-0", "churn-1", "churn-2")
FINGERPRINT = "x-vllm-steer-fingerprint"


@dataclass(frozen=True)
class Request:
    """One completion, or one turn of a chat (``messages``: JSON text of the turns before)."""

    prompt: str
    spec: str | None
    max_tokens: int
    messages: str | None = None

    def body(self, model: str, steering: dict | None = None) -> tuple[str, dict]:
        spec = steering if steering is not None else (json.loads(self.spec) if self.spec else None)
        if self.messages is None:
            path, request = "/v1/completions", {"prompt": self.prompt}
        else:
            path, request = "/v1/chat/completions", {"messages": json.loads(self.messages)}
        request.update(model=model, max_tokens=self.max_tokens, temperature=0)
        if spec is not None:
            request["steering"] = spec
        return path, request


def text_of(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def traffic(count: int, hidden: int, features: list[list], seed: int) -> list[list[Request]]:
    """Each job is a list of requests sent in turn (a chat's turns; one request otherwise)."""
    generator = random.Random(seed)
    base = iter(make_jobs(count, hidden, features, seed))
    jobs = []
    for _ in range(count):
        kind = generator.choice(["soak", "soak", "named", "churned", "condition", "chat"])
        tokens = generator.randrange(4, 13)
        prompt = generator.choice(PROMPTS)
        if kind == "soak":  # unsteered, shared, inline or features (benchmarks.soak's mix)
            job = next(base)
            jobs.append([Request(job.prompt, job.spec, job.max_tokens)])
            continue
        if kind in ("named", "churned", "chat"):
            name = generator.choice(STABLE if kind != "churned" else CHURNED)
            spec = {"vectors": [{"name": name, "layers": [generator.randrange(0, 2)], "scale": generator.uniform(1, 4)}]}
        else:  # a condition on a stable name's direction, held or not
            spec = {"vectors": [{"name": STABLE[0], "layers": [1], "scale": 3.0}],
                    "condition": {"layer": 1, "vector": [1.0] * hidden, "threshold": generator.choice([-1e9, 1e9])}}
        text = json.dumps(spec)
        if kind != "chat":
            jobs.append([Request(prompt, text, tokens)])
        else:  # the second turn's messages hold the first's answer: filled in when it comes
            jobs.append([Request(prompt, text, tokens, json.dumps([{"role": "user", "content": prompt}])),
                         Request(generator.choice(PROMPTS), text, tokens, "")])
    return jobs


async def send(client: httpx.AsyncClient, url: str, model: str, request: Request) -> tuple[str, str | None, str | None]:
    """(outcome, text, fingerprint); outcome "ok", "http <status>" or an error kind."""
    path, body = request.body(model)
    try:
        response = await client.post(url + path, json=body)
    except httpx.HTTPError as exc:
        return type(exc).__name__, None, None
    if response.status_code != 200:
        return f"http {response.status_code}", response.text, None
    return "ok", text_of(response.json()), response.headers.get(FINGERPRINT)


async def run_jobs(urls: list[str], model: str, jobs: list[list[Request]], concurrency: int, headers: dict, seed: int):
    """Every job's requests with their outcomes, sent to random replicas."""
    generator = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:

        async def job(requests: list[Request]) -> list[tuple[Request, tuple]]:
            done, before = [], None
            async with limit:
                for request in requests:
                    if request.messages == "":  # the second turn: the first's turn, its answer, a question
                        if before is None:
                            break
                        turns = json.loads(done[0][0].messages) + [{"role": "assistant", "content": before},
                                                                    {"role": "user", "content": request.prompt}]
                        request = Request(request.prompt, request.spec, request.max_tokens, json.dumps(turns))
                    outcome = await send(client, generator.choice(urls), model, request)
                    done.append((request, outcome))
                    before = outcome[1] if outcome[0] == "ok" else None
            return done

        return [pair for pairs in await asyncio.gather(*(job(requests) for requests in jobs)) for pair in pairs]


async def churn(urls: list[str], hidden: int, headers: dict, seed: int, stop: asyncio.Event, versions: dict) -> Counter:
    """Register, replace and delete the churned names on random replicas until ``stop``;
    ``versions`` collects every vector each name pointed at."""
    generator, changes = random.Random(seed), Counter()
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        while not stop.is_set():
            name, url = generator.choice(CHURNED), generator.choice(urls)
            if generator.random() < 0.3:
                response = await client.delete(f"{url}/v1/steering/vectors/{name}")
                changes["deleted" if response.status_code == 200 else "delete_unknown"] += 1
            else:
                vector = [generator.gauss(0.0, 1.0) for _ in range(hidden)]
                response = await client.post(f"{url}/v1/steering/vectors", json={"name": name, "vector": vector, "replace": True})
                response.raise_for_status()
                versions.setdefault(name, []).append(vector)
                changes["registered"] += 1
            await asyncio.sleep(generator.uniform(0.05, 0.3))
    return changes


async def soak(urls, model, jobs, concurrency, headers, hidden, seed):
    versions: dict[str, list] = {}
    stop = asyncio.Event()
    churning = asyncio.create_task(churn(urls, hidden, headers, seed + 1, stop, versions))
    try:
        sent = await run_jobs(urls, model, jobs, concurrency, headers, seed)
    finally:
        stop.set()
    return sent, await churning, versions


def expected_answers(url: str, model: str, sent: list, versions: dict, headers: dict) -> tuple[dict, dict]:
    """Each distinct request alone; for churned names, each version's answer by fingerprint."""
    alone, by_fingerprint = {}, {}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:

        def post(request: Request, steering: dict | None = None) -> httpx.Response:
            path, body = request.body(model, steering)
            response = client.post(path, json=body)
            response.raise_for_status()
            return response

        for request, (outcome, _, _) in sent:
            if outcome != "ok" or request in alone or request in by_fingerprint:
                continue
            spec = json.loads(request.spec) if request.spec else None
            name = spec["vectors"][0].get("name") if spec and "vectors" in spec else None
            if name in CHURNED:  # the same request with each version of the name, inline
                answers = {}
                for vector in versions.get(name, []):
                    entry = {key: value for key, value in spec["vectors"][0].items() if key != "name"}
                    inline = {**spec, "vectors": [{**entry, "vector": vector}]}
                    response = post(request, inline)
                    answers[response.headers[FINGERPRINT]] = text_of(response.json())
                by_fingerprint[request] = answers
            else:
                alone[request] = text_of(post(request).json())
    return alone, by_fingerprint


def registries(urls: list[str], headers: dict) -> list[list]:
    with httpx.Client(headers=headers, timeout=60) as client:
        return [sorted((e["name"], e["digest"]) for e in client.get(f"{url}/v1/steering/vectors").json()["data"]) for url in urls]


def worker_vectors(urls: list[str], headers: dict) -> list[list[int]]:
    with httpx.Client(headers=headers, timeout=60) as client:
        return [[w["vectors"] for w in client.get(f"{url}/v1/steering/stats").json()["workers"]] for url in urls]


def run(urls: list[str], model: str, count: int, concurrency: int, headers: dict, seed: int = 0, settle_s: float = 20.0) -> dict:
    hidden, features = served_vectors(urls[0], headers)
    with httpx.Client(headers=headers, timeout=60) as client:
        generator = random.Random(seed)
        for name in STABLE:  # on the first replica; the others resolve them from the directory
            vector = [generator.gauss(0.0, 1.0) for _ in range(hidden)]
            client.post(f"{urls[0]}/v1/steering/vectors", json={"name": name, "vector": vector, "replace": True}).raise_for_status()
    jobs = traffic(count, hidden, features, seed)
    started = time.perf_counter()
    sent, changes, versions = asyncio.run(soak(urls, model, jobs, concurrency, headers, hidden, seed))
    elapsed = time.perf_counter() - started
    alone, by_fingerprint = expected_answers(urls[0], model, sent, versions, headers)
    mismatches, refused, kinds = [], 0, Counter()
    for request, (outcome, text, fingerprint) in sent:
        churned = request in by_fingerprint or (request.spec and any(f'"{name}"' in request.spec for name in CHURNED))
        if outcome == "http 400" and churned and "unknown vector" in (text or ""):
            refused += 1  # deleted meanwhile
            continue
        kinds[outcome] += 1
        if outcome != "ok":
            continue
        want = by_fingerprint[request].get(fingerprint) if request in by_fingerprint else alone[request]
        if text != want:
            mismatches.append({"request": request.body(model)[1], "got": text, "alone": want})
    # Every replica's workers catch up with the directory at their next poll.
    deadline = time.monotonic() + settle_s
    while len(set(sum(worker_vectors(urls, headers), []))) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = worker_vectors(urls, headers)
    slots = [settled_slots(url, model, headers) for url in urls]
    names = registries(urls, headers)
    with httpx.Client(headers=headers, timeout=60) as client:  # leave the shared registry as it was
        for name in (*STABLE, *CHURNED):
            client.delete(f"{urls[0]}/v1/steering/vectors/{name}")
    return {
        "replicas": len(urls),
        "requests": len(sent),
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "completed": kinds.pop("ok", 0),
        "refused_deleted": refused,
        "errors": dict(kinds),
        "mismatches": len(mismatches),
        "first_mismatches": mismatches[:3],
        "registry_changes": dict(changes),
        "registries_identical": all(entry == names[0] for entry in names),
        "worker_vectors": workers,
        "slots_in_use_after": slots,
    }


def main() -> None:
    parser = soak_arguments(__doc__, requests=300, concurrency=32, out="fleet_soak.json")
    parser.add_argument("--url", action="append", default=None, help="a running replica; repeat (default: start two)")
    args = parser.parse_args()
    headers = auth(args.api_key)
    processes, urls = [], args.url
    if urls is None:
        registry, urls = tempfile.mkdtemp(prefix="fleet-soak-registry-"), []
        for index in range(2):
            log = Path(args.out).with_suffix(f".replica{index}.log")
            process, url = launcher.start_server(["--max-num-seqs", "32", "--registry-dir", registry], log, timeout=600)
            processes.append(process)
            urls.append(url)
    try:
        report = run(urls, args.model, args.requests, args.concurrency, headers, args.seed)
    finally:
        for process in processes:
            launcher.stop_server(process)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
