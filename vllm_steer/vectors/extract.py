"""Concept vectors from contrast sets, with activations captured by the serving engine.

    vectors = extract(llm, positive=["I love ...", ...], negative=["I hate ...", ...], layers=[8, 12])

- ``mean``: the mean difference of the two sets (CAA / DiffMean): mean(positive) - mean(negative).
- ``pca``: repeng's PCA-diff: the first principal component of the paired differences
  (centered), signed so that positives project higher than their negatives in most pairs;
  unit length.
Activations are the residual stream after each layer, at the last prompt token or averaged
over the prompt's tokens (``reduce``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

Method = Literal["mean", "pca"]


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """[n, hidden], [m, hidden] -> [hidden]"""
    return (positive.astype(np.float64).mean(0) - negative.astype(np.float64).mean(0)).astype(np.float32)


def pca_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Paired [n, hidden] sets -> the unit first principal component of their differences."""
    if positive.shape != negative.shape:
        raise ValueError(f"pca needs paired sets of equal size, got {len(positive)} and {len(negative)}")
    differences = positive.astype(np.float64) - negative.astype(np.float64)
    centered = differences - differences.mean(0)
    if len(differences) < 2 or not np.any(centered):
        raise ValueError("pca needs at least two pairs whose differences vary")
    direction = np.linalg.svd(centered, full_matrices=False)[2][0]
    if np.mean(positive @ direction < negative @ direction) > 0.5:
        direction = -direction
    return direction.astype(np.float32)


METHODS = {"mean": mean_difference, "pca": pca_difference}


def extract(
    llm,
    positive: Sequence,
    negative: Sequence,
    layers: Sequence[int],
    *,
    method: Method = "mean",
    reduce: str = "last",
    use_tqdm: bool = True,
) -> dict[int, np.ndarray]:
    """``{layer: vector}`` from two prompt sets, captured with ``llm`` (a SteeredLLM with capture on)."""
    if not positive or not negative:
        raise ValueError("both the positive and the negative set need at least one prompt")
    captured = llm.capture(list(positive) + list(negative), layers, reduce=reduce, use_tqdm=use_tqdm)
    split = len(positive)
    return {
        layer: METHODS[method](
            np.stack([c[layer] for c in captured[:split]]), np.stack([c[layer] for c in captured[split:]])
        )
        for layer in layers
    }


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped) or a JSON list of strings."""
    text = Path(path).read_text()
    prompts = json.loads(text) if text.lstrip().startswith("[") else [line for line in text.splitlines() if line.strip()]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SystemExit(f"{path}: expected prompts, one per line or a JSON list of non-empty strings")
    return prompts
