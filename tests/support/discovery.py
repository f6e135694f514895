"""Finding features, checked against dense numpy encodings written from the formulas, and the
random SAEs the engine and server discovery tests share."""

from __future__ import annotations

import numpy as np
import torch

from support.engines import CACHE

HIDDEN, D_SAE = 256, 48
LAYERS = {"relu": 0, "topk": 2}  # dictionary_learning ae.pt (ReLU); Qwen-Scope layer2.sae.pt (TopK, k = 6)


def oracle(streams, encoder, b_enc, b_dec, threshold, sae_k, over, k):
    """Dense float64 encoding of every token, then the top k per prompt (or token), from the formulas."""
    results = []
    for stream in streams:
        pre = (np.atleast_2d(stream).astype(np.float64) - b_dec) @ encoder.T.astype(np.float64) + b_enc
        if sae_k is None:
            act = np.where(pre > threshold, pre, 0.0)
        else:  # TopK: each token's sae_k largest pre-activations, those above 0
            act = np.zeros_like(pre)
            top = np.argsort(-pre, axis=1)[:, :sae_k]
            np.put_along_axis(act, top, np.maximum(np.take_along_axis(pre, top, 1), 0.0), 1)
        rows = {"last": act[-1:], "mean": act.mean(0, keepdims=True), "token": act}[over]
        results.append([top_k(row, k) for row in rows])
    return results


def top_k(row, k):
    order = sorted((i for i in range(len(row)) if row[i] > 0), key=lambda i: (-row[i], i))[:k]
    return [(i, row[i]) for i in order]


def as_pairs(result):
    groups = [t.features for t in result.tokens] if result.over == "token" else [result.features]
    return [[(f.feature, f.activation) for f in group] for group in groups]


def assert_same(got, expected):
    for result, want in zip(got, expected, strict=True):
        for features, wanted in zip(as_pairs(result), want, strict=True):
            assert [f for f, _ in features] == [f for f, _ in wanted]
            np.testing.assert_allclose([a for _, a in features], [a for _, a in wanted], rtol=0, atol=1e-5)


def feature_saes(hf_model, prompt_ids):
    """Random SAEs whose features fire on about a third of the model's own stream values."""
    with torch.no_grad():
        states = hf_model(torch.tensor([prompt_ids[0]]), output_hidden_states=True).hidden_states
    out = {}
    for kind, layer in LAYERS.items():
        rng = np.random.default_rng(layer)
        encoder = (rng.standard_normal((D_SAE, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
        b_dec = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        decoder = rng.standard_normal((HIDDEN, D_SAE)).astype(np.float32)
        pre = (states[layer + 1][0].double().numpy() - b_dec) @ encoder.T.astype(np.float64)
        b_enc = (-np.quantile(pre, 0.66, axis=0)).astype(np.float32)
        weights = {"encoder": torch.from_numpy(encoder), "b_enc": torch.from_numpy(b_enc),
                   "decoder": torch.from_numpy(decoder), "b_dec": torch.from_numpy(b_dec)}
        if kind == "relu":
            path = CACHE / "test-feature-saes" / f"resid_post_layer_{layer}" / "ae.pt"
            state = {"encoder.weight": weights["encoder"], "encoder.bias": weights["b_enc"],
                     "decoder.weight": weights["decoder"], "b_dec": weights["b_dec"]}
        else:
            path = CACHE / "test-feature-saes" / "SAE-Res-Tiny-W48-L0_6" / f"layer{layer}.sae.pt"
            state = {"W_enc": weights["encoder"], "b_enc": weights["b_enc"], "W_dec": weights["decoder"],
                     "b_dec": weights["b_dec"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        # Qwen-Scope's encoder reads h itself (SAELens: apply_b_dec_to_input False); dictionary_learning's h - b_dec.
        read_b_dec = b_dec if kind == "relu" else np.zeros_like(b_dec)
        out[kind] = (str(path), encoder, b_enc, read_b_dec, np.zeros(D_SAE, np.float32), 6 if kind == "topk" else None)
    return out
