"""Text and score metrics (pure functions) shared by the sweep (sweep.py), the concept
measurement (concepts.py) and the demo corpus (demo/corpus.py): whether a text mentions a
concept, how much it repeats itself, a sequence's mean log-probability, and how those combine
into fluency and a score."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


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
