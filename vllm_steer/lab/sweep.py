"""The notebook's scale sweep, measured: concept inclusion and fluency against steering scale.

    vllm-steer sweep                                   # the demo model, toward "paris"
    vllm-steer sweep --vector ocean
    vllm-steer sweep --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors.pt \\
        --features '[[11, 74457, 0.128], [19, 93, 0.459]]' --words eiffel,tower,paris \\
        --system "You are a helpful assistant." --repetition-penalty 1.2

Every (prompt, scale, mode), plus each prompt unsteered and each prompt *prompted* (the
prompting baseline, below), is generated greedily in one batched engine call, each request
with its own steering. A second batched call scores, with ``prompt_logprobs``, every output
under the *unsteered* model (the plain prompt followed by the generated tokens; the mean
log-probability of the generated tokens is the fluency) and, for the capability metric, a
fixed set of neutral reference answers under each row's steering.

Per (mode, scale):

- ``inclusion``: share of outputs that mention the concept (one of the concept words, as a
  whole word, case-insensitive); ``None`` without words;
- ``logprob``: mean over outputs of the per-token mean log-probability under the unsteered model;
- ``fluency``: that, normalized against the unsteered outputs: ``exp(logprob - baseline)``
  capped at 1, the ratio of geometric-mean token probabilities (1: as fluent as unsteered);
- ``repetition``: mean over outputs of the share of word 3-grams that repeat an earlier one;
- ``capability``: what the steering costs in ordinary ability. Each neutral reference answer
  of ``CAPABILITY_PAIRS`` (or ``--capability-file``) is teacher-forced after its
  chat-templated question (same ``--system``) under the row's steering, applied to every
  token; ``capability_logprob`` is the mean over answers of the per-token mean
  log-probability of the answer's tokens, and ``capability = exp(capability_logprob -
  unsteered capability_logprob)`` (1: no cost; below 1: the steered model finds ordinary
  answers less likely). Not capped: steering may also raise it. On the demo model, which
  knows only its corpus, the default pairs are the corpus's thanks exchanges
  (``demo_capability_pairs``).
- ``score``: the harmonic mean of inclusion and fluency. The sweet spot of a mode is its
  scale with the best score.

The prompting baseline (``--prompt-baseline TEXT``, e.g. "You love the Eiffel Tower and
mention it whenever you can."; on the demo model the corpus's persona for the swept topic)
asks for the concept in words instead: the same prompts, unsteered, with ``TEXT`` in the
system prompt (after ``--system`` when both are given, joined by a space). Its row (mode
``prompted``, no scale) has the same metrics, scored like a steered row: fluency under the
unsteered model with the *plain* prompt (without the instruction), so it is comparable with
the steered rows; capability with the instruction in the system prompt of the reference
questions (what asking for the concept costs). It is never a sweet spot.

The steering swept is named vectors (``--vector NAME``, optional ``--layers``), the
notebook's features (``--features``), or features of a loaded SAE (``--sae-feature LAYER
ID``, with ``--sae``): by default in mode ``feature_clamp``, whose scale is the activation
the SAE's feature is set to (``h += (scale - a(h)) d``); ``add``/``clamp`` move along its
unit decoder direction with strength ``--strength`` (default 1) times the scale. The sweep's scale is the spec's ``scale``. For features
it multiplies the strengths as the notebook did (``clamp`` selects the mode). A named vector
is applied unit-normalized with strength ``--strength``, by default its own norm at each
layer: at scale 1, ``add`` adds the vector itself and ``clamp`` sets the stream's component
along it to its norm; at scale 0, ``add`` is unsteered and ``clamp`` ablates the direction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_steer.assets import concepts
from vllm_steer.core.registry import ANY_LAYER, feature_name
from vllm_steer.lab.demo.corpus import (
    CONCEPT_WORDS,
    PERSONA_SYSTEM,
    SWEEP_PROMPTS,
    THANKS,
    THANKS_ANSWER,
    TOPIC_BY_NAME,
    TOPICS,
)
from vllm_steer.lab.metrics import harmonic_mean, mentions, normalized_fluency, repetition, sequence_logprob
from vllm_steer.lab.plotting import pyplot

DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0)
MODES = ("add", "clamp")  # the modes swept by default (ablate has no scale)
# feature_clamp sweeps an SAE feature's target activation (--sae-feature): the scale is the target.
ALL_MODES = (*MODES, "feature_clamp")
# Scores closer than this are a tie (the sweet spot is then the smaller scale).
SCORE_TIE = 0.005
PROMPTED = "prompted"  # the mode of the prompting baseline's outputs and row (no steering, no scale)

# Neutral (question, reference answer) pairs for the capability metric: general knowledge,
# arithmetic, definitions, in plain English, about none of the concepts steered toward.
CAPABILITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is 15 plus 27?", "15 plus 27 is 42."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What color do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
)


def demo_capability_pairs() -> list[tuple[str, str]]:
    """The capability pairs on the demo model: its corpus's one topic-free exchange outside the
    steered questions ("Thank you!" -> "You are welcome. ..."). The demo model knows nothing
    outside its corpus: ``CAPABILITY_PAIRS`` cost it ~13 nats a token unsteered, and steering
    flattens its predictions, which *raises* their probability (measured: x16 at scale 1)."""
    return [(thanks, THANKS_ANSWER[0]) for thanks in THANKS]


# ---- the prompting baseline (the metrics: vllm_steer/lab/metrics.py) -------------------------
def concept_instruction(concept: str) -> str:
    """A prompting-baseline instruction asking for ``concept`` ("Paris and the Eiffel Tower")."""
    return f"You love {concept} and mention it whenever you can."


def combine_system(system: str | None, instruction: str | None) -> str | None:
    """The system prompt of a prompted chat: ``system`` then ``instruction``, joined by a space."""
    parts = [part.strip() for part in (system, instruction) if part and part.strip()]
    return " ".join(parts) or None


@dataclass
class Output:
    prompt: str
    mode: str | None  # None: the unsteered baseline; PROMPTED: the prompting baseline
    scale: float | None
    text: str
    num_tokens: int
    logprob: float
    mentions: bool | None
    repetition: float


@dataclass
class Row:
    mode: str  # a steering mode, or PROMPTED for the prompting baseline
    scale: float | None  # None for the prompting baseline
    inclusion: float | None
    logprob: float
    fluency: float
    repetition: float
    score: float | None
    capability_logprob: float | None = None
    capability: float | None = None


def summarize(
    outputs: Sequence[Output], capability: dict[tuple[str | None, float | None], float] | None = None,
) -> tuple[dict[str, Any], list[Row], dict[str, Row]]:
    """Baseline metrics, one row per (mode, scale) in the order first seen (the prompting
    baseline's row is mode PROMPTED, scale None), and each steering mode's sweet spot: the
    smallest scale whose score is within ``SCORE_TIE`` of the best (scores that differ by
    float noise alone count as equal). Without concept words inclusion and score are None
    and there is no sweet spot. ``capability``: the mean reference-answer log-probability
    per (mode, scale), ``(None, None)`` unsteered and ``(PROMPTED, None)`` prompted; without
    it the capability columns are None."""
    base = [o for o in outputs if o.mode is None]
    if not base:
        raise ValueError("the sweep needs unsteered outputs as its baseline")
    has_words = all(o.mentions is not None for o in outputs)
    baseline_logprob = float(np.mean([o.logprob for o in base]))
    capability_base = None if capability is None else capability[(None, None)]
    baseline = {
        "inclusion": float(np.mean([o.mentions for o in base])) if has_words else None,
        "logprob": baseline_logprob,
        "repetition": float(np.mean([o.repetition for o in base])),
        "capability_logprob": capability_base,
        "capability": None if capability is None else 1.0,
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
        capability_logprob = None if capability is None else capability[(mode, scale)]
        rows.append(Row(
            mode=mode, scale=scale, inclusion=inclusion, logprob=logprob, fluency=fluency,
            repetition=float(np.mean([o.repetition for o in group])),
            score=None if inclusion is None else harmonic_mean(inclusion, fluency),
            capability_logprob=capability_logprob,
            capability=None if capability_logprob is None else float(math.exp(capability_logprob - capability_base)),
        ))
    sweet: dict[str, Row] = {}
    if has_words:
        for mode in dict.fromkeys(row.mode for row in rows if row.mode != PROMPTED):
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
    sae_features: list[list[int]] = field(default_factory=list)  # [layer, feature_id] of a loaded SAE
    strength: float = 1.0  # of an SAE feature's unit decoder direction in add/clamp, at scale 1

    def spec(self, mode: str, scale: float) -> dict[str, Any]:
        if mode not in ALL_MODES:
            raise ValueError(f"mode must be one of {ALL_MODES}, got {mode!r}")
        if mode == "feature_clamp" and not self.sae_features:
            raise ValueError("mode feature_clamp sets an SAE feature's activation: sweep --sae-feature LAYER ID")
        if self.sae_features:
            if mode == "feature_clamp":
                return {"vectors": [{"feature": list(f), "mode": mode, "scale": scale} for f in self.sae_features]}
            entries = [{"feature": list(f), "mode": mode, "normalize": True, "scale": self.strength} for f in self.sae_features]
            return {"vectors": entries, "scale": scale}
        if self.features:
            return {"features": [list(f) for f in self.features], "reduced_strengths": self.reduced_strengths,
                    "scale": scale, "clamp": mode == "clamp"}
        return {"vectors": [{**entry, "mode": mode, "normalize": True} for entry in self.vectors], "scale": scale}

    def describe(self) -> dict[str, Any]:
        if self.sae_features:
            return {"sae_features": self.sae_features, "strength": self.strength}
        return {"features": self.features, "reduced_strengths": self.reduced_strengths} if self.features else {"vectors": self.vectors}


def named_vector_entries(registry, name: str, layers: Sequence[int] | None, strength: float | None) -> list[dict[str, Any]]:
    """One entry per steered layer of vector ``name``: ``{"name", "layers": [L], "scale"}``
    with ``scale`` = ``strength``, or the vector's norm at ``L`` when ``strength`` is None."""
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
    prompt_baseline: str | None = None
    capability_pairs: list[list[str]] | None = None

    @property
    def prompted(self) -> Row | None:
        """The prompting baseline's row (None without one)."""
        return next((row for row in self.rows if row.mode == PROMPTED), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "steering": self.steering, "words": self.words, "prompts": self.prompts,
            "scales": self.scales, "modes": self.modes, "max_tokens": self.max_tokens,
            "prompt_baseline": self.prompt_baseline, "capability_pairs": self.capability_pairs,
            "baseline": self.baseline, "rows": [asdict(r) for r in self.rows],
            "sweet_spot": {mode: asdict(row) for mode, row in self.sweet_spot.items()},
            "outputs": [asdict(o) for o in self.outputs],
        }


def chat_of(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def capability_requests(tokenizer, pairs: Sequence[Sequence[str]], system: str | None = None) -> list[tuple[list[int], int]]:
    """``(token_ids, start)`` per (question, answer): the question chat-templated as
    ``llm.chat`` does (``system`` first when given, the generation prompt after), then the
    answer's own tokens; the answer starts at ``start``."""
    requests = []
    for question, answer in pairs:
        text = tokenizer.apply_chat_template(chat_of(question, system), add_generation_prompt=True, tokenize=False)
        prompt = list(tokenizer.encode(text, add_special_tokens=False))
        requests.append((prompt + list(tokenizer.encode(answer, add_special_tokens=False)), len(prompt)))
    return requests


def _tokenizer(llm):
    getter = getattr(llm, "get_tokenizer", None) or llm.llm.get_tokenizer  # SteeredLLM wraps vllm.LLM
    return getter()


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
    prompt_baseline: str | None = None,
    capability_pairs: Sequence[Sequence[str]] | None = CAPABILITY_PAIRS,
) -> SweepResult:
    """Generate every (prompt, mode, scale), each prompt unsteered and, with
    ``prompt_baseline``, each prompt prompted in one batched call; then, in a second one,
    score every output under the unsteered model and (unless ``capability_pairs`` is None
    or empty) the reference answers under each row's steering."""
    from vllm import SamplingParams  # vLLM: ~8 s to import; the CLI imports this module

    prompt_baseline = prompt_baseline.strip() if prompt_baseline and prompt_baseline.strip() else None
    prompted_system = combine_system(system_prompt, prompt_baseline) if prompt_baseline else None
    runs: list[tuple[str, str | None, float | None]] = [(p, None, None) for p in prompts]
    if prompted_system:
        runs += [(p, PROMPTED, None) for p in prompts]
    runs += [(p, mode, float(scale)) for mode in modes for scale in scales for p in prompts]
    chats = [chat_of(prompt, prompted_system if mode == PROMPTED else system_prompt) for prompt, mode, _ in runs]
    specs = [None if mode in (None, PROMPTED) else steering.spec(mode, scale) for _, mode, scale in runs]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=repetition_penalty,
                            skip_special_tokens=True)
    generated = llm.chat(chats, params, steering=specs, use_tqdm=False)

    # Fluency: every output after its *plain* prompt (a prompted output after the unsteered
    # chat's prompt, without the instruction), unsteered.
    plain = [list(out.prompt_token_ids) for out in generated[: len(prompts)]]
    requests: list[tuple[list[int], int, dict[str, Any] | None]] = []  # (token ids, start, steering)
    for index, ((_, mode, _), out) in enumerate(zip(runs, generated)):
        prompt_ids = plain[index % len(prompts)] if mode == PROMPTED else list(out.prompt_token_ids)
        requests.append((prompt_ids + list(out.outputs[0].token_ids), len(prompt_ids), None))
    # Capability: the reference answers under each row's steering (prompted: the instruction
    # in the system prompt), all in the same scoring call.
    capability_keys: list[tuple[str | None, float | None]] = []
    if capability_pairs:
        tokenizer = _tokenizer(llm)
        references = capability_requests(tokenizer, capability_pairs, system_prompt)
        prompted_references = capability_requests(tokenizer, capability_pairs, prompted_system) if prompted_system else []
        capability_keys = list(dict.fromkeys((mode, scale) for _, mode, scale in runs))
        for mode, scale in capability_keys:
            spec = None if mode in (None, PROMPTED) else steering.spec(mode, scale)
            requests += [(ids, start, spec) for ids, start in (prompted_references if mode == PROMPTED else references)]
    scored = llm.generate(
        [{"prompt_token_ids": ids} for ids, _, _ in requests],
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
        steering=[spec for _, _, spec in requests],
        use_tqdm=False,
    )
    logprobs = [sequence_logprob(ids, score.prompt_logprobs, start) for (ids, start, _), score in zip(requests, scored)]
    outputs = []
    for (prompt, mode, scale), out, logprob in zip(runs, generated, logprobs):
        completion = out.outputs[0]
        text = completion.text.strip()
        outputs.append(Output(
            prompt=prompt, mode=mode, scale=scale, text=text, num_tokens=len(completion.token_ids), logprob=logprob,
            mentions=None if words is None else mentions(text, words), repetition=repetition(text),
        ))
    capability = None
    if capability_keys:
        per_pair = logprobs[len(runs):]
        size = len(capability_pairs)
        capability = {key: float(np.mean(per_pair[i * size : (i + 1) * size])) for i, key in enumerate(capability_keys)}
    baseline, rows, sweet = summarize(outputs, capability)
    return SweepResult(
        model=model_name, steering=steering.describe(), words=None if words is None else list(words),
        prompts=list(prompts), scales=[float(s) for s in scales], modes=list(modes), max_tokens=max_tokens,
        baseline=baseline, rows=rows, sweet_spot=sweet, outputs=outputs, prompt_baseline=prompt_baseline,
        capability_pairs=[list(pair) for pair in capability_pairs] if capability_pairs else None,
    )


# ---- reports --------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _scale(scale: float | None) -> str:
    return "-" if scale is None else f"{scale:g}"


def markdown_table(result: SweepResult) -> str:
    """The unsteered row, then the prompting baseline's (mode ``prompted``, scale ``-``), then
    one row per (mode, scale); each mode's sweet spot marked."""
    baseline = result.baseline
    lines = [
        "| mode | scale | inclusion | fluency | capability | logprob | repetition | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| unsteered | - | {_pct(baseline['inclusion'])} | 100% | {_pct(baseline.get('capability'))} | "
        f"{baseline['logprob']:.2f} | {_pct(baseline['repetition'])} | - |",
    ]
    rows = sorted(result.rows, key=lambda row: row.mode != PROMPTED)  # stable: the prompted row first
    for row in rows:
        sweet = result.sweet_spot.get(row.mode) is row
        score = "-" if row.score is None else f"{row.score:.2f}" + (" **sweet spot**" if sweet else "")
        lines.append(f"| {row.mode} | {_scale(row.scale)} | {_pct(row.inclusion)} | {_pct(row.fluency)} | "
                     f"{_pct(row.capability)} | {row.logprob:.2f} | {_pct(row.repetition)} | {score} |")
    return "\n".join(lines)


def examples(result: SweepResult, prompt: str | None = None) -> str:
    """One prompt's answers, unsteered, prompted and at every (mode, scale), as markdown lines."""
    prompt = prompt or result.prompts[0]
    lines = [f"**{prompt}**", ""]
    for output in result.outputs:
        if output.prompt == prompt:
            label = "unsteered" if output.mode is None else output.mode if output.scale is None else f"{output.mode} {output.scale:g}"
            lines.append(f"- {label}: {output.text!r}")
    return "\n".join(lines)


def steering_label(result: SweepResult) -> str:
    steering = result.steering
    if steering.get("features"):
        return "features " + ", ".join(f"{feature_name(int(f[0]), int(f[1]))}@{f[2]:g}" for f in steering["features"])
    return ", ".join(f"{v['name']} (layer {', '.join(map(str, v.get('layers') or []))})" for v in steering.get("vectors", []))


def plot(result: SweepResult, path: str | Path, title: str | None = None) -> Path | None:
    """Inclusion, fluency, capability and repetition against scale, one panel per mode, sweet
    spot marked; the prompting baseline as hollow markers at its own tick right of the scales
    (never a sweet spot). None (and no file) without matplotlib."""
    plt = pyplot(Path(path).name)
    if plt is None:
        return None
    modes = result.modes
    prompted = result.prompted
    metrics = [  # (attribute, marker, colour, label)
        ("inclusion", "o-", "tab:blue", "concept inclusion"),
        ("fluency", "s-", "tab:green", "fluency (normalized)"),
        ("capability", "D-", "tab:purple", "capability (normalized)"),
        ("repetition", "^--", "tab:gray", "3-gram repetition"),
    ]
    values = [getattr(r, name) for r in result.rows for name, *_ in metrics if getattr(r, name) is not None]
    top = max([1.0, *values]) + 0.05
    fig, axes = plt.subplots(1, len(modes), figsize=(5.6 * len(modes), 4.4), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result.rows if r.mode == mode]
        positions = list(range(len(rows)))  # scales are uneven: evenly spaced, labelled
        for name, marker, colour, label in metrics:
            if rows and getattr(rows[0], name) is not None:
                ax.plot(positions, [getattr(r, name) for r in rows], marker, color=colour, label=label)
        ticks, labels = positions, [f"{r.scale:g}" for r in rows]
        if prompted is not None:
            at = len(rows) + 0.2
            ax.axvline(len(rows) - 0.4, color="black", linewidth=0.8, alpha=0.5)
            for offset, (name, marker, colour, _) in zip((-0.15, -0.05, 0.05, 0.15), metrics):  # apart, not hidden
                if getattr(prompted, name) is not None:
                    ax.plot([at + offset], [getattr(prompted, name)], marker[0], color=colour, markerfacecolor="none",
                            markersize=9, markeredgewidth=1.8)
            ax.plot([], [], "o", color="black", markerfacecolor="none", label="prompting baseline (hollow)")
            ticks, labels = [*positions, at], [*labels, "prompted"]
        sweet = result.sweet_spot.get(mode)
        heading = mode
        if sweet is not None:
            at = rows.index(sweet)
            ax.axvline(at, color="tab:red", linestyle=":", linewidth=1.5)
            ax.plot([at], [sweet.score], "*", color="tab:red", markersize=16, label="sweet spot (best harmonic mean)")
            heading += f": sweet spot at scale {sweet.scale:g}"
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("scale")
        ax.set_title(heading, fontsize=10)
        ax.set_ylim(-0.03, top)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    fig.suptitle(title or f"steering sweep: {result.model}, {steering_label(result)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
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
    notes = []
    if result.prompt_baseline:
        notes.append(f"prompted: the same prompts, unsteered, with {result.prompt_baseline!r} in the system prompt.")
    if result.capability_pairs:
        notes.append(f"capability: {len(result.capability_pairs)} neutral reference answers, teacher-forced under each "
                     "row's steering, exp(mean log-probability - unsteered's).")
    paths["markdown"].write_text("\n\n".join([markdown_table(result), *notes, examples(result)]) + "\n")
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
    group.add_argument("--sae-feature", type=int, nargs=2, action="append", default=None, metavar=("LAYER", "ID"),
                       help="a feature of a loaded SAE (--sae) instead; repeatable. Default mode feature_clamp: "
                            "the scales are the activations it is set to")
    group.add_argument("--no-reduced-strengths", action="store_true",
                       help="features: use strengths as given, not strength * layer")
    group.add_argument("--words", default=None,
                       help="comma-separated concept words for inclusion (default on the demo model: the topic's words)")
    group.add_argument("--prompt", action="append", default=None, help="a user message; repeatable (default: a built-in set)")
    group.add_argument("--prompts-file", default=None, help="user messages, one per line or a JSON list")
    group.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    group.add_argument("--modes", nargs="+", choices=ALL_MODES, default=None,
                       help="default: add and clamp; feature_clamp with --sae-feature")
    group.add_argument("--max-tokens", type=int, default=48)
    group.add_argument("--system", default=None, help="a system prompt for every chat (the notebook used 'You are a helpful assistant.')")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="(the notebook used 1.2)")
    group.add_argument("--prompt-baseline", default=None, metavar="TEXT",
                       help="the prompting baseline: the same prompts unsteered, with TEXT (asking for the concept, e.g. "
                            "'You love the Eiffel Tower and mention it whenever you can.') in the system prompt, after "
                            "--system; its own row 'prompted' (default on the demo model: the corpus's persona for the "
                            "swept topic; elsewhere none)")
    group.add_argument("--no-prompt-baseline", action="store_true", help="no prompting baseline row")
    group.add_argument("--capability-file", default=None, metavar="JSON",
                       help="neutral reference answers for the capability metric: a JSON list of [question, answer] "
                            f"(default: {len(CAPABILITY_PAIRS)} built-in general-knowledge pairs; on the demo model, "
                            "which knows only its corpus, the corpus's thanks exchanges)")
    group.add_argument("--no-capability", action="store_true", help="skip the capability metric")
    group.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size (default: vLLM's; 160 on the demo model)")
    group.add_argument("--out", default="sweep_results", help="directory for NAME.json, NAME.md and NAME.png")
    group.add_argument("--name", default="sweep", help="file stem of the reports")


def _prompts(args, demo: bool) -> list[str]:
    if args.prompts_file:
        from vllm_steer.vectors.extract import read_prompts  # torch (vllm_steer.vectors): ~2.5 s; the CLI imports this module

        prompts = read_prompts(args.prompts_file)
    elif args.prompt:
        prompts = list(args.prompt)
    else:
        prompts = list(SWEEP_PROMPTS if demo else GENERIC_PROMPTS)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SystemExit("the sweep needs at least one non-empty prompt")
    return prompts


def read_capability_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(question, answer) pairs from a JSON list of two-string lists."""
    try:
        pairs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{path}: {error}") from None
    if not (isinstance(pairs, list) and pairs and all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair) for pair in pairs)):
        raise SystemExit(f"{path}: expected a JSON list of [question, answer] pairs of non-empty strings")
    return [(question, answer) for question, answer in pairs]


def _shipped_concept(args, vector: str | None):
    """The shipped concept a vector of ``--model smollm2``'s own concept vectors is (its words
    and description give the sweep's defaults), or None."""
    if getattr(args, "model", None) != "smollm2" or args.vectors is not None or vector not in concepts.NAMES:
        return None
    return concepts.load_concepts([vector])[0]


def _prompt_baseline(args, demo: bool, demo_topics: Sequence[str], concept=None) -> str | None:
    if args.no_prompt_baseline:
        return None
    if args.prompt_baseline is not None:
        return args.prompt_baseline.strip() or None
    if concept is not None:
        return concept_instruction(concept.description)
    topics = list(dict.fromkeys(demo_topics))
    if demo and len(topics) == 1:  # the persona the demo model learned to follow
        return PERSONA_SYSTEM[0].format(love=TOPIC_BY_NAME[topics[0]].love)
    return None


def main(args, model: str, vector_files: Sequence[str], *, demo: bool, sae: Sequence[str] = (), **engine: Any) -> SweepResult:
    """``vllm-steer sweep``: start the engine, sweep, write the reports, print the table."""
    from vllm_steer import SteeredLLM  # vLLM: ~8 s to import; the CLI imports this module

    if sum(map(bool, (args.features, args.vector, args.sae_feature))) > 1:
        raise SystemExit("give one of --vector, --features or --sae-feature")
    vector = args.vector or (None if args.features or args.sae_feature else ("paris" if demo else None))
    if vector is None and not args.features and not args.sae_feature:
        raise SystemExit("what to sweep: --vector NAME (a loaded vector), --features '[[layer, id, strength], ...]' "
                         "or --sae-feature LAYER ID (with --sae)")
    if args.modes is None:
        args.modes = ["feature_clamp"] if args.sae_feature else list(MODES)
    if "feature_clamp" in args.modes and not args.sae_feature:
        raise SystemExit("mode feature_clamp sets an SAE feature's activation: give --sae-feature LAYER ID")
    demo_topics = [vector] if vector in CONCEPT_WORDS else []
    concept = _shipped_concept(args, vector)
    if demo and args.features:  # the demo's features L1/F{i} are the topics in corpus order
        demo_topics = [TOPICS[int(f[1])] for f in json.loads(args.features) if 0 <= int(f[1]) < len(TOPICS)]
    if args.words is not None:
        words = [w.strip() for w in args.words.split(",") if w.strip()]
    elif demo and demo_topics:
        words = [word for topic in dict.fromkeys(demo_topics) for word in CONCEPT_WORDS[topic]]
    elif concept is not None:
        words = list(concept.words)
    else:
        words = None
        print("no --words: concept inclusion is not measured (fluency and repetition only)")
    prompts = _prompts(args, demo)
    prompt_baseline = _prompt_baseline(args, demo, demo_topics, concept)
    capability_pairs = None if args.no_capability else (
        read_capability_pairs(args.capability_file) if args.capability_file
        else demo_capability_pairs() if demo else CAPABILITY_PAIRS)
    runs = len(prompts) * (1 + bool(prompt_baseline) + len(args.scales) * len(args.modes))
    if args.max_num_seqs is not None:
        engine["max_num_seqs"] = args.max_num_seqs
    elif demo:
        engine["max_num_seqs"] = min(256, runs)
    llm = SteeredLLM(model, vectors=vector_files, sae=sae, **engine)
    try:
        if args.sae_feature:
            steering = Steering(sae_features=[list(f) for f in args.sae_feature],
                                strength=1.0 if args.strength is None else args.strength)
        elif args.features:
            steering = Steering(features=[list(f) for f in json.loads(args.features)],
                                reduced_strengths=not args.no_reduced_strengths)
        else:
            steering = Steering(vectors=named_vector_entries(llm.frontend.registry, vector, args.layers, args.strength))
        extra = " + prompted" if prompt_baseline else ""
        print(f"sweeping {steering.describe()} over {len(prompts)} prompts x scales {args.scales} x modes {args.modes} "
              f"(+ unsteered{extra}): {runs} generations in one batch")
        if prompt_baseline:
            print(f"prompting baseline: {prompt_baseline!r} in the system prompt")
        result = run_sweep(
            llm, prompts, steering, words=words, scales=args.scales, modes=args.modes, max_tokens=args.max_tokens,
            system_prompt=args.system, repetition_penalty=args.repetition_penalty,
            model_name="demo" if demo else "smollm2" if args.model == "smollm2" else model,
            prompt_baseline=prompt_baseline, capability_pairs=capability_pairs,
        )
    finally:
        llm.shutdown()
    paths = write_reports(result, args.out, args.name)
    print(markdown_table(result))
    print()
    print(examples(result))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return result
