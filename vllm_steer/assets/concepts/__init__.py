"""Concept vectors for a real model, from contrast sentences shipped with the package.

    vllm-steer concepts                    # SmolLM2: extract (once, cached) and print the files

The data (plain JSON, one file per concept, written by hand): ``paris`` (Paris and the Eiffel
Tower), ``ocean``, ``cooking``, ``space``, ``dogs`` (topics) and ``formal``, ``pirate``,
``sad`` (styles). Each holds 30 pairs: a sentence about the concept (or in the style) and a
matched neutral sentence of the same shape (the same content, plainly said, for the styles;
for ``dogs``, half of them about another animal, so that the direction is dogs rather than
"cute animals"), and the words whose presence in an answer counts as "mentions the concept".

**Extraction** (``extract_concepts``), through the serving engine's own capture path: each
sentence is given as the start of an assistant turn (the chat template's generation prompt,
then the sentence), and the engine captures the residual stream after every layer, averaged
over the prompt's tokens (``reduce="mean"``). The mean over the *sentence's* tokens is
recovered exactly by removing the generation prompt's share (the same tokens at the start of
every prompt, so the same activations, captured once). A concept's vector at layer ``L`` is
the mean over its positive sentences minus the mean over the neutral ones (the CAA /
difference-of-means direction). Why the sentence's tokens and not the last one: the last
token of a sentence ("." mostly) carries little of the topic, and its difference steered
SmolLM2 toward whatever was nearby (an "Eiffel Tower" vector taken there wrote about
planets). Why not the plain mean over the prompt: the first token of every sequence is an
attention sink whose stream is 10-100x larger than the others from layer 12 on, so a mean
that includes it is dominated by it.

**Defaults** (``<model>.json`` next to the data, e.g. ``smollm2.json``): the layer and scale
each concept is steered with by default (add ``scale`` times the vector at ``layer``), chosen
by measuring: ``vllm-steer concepts --measure`` (vllm_steer/lab/concepts.py, which says how
and what it found).

**Files** (``concepts_dir(model)``, next to the converted model): ``layers.safetensors`` holds
each concept's vector at every layer (``NAME.layer.L``: ``{"name": "paris", "layers": [18],
"scale": 2.5}`` adds 2.5 times the mean difference at layer 18), ``default.safetensors`` each
concept at its default layer, already multiplied by its default scale (``{"name": "paris",
"scale": 1}`` is the measured setting; 0.5 is gentler, 1.5 stronger), and ``meta.json``.
They are rebuilt when the data, the defaults or the model change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from safetensors.numpy import save_file

from vllm_steer.assets import models

HERE = Path(__file__).resolve().parent
NAMES = ("paris", "ocean", "cooking", "space", "dogs", "formal", "pirate", "sad")
# Bumped when the extraction method changes (cached files are then rebuilt).
METHOD = "mean-difference over sentence tokens after the generation prompt, v1"
# Engines started here: in-process and eager (they start in seconds), a small KV cache.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=256, seed=0)


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str  # "topic" or "style"
    description: str
    words: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]  # (about the concept, matched neutral sentence)

    @property
    def positive(self) -> list[str]:
        return [p for p, _ in self.pairs]

    @property
    def negative(self) -> list[str]:
        return [n for _, n in self.pairs]


def load_concepts(names: Sequence[str] | None = None) -> list[Concept]:
    concepts = []
    for name in names or NAMES:
        path = HERE / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"no concept {name!r}; known: {', '.join(NAMES)}")
        data = json.loads(path.read_text())
        pairs = tuple((str(p), str(n)) for p, n in data["pairs"])
        concepts.append(Concept(data["name"], data["kind"], data["description"], tuple(data["words"]), pairs))
    return concepts


def settings_path(model: str) -> Path:
    return HERE / f"{model}.json"


def load_settings(model: str = "smollm2") -> dict[str, Any]:
    """The measured defaults for ``model``: ``{"concepts": {name: {"layer", "scale", ...}}, ...}``."""
    path = settings_path(model)
    if not path.is_file():
        raise ValueError(f"no measured concept settings for {model!r} ({path.name}); run vllm-steer concepts --measure")
    return json.loads(path.read_text())


def data_digest(names: Sequence[str] = NAMES) -> str:
    """sha256 of the concept data files (sentences and words) and the extraction method."""
    digest = hashlib.sha256(METHOD.encode())
    for name in names:
        digest.update(name.encode() + b"\0" + (HERE / f"{name}.json").read_bytes())
    return digest.hexdigest()


# ---- extraction -------------------------------------------------------------------------------
def generation_prompt_ids(tokenizer) -> list[int]:
    """The tokens that open an assistant turn (the chat template's generation prompt, with the
    tokenizer's BOS when it adds one): ``<|im_start|>assistant\\n`` for SmolLM2."""
    chat = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    if not with_prompt.startswith(without) or len(with_prompt) == len(without):
        raise ValueError("this tokenizer's chat template has no separate generation prompt")
    return tokenizer(with_prompt[len(without):], add_special_tokens=True)["input_ids"]


def answer_ids(tokenizer, head: list[int], sentence: str) -> list[int]:
    """The generation prompt, then ``sentence`` as the start of the answer."""
    return head + tokenizer(sentence, add_special_tokens=False)["input_ids"]


def sentence_means(llm, tokenizer, sentences: Sequence[str], layers: Sequence[int]) -> dict[int, np.ndarray]:
    """``{layer: [len(sentences), hidden]}``: the residual stream after each layer averaged over
    each sentence's tokens, given as the start of an assistant answer. Captured by ``llm`` (a
    SteeredLLM with capture on) as the mean over the whole prompt; the generation prompt's share
    (the same first tokens in every prompt, hence the same activations) is taken out exactly."""
    head = generation_prompt_ids(tokenizer)
    prompts = [answer_ids(tokenizer, head, s) for s in sentences]
    rows = llm.capture([{"prompt_token_ids": head}] + [{"prompt_token_ids": p} for p in prompts],
                       list(layers), reduce="mean", use_tqdm=False)
    head_rows, rows = rows[0], rows[1:]
    out = {}
    for layer in layers:
        head_sum = len(head) * head_rows[layer].astype(np.float64)
        out[layer] = np.stack([
            (len(p) * r[layer].astype(np.float64) - head_sum) / (len(p) - len(head)) for p, r in zip(prompts, rows)
        ])
    return out


def extract_concepts(llm, tokenizer, concepts: Sequence[Concept], layers: Sequence[int]) -> dict[str, dict[int, np.ndarray]]:
    """``{concept: {layer: mean difference}}`` (float32), all sentences in one engine call."""
    from vllm_steer.vectors.extract import mean_difference  # torch (vllm_steer.vectors): ~2.5 s; the CLI imports this module

    sentences = [s for c in concepts for s in c.positive + c.negative]
    means = sentence_means(llm, tokenizer, sentences, layers)
    found: dict[str, dict[int, np.ndarray]] = {}
    start = 0
    for concept in concepts:
        n_pos, n_neg = len(concept.positive), len(concept.negative)
        found[concept.name] = {
            layer: mean_difference(means[layer][start:start + n_pos], means[layer][start + n_pos:start + n_pos + n_neg])
            for layer in layers
        }
        start += n_pos + n_neg
    return found


@contextmanager
def engine_environment():
    """The process environment for the engines started here (restored afterwards)."""
    saved = dict(os.environ)
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_engine(model_dir: str | Path, **overrides):
    """An in-process, eager SteeredLLM with capture on (starts in seconds)."""
    from vllm_steer import SteeredLLM  # vLLM: ~8 s to import; the CLI imports this module

    with engine_environment():
        return SteeredLLM(model_dir, capture=True, **{**ENGINE_ARGS, **overrides})


# ---- the cached files ---------------------------------------------------------------------------
def concepts_dir(model: str = "smollm2", cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models/<model folder>.concepts``: next to the converted model."""
    if model != "smollm2":
        raise ValueError(f"concept vectors are cached for the named real model only (smollm2), not {model!r}")
    folder = models.smollm2_dir(cache_dir)
    return folder.parent / f"{folder.name}.concepts"


def _cache_key(model: str, model_dir: Path) -> dict[str, str]:
    marker = model_dir / ".vllm-steer-complete.json"
    settings = settings_path(model)
    return {
        "data": data_digest(),
        "settings": hashlib.sha256(settings.read_bytes()).hexdigest() if settings.is_file() else "",
        "model": hashlib.sha256(marker.read_bytes()).hexdigest() if marker.is_file() else str(model_dir),
    }


def concept_files(model: str = "smollm2", cache_dir: str | Path | None = None, *, llm=None,
                  force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """``{"layers", "default", "meta"}`` paths of the concept vectors for ``model``, extracted
    the first time (and whenever the data, the defaults or the model changed). ``llm``: an
    engine with capture on to extract with (default: one started here and stopped after)."""
    model_dir = models.model_path(model, cache_dir)
    target = concepts_dir(model, cache_dir)
    paths = {"layers": target / "layers.safetensors", "default": target / "default.safetensors", "meta": target / "meta.json"}
    key = _cache_key(model, model_dir)

    def current() -> bool:
        return paths["meta"].is_file() and json.loads(paths["meta"].read_text()).get("key") == key

    if not force and current():
        return paths
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{target.name}.lock"), timeout=3600):
        if not force and current():
            return paths
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _build(model, model_dir, work, key, llm=llm, quiet=quiet)
            work.chmod(target.parent.stat().st_mode & 0o777)
            if target.exists():
                shutil.rmtree(target)
            os.rename(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return paths


def _build(model: str, model_dir: Path, work: Path, key: dict[str, str], *, llm, quiet: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer  # transformers: ~2 s; only an extraction needs it

    settings = load_settings(model)["concepts"]
    concepts = load_concepts()
    layers = list(range(AutoConfig.from_pretrained(model_dir).num_hidden_layers))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.monotonic()
    own = llm is None
    if own:
        say(quiet, f"extracting {len(concepts)} concept vectors at {len(layers)} layers from {model_dir}")
        llm = start_engine(model_dir)
    try:
        found = extract_concepts(llm, tokenizer, concepts, layers)
    finally:
        if own:
            llm.shutdown()
    every_layer = {f"{name}.layer.{layer}": v.astype(np.float32) for name, by_layer in found.items() for layer, v in by_layer.items()}
    save_file(every_layer, str(work / "layers.safetensors"))
    default = {}
    for name, by_layer in found.items():
        chosen = settings[name]
        default[f"{name}.layer.{chosen['layer']}"] = (float(chosen["scale"]) * by_layer[int(chosen["layer"])]).astype(np.float32)
    save_file(default, str(work / "default.safetensors"))
    (work / "meta.json").write_text(json.dumps({
        "key": key, "model": model, "model_dir": str(model_dir), "method": METHOD, "layers": layers,
        "defaults": {name: {"layer": s["layer"], "scale": s["scale"]} for name, s in settings.items()},
        "norms": {name: {str(layer): round(float(np.linalg.norm(v)), 3) for layer, v in by_layer.items()} for name, by_layer in found.items()},
        "seconds": round(time.monotonic() - started, 1),
    }, indent=2) + "\n")
    say(quiet, f"extracted in {time.monotonic() - started:.0f} s")


def say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[vllm-steer] {message}", file=sys.stderr, flush=True)
