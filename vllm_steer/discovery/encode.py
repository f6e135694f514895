"""The most active SAE features of residual streams.

The SAE's whole encoder, read a bounded chunk of features at a time (``encoder_chunks`` in
vectors/sae.py), encodes the streams as the SAE's own reference does: ``pre = W_enc (S h -
b_dec) + b_enc`` (``b_dec`` zero and ``S`` one unless the suite subtracts or rescales: the
suites are in vectors/sae.py) then JumpReLU (``pre`` where ``pre > threshold``; a ReLU's threshold is 0; a
BatchTopK SAE's inference threshold) or, for a TopK SAE, the ``k`` largest ``pre`` of each
token over all features (exact: offline, every chunk is seen). What is kept per prompt is the
top ``k`` features of its last token (``over="last"``), of the mean activation over its tokens
(``"mean"``), or of each token (``"token"``); only features that fire (activation > 0) are
listed, most active first (ties: lower index first). Arithmetic is float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

Over = Literal["last", "mean", "token"]
OVER = ("last", "mean", "token")


class FeatureActivation(BaseModel):
    feature: int
    activation: float
    label: str | None = None  # from a feature-explanations export (explanations.py)


class TokenFeatures(BaseModel):
    position: int  # in the prompt's tokens
    token: str | None = None
    features: list[FeatureActivation]


class PromptFeatures(BaseModel):
    """One prompt's top features: ``features`` for ``over`` "last" and "mean", ``tokens``
    (one entry per token) for "token"."""

    over: Over
    features: list[FeatureActivation] | None = None
    tokens: list[TokenFeatures] | None = None


def top_features_of_streams(
    streams: Sequence[np.ndarray],
    sae,
    k: int = 20,
    over: Over = "last",
    *,
    positions: Sequence[Sequence[int]] | None = None,
    tokens: Sequence[Sequence[str]] | None = None,
    features_per_chunk: int | None = None,
) -> list[PromptFeatures]:
    """Top ``k`` features of each prompt's streams (``[tokens, d_model]``, or ``[d_model]``
    for one token) under ``sae`` (a vectors.sae.DecoderSource). ``positions`` and ``tokens``
    label the rows of ``over="token"`` results (default: positions 0, 1, ...)."""
    if over not in OVER:
        raise ValueError(f"over must be one of {', '.join(OVER)}, not {over!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    prompts = [np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in streams]
    if not prompts or any(p.shape[0] == 0 for p in prompts):
        raise ValueError("give at least one stream for each prompt")
    if any(p.ndim != 2 or p.shape[1] != sae.d_model for p in prompts):
        raise ValueError(f"streams must have {sae.d_model} values per token ({sae.description}'s d_model)")
    rows = np.concatenate([p[-1:] if over == "last" else p for p in prompts])
    counts = np.array([1 if over == "last" else len(p) for p in prompts])
    encoding = sae.encoding
    x = encoding.scale * rows - encoding.b_dec
    chunks = ((start, x @ weights.T.astype(np.float64) + encoding.b_enc[start : start + len(weights)])
              for start, weights in sae.encoder_chunks(features_per_chunk))
    if encoding.kind == "topk":
        ranked = _topk_sae(chunks, encoding.k, counts, over, k)
    else:
        ranked = _threshold_sae(chunks, encoding.threshold, counts, over, k)
    if over != "token":
        return [PromptFeatures(over=over, features=features) for features in ranked]
    out, first = [], 0
    for index, count in enumerate(counts):
        where = list(positions[index]) if positions is not None else list(range(count))
        text = list(tokens[index]) if tokens is not None else [None] * count
        out.append(PromptFeatures(over=over, tokens=[
            TokenFeatures(position=where[i], token=text[i], features=ranked[first + i]) for i in range(count)
        ]))
        first += count
    return out


def _threshold_sae(chunks, threshold: np.ndarray, counts: np.ndarray, over: Over, k: int) -> list[list[FeatureActivation]]:
    """Activations are per feature (JumpReLU/ReLU): each chunk is reduced to its groups
    (prompts, or tokens) and only each group's k best so far are kept."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    best = _Best(len(counts) if over != "token" else int(counts.sum()), k)
    for start, pre in chunks:
        active = np.where(pre > threshold[start : start + pre.shape[1]], pre, 0.0)
        best.add(np.add.reduceat(active, starts, axis=0) / counts[:, None] if over == "mean" else active, start)
    return [_ranked(indices, values, k) for indices, values in zip(best.indices, best.values)]


def _topk_sae(chunks, sae_k: int, counts: np.ndarray, over: Over, k: int) -> list[list[FeatureActivation]]:
    """A TopK SAE's activation of a token needs every feature's ``pre``: the ``sae_k``
    largest of each token are kept across chunks, then reduced to the groups."""
    best = _Best(int(counts.sum()), sae_k)
    for start, pre in chunks:
        best.add(pre, start)
    values = np.maximum(best.values, 0.0)
    if over != "mean":
        return [_ranked(indices, row, k) for indices, row in zip(best.indices, values)]
    out, first = [], 0
    for count in counts:
        indices, inverse = np.unique(best.indices[first : first + count], return_inverse=True)
        sums = np.bincount(inverse.reshape(-1), weights=values[first : first + count].reshape(-1), minlength=len(indices))
        out.append(_ranked(indices, sums / count, k))
        first += count
    return out


def _ranked(indices: np.ndarray, values: np.ndarray, k: int) -> list[FeatureActivation]:
    """The k most active of the features that fire, most active first, ties by index."""
    firing = values > 0
    indices, values = indices[firing], values[firing]
    order = np.lexsort((indices, -values))[:k]
    return [FeatureActivation(feature=int(indices[i]), activation=float(values[i])) for i in order]


class _Best:
    """The ``m`` largest values of each row seen so far, with their feature indices."""

    def __init__(self, rows: int, m: int):
        self.m = m
        self.values = np.full((rows, 0), -np.inf)
        self.indices = np.zeros((rows, 0), np.int64)

    def add(self, values: np.ndarray, start: int) -> None:
        columns = np.arange(start, start + values.shape[1])
        values = np.concatenate([self.values, values], axis=1)
        indices = np.concatenate([self.indices, np.broadcast_to(columns, (len(values), len(columns)))], axis=1)
        if values.shape[1] > self.m:
            keep = np.argpartition(-values, self.m - 1, axis=1)[:, : self.m]
            values, indices = np.take_along_axis(values, keep, 1), np.take_along_axis(indices, keep, 1)
        self.values, self.indices = values, indices
