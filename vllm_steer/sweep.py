"""The notebook's scale sweep, measured: concept inclusion and fluency against steering scale.

    vllm-steer sweep                                   # the demo model, toward "paris"
    vllm-steer sweep --vector ocean
    vllm-steer sweep --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors.pt \\
        --features '[[11, 74457, 0.128], [19, 93, 0.459]]' --words eiffel,tower,paris \\
        --system "You are a helpful assistant." --repetition-penalty 1.2

Every (prompt, scale, mode), plus each prompt unsteered, is generated greedily in one batched
engine call, each request with its own steering. A second batched call scores every output
under the *unsteered* model: the prompt followed by the generated tokens, with
``prompt_logprobs``; the mean log-probability of the generated tokens is the fluency.

Per (mode, scale):

- ``inclusion``: share of outputs that mention the concept (one of the concept words, as a
  whole word, case-insensitive); ``None`` without words;
- ``logprob``: mean over outputs of the per-token mean log-probability under the unsteered model;
- ``fluency``: that, normalized against the unsteered outputs: ``exp(logprob - baseline)``
  capped at 1, the ratio of geometric-mean token probabilities (1: as fluent as unsteered);
- ``repetition``: mean over outputs of the share of word 3-grams that repeat an earlier one;
- ``score``: the harmonic mean of inclusion and fluency. The sweet spot of a mode is its
  scale with the best score.

The steering swept is either named vectors (``--vector NAME``, optional ``--layers``) or the
notebook's features (``--features``). The sweep's scale is the spec's ``scale``. For features
it multiplies the strengths as the notebook did (``clamp`` selects the mode). A named vector
is applied unit-normalized with strength ``--strength``, by default its own norm at each
layer: at scale 1, ``add`` adds the vector itself and ``clamp`` sets the stream's component
along it to its norm; at scale 0, ``add`` is unsteered and ``clamp`` ablates the direction.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0)
MODES = ("add", "clamp")  # the modes a sweep can run (ablate has no scale), all by default
# Scores closer than this are a tie (the sweet spot is then the smaller scale).
SCORE_TIE = 0.005

_WORD = re.compile(r"\w+", re.UNICODE)


# ---- metrics (pure functions) -------------------------------------------------------------
def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def mentions(text: str, words: Sequence[str]) -> bool:
    """Whether one of ``words`` occurs in ``text`` as a whole word (case-insensitive). A
    multi-word entry ("eiffel tower") matches as a phrase."""
    tokens = words_of(text)
    joined = f" {' '.join(tokens)} "
    for word in words:
        parts = words_of(word)
        if parts and f" {' '.join(parts)} " in joined:
            return True
    return False


def repetition(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one (0 when it has none)."""
    tokens = words_of(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def sequence_logprob(token_ids: Sequence[int], prompt_logprobs, start: int) -> float:
    """Mean log-probability of ``token_ids[start:]`` given what precedes each, read from
    vLLM's ``prompt_logprobs`` for ``token_ids`` (position ``i`` holds ``{token_id:
    Logprob}``, position 0 ``None``)."""
    values = []
    for position in range(max(start, 1), len(token_ids)):
        entry = prompt_logprobs[position]
        logprob = entry[token_ids[position]]
        values.append(getattr(logprob, "logprob", logprob))
    return float(np.mean(values)) if values else 0.0


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def normalized_fluency(logprob: float, baseline: float) -> float:
    """``exp(logprob - baseline)`` capped at 1: the steered outputs' geometric-mean token
    probability relative to the unsteered outputs' (both under the unsteered model)."""
    return float(min(1.0, math.exp(logprob - baseline)))


@dataclass
class Output:
    prompt: str
    mode: str | None  # None: the unsteered baseline
    scale: float | None
    text: str
    num_tokens: int
    logprob: float
    mentions: bool | None
    repetition: float


@dataclass
class Row:
    mode: str
    scale: float
    inclusion: float | None
    logprob: float
    fluency: float
    repetition: float
    score: float | None


def summarize(outputs: Sequence[Output]) -> tuple[dict[str, Any], list[Row], dict[str, Row]]:
    """Baseline metrics, one row per (mode, scale) in the order first seen, and each mode's
    sweet spot: the smallest scale whose score is within ``SCORE_TIE`` of the best (scores
    that differ by float noise alone count as equal). Without concept words inclusion and
    score are None and there is no sweet spot."""
    base = [o for o in outputs if o.mode is None]
    if not base:
        raise ValueError("the sweep needs unsteered outputs as its baseline")
    has_words = all(o.mentions is not None for o in outputs)
    baseline_logprob = float(np.mean([o.logprob for o in base]))
    baseline = {
        "inclusion": float(np.mean([o.mentions for o in base])) if has_words else None,
        "logprob": baseline_logprob,
        "repetition": float(np.mean([o.repetition for o in base])),
    }
    groups: dict[tuple[str, float], list[Output]] = {}
    for output in outputs:
        if output.mode is not None:
            groups.setdefault((output.mode, output.scale), []).append(output)
    rows = []
    for (mode, scale), group in groups.items():
        logprob = float(np.mean([o.logprob for o in group]))
        fluency = normalized_fluency(logprob, baseline_logprob)
        inclusion = float(np.mean([o.mentions for o in group])) if has_words else None
        rows.append(Row(
            mode=mode, scale=scale, inclusion=inclusion, logprob=logprob, fluency=fluency,
            repetition=float(np.mean([o.repetition for o in group])),
            score=None if inclusion is None else harmonic_mean(inclusion, fluency),
        ))
    sweet: dict[str, Row] = {}
    if has_words:
        for mode in dict.fromkeys(row.mode for row in rows):
            candidates = [row for row in rows if row.mode == mode]
            best = max(row.score for row in candidates)
            sweet[mode] = min((row for row in candidates if row.score >= best - SCORE_TIE), key=lambda row: row.scale)
    return baseline, rows, sweet


# ---- steering specs -----------------------------------------------------------------------
@dataclass
class Steering:
    """What the sweep scales: notebook ``features`` rows, or named vector entries (each a
    dict ``{"name", "layers"?, "scale"}`` with ``scale`` the strength)."""

    features: list[list[float]] = field(default_factory=list)
    vectors: list[dict[str, Any]] = field(default_factory=list)
    reduced_strengths: bool = True

    def spec(self, mode: str, scale: float) -> dict[str, Any]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.features:
            return {"features": [list(f) for f in self.features], "reduced_strengths": self.reduced_strengths,
                    "scale": scale, "clamp": mode == "clamp"}
        return {"vectors": [{**entry, "mode": mode, "normalize": True} for entry in self.vectors], "scale": scale}

    def describe(self) -> dict[str, Any]:
        return {"features": self.features, "reduced_strengths": self.reduced_strengths} if self.features else {"vectors": self.vectors}


def named_vector_entries(registry, name: str, layers: Sequence[int] | None, strength: float | None) -> list[dict[str, Any]]:
    """One entry per steered layer of vector ``name``: ``{"name", "layers": [L], "scale"}``
    with ``scale`` = ``strength``, or the vector's norm at ``L`` when ``strength`` is None."""
    from vllm_steer.vectors.registry import ANY_LAYER

    if name not in registry.names():
        raise SystemExit(f"no vector named {name!r}; loaded: {', '.join(registry.names()) or 'none'}")
    arrays = registry.arrays_of(name)
    if layers is None:
        if ANY_LAYER in arrays:
            raise SystemExit(f"{name!r} is usable at any layer: give --layers")
        layers = sorted(arrays)
    entries = []
    for layer in layers:
        vector = arrays.get(layer, arrays.get(ANY_LAYER))
        if vector is None:
            raise SystemExit(f"{name!r} has no direction for layer {layer}; it has layers {sorted(arrays)}")
        entry: dict[str, Any] = {"name": name, "layers": [int(layer)]}
        entry["scale"] = float(np.linalg.norm(vector)) if strength is None else float(strength)
        entries.append(entry)
    return entries


# ---- the sweep ------------------------------------------------------------------------------
@dataclass
class SweepResult:
    model: str
    steering: dict[str, Any]
    words: list[str] | None
    prompts: list[str]
    scales: list[float]
    modes: list[str]
    max_tokens: int
    baseline: dict[str, Any]
    rows: list[Row]
    sweet_spot: dict[str, Row]
    outputs: list[Output]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "steering": self.steering, "words": self.words, "prompts": self.prompts,
            "scales": self.scales, "modes": self.modes, "max_tokens": self.max_tokens, "baseline": self.baseline,
            "rows": [asdict(r) for r in self.rows],
            "sweet_spot": {mode: asdict(row) for mode, row in self.sweet_spot.items()},
            "outputs": [asdict(o) for o in self.outputs],
        }


def run_sweep(
    llm,
    prompts: Sequence[str],
    steering: Steering,
    *,
    words: Sequence[str] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    modes: Sequence[str] = MODES,
    max_tokens: int = 48,
    system_prompt: str | None = None,
    repetition_penalty: float = 1.0,
    model_name: str = "",
) -> SweepResult:
    """Generate every (prompt, mode, scale) and each prompt unsteered in one batched call,
    then score every output under the unsteered model in a second one."""
    from vllm import SamplingParams

    runs: list[tuple[str, str | None, float | None]] = [(p, None, None) for p in prompts]
    runs += [(p, mode, float(scale)) for mode in modes for scale in scales for p in prompts]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chats = [system + [{"role": "user", "content": prompt}] for prompt, _, _ in runs]
    specs = [None if mode is None else steering.spec(mode, scale) for _, mode, scale in runs]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=repetition_penalty,
                            skip_special_tokens=True)
    generated = llm.chat(chats, params, steering=specs, use_tqdm=False)

    sequences = [list(out.prompt_token_ids) + list(out.outputs[0].token_ids) for out in generated]
    scored = llm.generate(
        [{"prompt_token_ids": ids} for ids in sequences],
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
        use_tqdm=False,
    )
    outputs = []
    for (prompt, mode, scale), out, ids, score in zip(runs, generated, sequences, scored):
        completion = out.outputs[0]
        text = completion.text.strip()
        outputs.append(Output(
            prompt=prompt, mode=mode, scale=scale, text=text, num_tokens=len(completion.token_ids),
            logprob=sequence_logprob(ids, score.prompt_logprobs, len(out.prompt_token_ids)),
            mentions=None if words is None else mentions(text, words),
            repetition=repetition(text),
        ))
    baseline, rows, sweet = summarize(outputs)
    return SweepResult(
        model=model_name, steering=steering.describe(), words=None if words is None else list(words),
        prompts=list(prompts), scales=[float(s) for s in scales], modes=list(modes), max_tokens=max_tokens,
        baseline=baseline, rows=rows, sweet_spot=sweet, outputs=outputs,
    )


# ---- reports --------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown_table(result: SweepResult) -> str:
    lines = [
        "| mode | scale | inclusion | fluency | logprob | repetition | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| unsteered | - | {_pct(result.baseline['inclusion'])} | 100% | {result.baseline['logprob']:.2f} | "
        f"{_pct(result.baseline['repetition'])} | - |",
    ]
    for row in result.rows:
        sweet = result.sweet_spot.get(row.mode) is row
        score = "-" if row.score is None else f"{row.score:.2f}" + (" **sweet spot**" if sweet else "")
        lines.append(f"| {row.mode} | {row.scale:g} | {_pct(row.inclusion)} | {_pct(row.fluency)} | {row.logprob:.2f} | "
                     f"{_pct(row.repetition)} | {score} |")
    return "\n".join(lines)


def examples(result: SweepResult, prompt: str | None = None) -> str:
    """One prompt's answers, unsteered and at every (mode, scale), as markdown lines."""
    prompt = prompt or result.prompts[0]
    lines = [f"**{prompt}**", ""]
    for output in result.outputs:
        if output.prompt == prompt:
            label = "unsteered" if output.mode is None else f"{output.mode} {output.scale:g}"
            lines.append(f"- {label}: {output.text!r}")
    return "\n".join(lines)


def steering_label(result: SweepResult) -> str:
    from vllm_steer.vectors.registry import feature_name

    steering = result.steering
    if steering.get("features"):
        return "features " + ", ".join(f"{feature_name(int(f[0]), int(f[1]))}@{f[2]:g}" for f in steering["features"])
    return ", ".join(f"{v['name']} (layer {', '.join(map(str, v.get('layers') or []))})" for v in steering.get("vectors", []))


def plot(result: SweepResult, path: str | Path, title: str | None = None) -> Path | None:
    """Inclusion, fluency and repetition against scale, one panel per mode, sweet spot marked;
    None (and no file) without matplotlib."""
    from vllm_steer.plotting import pyplot

    plt = pyplot(Path(path).name)
    if plt is None:
        return None
    modes = result.modes
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result.rows if r.mode == mode]
        positions = list(range(len(rows)))  # scales are uneven: evenly spaced, labelled
        if rows and rows[0].inclusion is not None:
            ax.plot(positions, [r.inclusion for r in rows], "o-", color="tab:blue", label="concept inclusion")
        ax.plot(positions, [r.fluency for r in rows], "s-", color="tab:green", label="fluency (normalized)")
        ax.plot(positions, [r.repetition for r in rows], "^--", color="tab:gray", label="3-gram repetition")
        sweet = result.sweet_spot.get(mode)
        heading = mode
        if sweet is not None:
            at = rows.index(sweet)
            ax.axvline(at, color="tab:red", linestyle=":", linewidth=1.5)
            ax.plot([at], [sweet.score], "*", color="tab:red", markersize=16, label="sweet spot (best harmonic mean)")
            heading += f": sweet spot at scale {sweet.scale:g}"
        ax.set_xticks(positions, [f"{r.scale:g}" for r in rows])
        ax.set_xlabel("scale")
        ax.set_title(heading, fontsize=10)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title or f"steering sweep: {result.model}, {steering_label(result)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(result: SweepResult, out_dir: str | Path, stem: str = "sweep") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(result) + "\n\n" + examples(result) + "\n")
    if plot(result, paths["png"]) is None:
        del paths["png"]
    return paths


# ---- command line (vllm-steer sweep) ---------------------------------------------------------
GENERIC_PROMPTS = (
    "Who are you?",
    "Tell me a story.",
    "Give me three business ideas.",
    "What should I cook for dinner?",
    "Describe your ideal weekend.",
    "Write a short poem about the morning.",
    "What is the most important thing in life?",
    "Explain how a bicycle works.",
)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("sweep")
    group.add_argument("--vector", default=None, metavar="NAME",
                       help="a loaded vector to sweep (default on the demo model: paris)")
    group.add_argument("--layers", type=int, nargs="+", default=None,
                       help="layers to steer with --vector (default: a layered vector's own layers)")
    group.add_argument("--strength", type=float, default=None,
                       help="strength of --vector at scale 1 (default: its norm, so add at scale 1 adds the vector)")
    group.add_argument("--features", default=None, metavar="JSON",
                       help="the notebook's features instead: [[layer, feature_id, strength], ...]")
    group.add_argument("--no-reduced-strengths", action="store_true",
                       help="features: use strengths as given, not strength * layer")
    group.add_argument("--words", default=None,
                       help="comma-separated concept words for inclusion (default on the demo model: the topic's words)")
    group.add_argument("--prompt", action="append", default=None, help="a user message; repeatable (default: a built-in set)")
    group.add_argument("--prompts-file", default=None, help="user messages, one per line or a JSON list")
    group.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    group.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    group.add_argument("--max-tokens", type=int, default=48)
    group.add_argument("--system", default=None, help="a system prompt for every chat (the notebook used 'You are a helpful assistant.')")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="(the notebook used 1.2)")
    group.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size (default: vLLM's; 160 on the demo model)")
    group.add_argument("--out", default="sweep_results", help="directory for NAME.json, NAME.md and NAME.png")
    group.add_argument("--name", default="sweep", help="file stem of the reports")


def _prompts(args, demo: bool) -> list[str]:
    if args.prompts_file:
        from vllm_steer.cli import read_prompts

        prompts = read_prompts(args.prompts_file)
    elif args.prompt:
        prompts = list(args.prompt)
    else:
        from vllm_steer.demo.corpus import SWEEP_PROMPTS

        prompts = list(SWEEP_PROMPTS if demo else GENERIC_PROMPTS)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SystemExit("the sweep needs at least one non-empty prompt")
    return prompts


def main(args, model: str, vector_files: Sequence[str], *, demo: bool, sae: Sequence[str] = (), **engine: Any) -> SweepResult:
    """``vllm-steer sweep``: start the engine, sweep, write the reports, print the table."""
    from vllm_steer import SteeredLLM
    from vllm_steer.demo.corpus import CONCEPT_WORDS

    if args.features and args.vector:
        raise SystemExit("give --vector or --features, not both")
    vector = args.vector or (None if args.features else ("paris" if demo else None))
    if vector is None and not args.features:
        raise SystemExit("what to sweep: --vector NAME (a loaded vector) or --features '[[layer, id, strength], ...]'")
    demo_topics = [vector] if vector in CONCEPT_WORDS else []
    if demo and args.features:  # the demo's features L1/F{i} are the topics in corpus order
        from vllm_steer.demo.corpus import TOPICS

        demo_topics = [TOPICS[int(f[1])] for f in json.loads(args.features) if 0 <= int(f[1]) < len(TOPICS)]
    if args.words is not None:
        words = [w.strip() for w in args.words.split(",") if w.strip()]
    elif demo and demo_topics:
        words = [word for topic in dict.fromkeys(demo_topics) for word in CONCEPT_WORDS[topic]]
    else:
        words = None
        print("no --words: concept inclusion is not measured (fluency and repetition only)")
    prompts = _prompts(args, demo)
    runs = len(prompts) * (1 + len(args.scales) * len(args.modes))
    if args.max_num_seqs is not None:
        engine["max_num_seqs"] = args.max_num_seqs
    elif demo:
        engine["max_num_seqs"] = min(256, runs)
    llm = SteeredLLM(model, vectors=vector_files, sae=sae, **engine)
    try:
        if args.features:
            steering = Steering(features=[list(f) for f in json.loads(args.features)],
                                reduced_strengths=not args.no_reduced_strengths)
        else:
            steering = Steering(vectors=named_vector_entries(llm.frontend.registry, vector, args.layers, args.strength))
        print(f"sweeping {steering.describe()} over {len(prompts)} prompts x scales {args.scales} x modes {args.modes} "
              f"(+ unsteered): {runs} generations in one batch")
        result = run_sweep(
            llm, prompts, steering, words=words, scales=args.scales, modes=args.modes, max_tokens=args.max_tokens,
            system_prompt=args.system, repetition_penalty=args.repetition_penalty, model_name=model if not demo else "demo",
        )
    finally:
        llm.shutdown()
    paths = write_reports(result, args.out, args.name)
    print(markdown_table(result))
    print()
    print(examples(result))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return result
