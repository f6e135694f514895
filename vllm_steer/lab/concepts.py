"""Choosing each concept's default layer and scale (vllm_steer/assets/concepts, ``<model>.json``)
by measuring, and the ``vllm-steer concepts`` command:

    vllm-steer concepts                    # SmolLM2: extract (once, cached) and print the files
    vllm-steer concepts --measure          # re-measure the layer and scale of every concept (slow)

The data, the extraction and the cached files are vllm_steer/assets/concepts. The defaults are chosen
by measuring (``run_measurement``): every concept steers 8 neutral requests (greedy, 40
tokens, the notebook's system prompt) at every second layer at two scales, then its 3 best
layers at scales 1-4; the choice is the setting whose answers mention the concept most often
among those whose answers stay fluent and unrepetitive (``choose``), then checked on 8 other
neutral requests. On SmolLM2 (47 min on this 2-core machine, shared with other jobs):

    concept  layer scale  mentions  fluency  repetition  held-out mentions (unsteered)
    paris     18    2.5    100%      30%      12%         88% (0%)
    ocean     10    2.5    100%      93%      11%        100% (0%)
    cooking   14    1.5    100%      51%       2%         88% (0%)
    space     18    1.5    100%      57%       6%        100% (0%)
    dogs      24    4       75%      70%      15%         88% (0%)
    formal     4    3       50%      34%      19%         38% (0%)
    pirate    12    2       75%      37%      22%         38% (0%)
    sad       24    2.5     50%      86%      23%         12% (0%)

The topics steer reliably; the styles show in how things are said ("I am a humble servant
of the Lord", "Aye, yea!", "consumed by the weight of my own mortality") more than in the
words of their lists, so their mention rates understate them. Fluency is how likely the
answers are as an assistant's answer, whatever the question (``answer_logprobs``), relative
to the unsteered answers: scored against the question instead (as the sweep does), every
answer that turns to the concept counts as disfluent, and the measured choice was then a
setting that barely steers (held-out mentions 12-75%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_steer.assets import models
from vllm_steer.assets.concepts import (
    METHOD,
    Concept,
    concept_files,
    data_digest,
    extract_concepts,
    generation_prompt_ids,
    load_concepts,
    settings_path,
    say,
    start_engine,
)
from vllm_steer.assets.models import ModelUnavailable
from vllm_steer.lab.metrics import harmonic_mean, mentions, normalized_fluency, repetition, sequence_logprob


# ---- choosing the layer and scale by measuring ------------------------------------------------------
# Neutral requests, none about any concept: the measurement steers these ...
MEASURE_PROMPTS = (
    "Who are you?",
    "Give me three business ideas.",
    "What should I do this weekend?",
    "Tell me a story.",
    "What makes a good friend?",
    "Give me some advice for a job interview.",
    "Describe your morning routine.",
    "How can I be more productive?",
)
# ... and these, never used to choose, check the choice (and the tests use them). Their
# unsteered answers mention no concept ("Write a short poem." was dropped: its answer is
# about the moon, a word of "space").
CHECK_PROMPTS = (
    "What is your favorite color?",
    "How do I make new friends?",
    "How do I learn a new language?",
    "What did you do yesterday?",
    "Give me a tip for saving money.",
    "Tell me about yourself.",
    "What is the best way to relax?",
    "Write a sentence about your day.",
)
SYSTEM_PROMPT = "You are a helpful assistant."  # the notebook's
MEASURE_LAYERS = tuple(range(2, 28, 2))
MEASURE_SCALES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
MEASURE_TOKENS = 40
MAX_REPETITION = 0.25  # a setting whose answers repeat more word 3-grams than this is not chosen ...
MIN_FLUENCY = 0.3  # ... nor one whose answers are this much less likely than unsteered ones (garbled text: < 0.25)


@dataclass
class Measured:
    concept: str
    layer: int
    scale: float
    inclusion: float
    logprob: float
    fluency: float
    repetition: float
    score: float


def chats(prompts: Sequence[str], system: str | None = SYSTEM_PROMPT) -> list[list[dict[str, str]]]:
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": p}] for p in prompts]


def steering_spec(vectors: dict[int, np.ndarray] | np.ndarray, layer: int, scale: float) -> dict[str, Any]:
    """Add ``scale`` times the concept's vector at ``layer`` (an inline vector: no registry needed)."""
    vector = vectors[layer] if isinstance(vectors, dict) else vectors
    return {"vectors": [{"vector": np.asarray(vector, np.float32).tolist(), "layers": [int(layer)], "scale": float(scale)}]}


def generate_and_score(llm, prompts: Sequence[str], specs: Sequence[dict | None], max_tokens: int,
                       system: str | None = SYSTEM_PROMPT, score: bool = True) -> list[tuple[str, float]]:
    """Greedy answers to ``prompts`` (each with its own steering), each with its mean token
    log-probability under the *unsteered* model given only the start of an assistant turn
    (``answer_logprobs``; NaN without ``score``)."""
    from vllm import SamplingParams  # vLLM: ~8 s to import; the CLI imports this module

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, skip_special_tokens=True)
    generated = llm.chat(chats(prompts, system), params, steering=list(specs), use_tqdm=False)
    texts = [out.outputs[0].text.strip() for out in generated]
    if not score:
        return [(text, float("nan")) for text in texts]
    logprobs = answer_logprobs(llm, [list(out.outputs[0].token_ids) for out in generated])
    return list(zip(texts, logprobs))


def answer_logprobs(llm, answers: Sequence[Sequence[int]]) -> list[float]:
    """Mean log-probability of each answer's tokens under the unsteered model, after the
    generation prompt alone: how likely the text is as an assistant's answer, whatever the
    question. The sweep's fluency (vllm_steer/lab/sweep.py) conditions on the question, so an
    answer that turned to the concept counts as disfluent for being off-topic, which is
    what steering is asked to do; this one does not, and still sinks for garbled text."""
    from vllm import SamplingParams  # vLLM: ~8 s to import; the CLI imports this module

    head = generation_prompt_ids(llm.llm.get_tokenizer())
    sequences = [head + list(ids) for ids in answers]
    scored = llm.generate([{"prompt_token_ids": ids} for ids in sequences],
                          SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    return [sequence_logprob(ids, out.prompt_logprobs, len(head)) for ids, out in zip(sequences, scored)]


def measure(llm, vectors: dict[str, dict[int, np.ndarray]], concepts: Sequence[Concept], *,
            layers: Sequence[int] = MEASURE_LAYERS, scales: Sequence[float] = MEASURE_SCALES,
            prompts: Sequence[str] = MEASURE_PROMPTS, max_tokens: int = MEASURE_TOKENS,
            ) -> tuple[dict[str, Any], list[Measured], list[dict[str, Any]]]:
    """Steer every prompt with every concept at every (layer, scale), plus each prompt
    unsteered, in one batched call; score with the sweep's metrics (vllm_steer/lab/metrics.py):
    inclusion (share of answers with one of the concept's words, as whole words), fluency
    (``answer_logprobs`` relative to the unsteered answers', ``exp(difference)`` capped at 1),
    repetition (share of repeated word 3-grams) and score (harmonic mean of inclusion and
    fluency).
    Returns the baseline, one row per (concept, layer, scale) and every answer."""
    runs: list[tuple[str | None, int | None, float | None, str]] = [(None, None, None, p) for p in prompts]
    runs += [(c.name, layer, scale, p) for c in concepts for layer in layers for scale in scales for p in prompts]
    specs = [None if name is None else steering_spec(vectors[name], layer, scale) for name, layer, scale, _ in runs]
    answers = generate_and_score(llm, [p for *_, p in runs], specs, max_tokens)
    words = {c.name: c.words for c in concepts}
    base = answers[:len(prompts)]
    baseline_logprob = float(np.mean([lp for _, lp in base]))
    baseline = {
        "logprob": baseline_logprob,
        "repetition": float(np.mean([repetition(t) for t, _ in base])),
        "inclusion": {c.name: float(np.mean([mentions(t, c.words) for t, _ in base])) for c in concepts},
        "answers": [t for t, _ in base],
    }
    groups: dict[tuple[str, int, float], list[tuple[str, float]]] = {}
    outputs = []
    for (name, layer, scale, prompt), (text, logprob) in zip(runs, answers):
        if name is not None:
            groups.setdefault((name, layer, scale), []).append((text, logprob))
        outputs.append({"concept": name, "layer": layer, "scale": scale, "prompt": prompt, "text": text,
                        "logprob": round(logprob, 4)})
    rows = []
    for (name, layer, scale), group in groups.items():
        inclusion = float(np.mean([mentions(t, words[name]) for t, _ in group]))
        logprob = float(np.mean([lp for _, lp in group]))
        fluency = normalized_fluency(logprob, baseline_logprob)
        rows.append(Measured(name, layer, scale, inclusion, logprob, fluency,
                             float(np.mean([repetition(t) for t, _ in group])), harmonic_mean(inclusion, fluency)))
    return baseline, rows, outputs


def choose(rows: Sequence[Measured], max_repetition: float = MAX_REPETITION, min_fluency: float = MIN_FLUENCY) -> dict[str, Measured]:
    """Per concept, the setting whose answers mention the concept most often, among those
    whose repetition is at most ``max_repetition`` and whose fluency is at least
    ``min_fluency``; among equal inclusion, the most fluent. (A default should visibly steer:
    the harmonic-mean score of the sweep prefers settings that barely do, because every
    mention of the concept costs fluency.) When no setting qualifies: the best score."""
    chosen = {}
    for name in dict.fromkeys(r.concept for r in rows):
        mine = [r for r in rows if r.concept == name]
        candidates = [r for r in mine if r.repetition <= max_repetition and r.fluency >= min_fluency]
        if candidates:
            chosen[name] = max(candidates, key=lambda r: (r.inclusion, r.fluency, -r.scale, -r.layer))
        else:
            chosen[name] = max(mine, key=lambda r: (r.score, -r.scale, -r.layer))
    return chosen


COARSE_SCALES = (1.5, 2.5)
FINE_LAYERS = 3  # the fine pass measures each concept at its 3 best coarse layers


def best_layers(rows: Sequence[Measured], count: int) -> list[int]:
    """The ``count`` layers whose best row ranks highest by ``choose``'s order (qualifying
    rows first, then inclusion, then fluency)."""
    best: dict[int, tuple] = {}
    for r in rows:
        key = (r.repetition <= MAX_REPETITION and r.fluency >= MIN_FLUENCY, r.inclusion, r.fluency)
        best[r.layer] = max(best.get(r.layer, key), key)
    return sorted(sorted(best, key=lambda layer: best[layer], reverse=True)[:count])


def run_measurement(model: str = "smollm2", cache_dir: str | Path | None = None, *, out: str | Path | None = None,
                    rechoose: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Choose each concept's layer and scale by measuring, and write them to ``out`` (default:
    the shipped ``<model>.json``).

    1. Extract every concept's vector at every layer (``extract_concepts``).
    2. Coarse: steer ``MEASURE_PROMPTS`` with each concept at every second layer
       (``MEASURE_LAYERS``) at scales ``COARSE_SCALES`` (``measure``).
    3. Fine: the concept's ``FINE_LAYERS`` best layers of the coarse pass at every scale of
       ``MEASURE_SCALES``.
    4. Choose among the fine rows (``choose``).
    5. Check the choice on ``CHECK_PROMPTS`` (never used to choose): inclusion of the steered
       answers and of the unsteered ones.

    ``rechoose``: skip 2 and 3 and reuse the rows the settings file holds (after a change of
    the rule; the extraction and the check run again).
    """
    from transformers import AutoConfig, AutoTokenizer  # transformers: ~2 s; only --measure needs it

    started = time.monotonic()
    out = Path(out) if out is not None else settings_path(model)
    model_dir = models.model_path(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    concepts = load_concepts()
    previous = json.loads(out.read_text()) if rechoose else None
    llm = start_engine(model_dir)
    outputs: dict[str, list[dict[str, Any]]] = {"coarse": [], "fine": []}
    try:
        all_layers = list(range(AutoConfig.from_pretrained(model_dir).num_hidden_layers))
        vectors = extract_concepts(llm, tokenizer, concepts, all_layers)
        say(quiet, f"extracted in {time.monotonic() - started:.0f} s")
        if previous is not None:
            baseline = previous["baseline"]
            coarse = [Measured(name, **r) for name, rows in previous["coarse"].items() for r in rows]
            fine = [Measured(name, **r) for name, rows in previous["fine"].items() for r in rows]
            measured_with = previous["measured_with"]
        else:
            baseline, coarse, outputs["coarse"] = measure(llm, vectors, concepts, layers=MEASURE_LAYERS, scales=COARSE_SCALES)
            say(quiet, f"coarse pass done at {time.monotonic() - started:.0f} s; fine pass")
            fine = []
            for concept in concepts:
                layers = best_layers([r for r in coarse if r.concept == concept.name], FINE_LAYERS)
                _, rows, more = measure(llm, vectors, [concept], layers=layers, scales=MEASURE_SCALES)
                fine += rows
                outputs["fine"] += [o for o in more if o["concept"] is not None]
            measured_with = {
                "system_prompt": SYSTEM_PROMPT, "prompts": list(MEASURE_PROMPTS), "max_tokens": MEASURE_TOKENS,
                "decoding": "greedy", "fluency": "answer_logprobs (after the generation prompt alone), relative to unsteered",
                "coarse_layers": list(MEASURE_LAYERS), "coarse_scales": list(COARSE_SCALES),
                "fine_layers_per_concept": FINE_LAYERS, "fine_scales": list(MEASURE_SCALES),
                "seconds": round(time.monotonic() - started), "data": data_digest(),
            }
        chosen = choose(fine)
        say(quiet, f"chosen at {time.monotonic() - started:.0f} s; checking on held-out prompts")
        specs = [None] * len(CHECK_PROMPTS) + [steering_spec(vectors[c.name], chosen[c.name].layer, chosen[c.name].scale)
                                               for c in concepts for _ in CHECK_PROMPTS]
        answers = generate_and_score(llm, list(CHECK_PROMPTS) * (1 + len(concepts)), specs, MEASURE_TOKENS)
    finally:
        llm.shutdown()
    plain = [t for t, _ in answers[:len(CHECK_PROMPTS)]]
    checks = {}
    for index, concept in enumerate(concepts):
        steered = [t for t, _ in answers[len(CHECK_PROMPTS) * (index + 1):len(CHECK_PROMPTS) * (index + 2)]]
        checks[concept.name] = {
            "inclusion": float(np.mean([mentions(t, concept.words) for t in steered])),
            "unsteered_inclusion": float(np.mean([mentions(t, concept.words) for t in plain])),
            "answers": steered,
        }

    def row(r: Measured) -> dict[str, Any]:
        return {"layer": r.layer, "scale": r.scale, "inclusion": round(r.inclusion, 3), "fluency": round(r.fluency, 3),
                "logprob": round(r.logprob, 3), "repetition": round(r.repetition, 3), "score": round(r.score, 3)}

    result = {
        "model": model,
        "note": "written by `vllm-steer concepts --measure` (vllm_steer/lab/concepts.py: run_measurement); "
                "steering adds `scale` times the concept's mean difference at the output of decoder layer `layer`",
        "method": METHOD,
        "rule": f"choose: most answers mentioning the concept among settings with repetition <= {MAX_REPETITION} and "
                f"fluency >= {MIN_FLUENCY}; equal inclusion: the more fluent",
        "measured_with": measured_with,
        "check_prompts": list(CHECK_PROMPTS),
        "baseline": {**{k: v for k, v in baseline.items() if k != "answers"},
                     "answers": baseline["answers"], "check_answers": plain},
        "concepts": {
            name: {**row(pick), "check_inclusion": checks[name]["inclusion"],
                   "check_unsteered_inclusion": checks[name]["unsteered_inclusion"],
                   "check_answers": checks[name]["answers"]}
            for name, pick in chosen.items()
        },
        "coarse": {c.name: [row(r) for r in coarse if r.concept == c.name] for c in concepts},
        "fine": {c.name: [row(r) for r in fine if r.concept == c.name] for c in concepts},
    }
    out.write_text(settings_json(result))
    say(quiet, f"wrote {out} in {time.monotonic() - started:.0f} s")
    return {**result, "outputs": outputs}


def settings_json(settings: dict[str, Any]) -> str:
    """The settings file's text: indented, one measured row (or answer list) per line."""
    def dump(value: Any, indent: str) -> str:
        if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
            inner = ",\n".join(f"{indent}  {json.dumps(k)}: {dump(v, indent + '  ')}" for k, v in value.items())
            return "{\n" + inner + "\n" + indent + "}"
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return "[\n" + ",\n".join(f"{indent}  {json.dumps(v, ensure_ascii=False)}" for v in value) + "\n" + indent + "]"
        return json.dumps(value, ensure_ascii=False)

    return dump(settings, "") + "\n"


def main(argv: list[str] | None = None) -> None:
    """``vllm-steer concepts [MODEL] [--measure] [--force] [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="vllm-steer concepts",
        description="Concept vectors (paris, ocean, cooking, space, dogs, formal, pirate, sad) for a named real "
                    "model, extracted with the engine's capture path and cached next to the model; prints the files.")
    parser.add_argument("model", nargs="?", default="smollm2", choices=["smollm2"])
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $VLLM_STEER_CACHE or ~/.cache/vllm-steer)")
    parser.add_argument("--force", action="store_true", help="extract again even when the cached files are current")
    parser.add_argument("--measure", action="store_true",
                        help="choose every concept's layer and scale again by measuring (slow: tens of minutes on 2 CPU "
                             "cores) and write them to the package's settings file (or --settings-out)")
    parser.add_argument("--rechoose", action="store_true",
                        help="with --measure: keep the measured rows of the settings file, choose and check again")
    parser.add_argument("--settings-out", default=None, help="where --measure writes the settings (default: the package's)")
    parser.add_argument("--outputs-out", default=None, help="--measure: also write every generated answer here (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.measure:
            result = run_measurement(args.model, args.cache_dir, out=args.settings_out, rechoose=args.rechoose)
            if args.outputs_out:
                Path(args.outputs_out).write_text(json.dumps(result["outputs"], indent=1, ensure_ascii=False) + "\n")
            print(settings_table(result))
        paths = concept_files(args.model, args.cache_dir, force=args.force)
    except ModelUnavailable as error:
        print(f"vllm-steer concepts: {error}", file=sys.stderr)
        sys.exit(1)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def settings_table(settings: dict[str, Any]) -> str:
    """The chosen layer and scale per concept, as markdown."""
    lines = ["| concept | layer | scale | inclusion | fluency | repetition | score | held-out inclusion (unsteered) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in settings["concepts"].items():
        lines.append(f"| {name} | {c['layer']} | {c['scale']:g} | {c['inclusion']:.0%} | {c['fluency']:.0%} | "
                     f"{c['repetition']:.0%} | {c['score']:.2f} | {c['check_inclusion']:.0%} ({c['check_unsteered_inclusion']:.0%}) |")
    return "\n".join(lines)
