"""Every SAE suite the package reads, as a small synthetic file in the suite's exact layout
(file and folder names, keys, orientation, config), with a non-zero ``b_dec`` and, where the
suite has one, a non-trivial input normalization; and each suite's encoder written here from
its own reference code (cited at each suite), not from vllm_steer.vectors.sae.

``SuiteSae.activation(h)`` is the reference's feature activations of streams ``h``
(``[tokens, d_model]``), ``SuiteSae.direction(f)`` the change of the reference's reconstruction
per unit of feature ``f``'s activation, in the stream's units. ``SuiteSae.other_b_dec(h)``
encodes with the opposite choice of subtracting ``b_dec``: tests use it to show they would
catch a suite read the wrong way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FEATURE = 3  # the feature each test steers or gates on
TOP_K = 4  # the TopK suites' k


@dataclass
class SuiteSae:
    suite: str
    source: str  # what load_sae is given
    layer: int
    kind: str  # "threshold" (JumpReLU/ReLU: one feature's activation is its own) or "topk"
    pre: Callable[[np.ndarray, bool], np.ndarray]  # (h, subtract_b_dec) -> [tokens, d_sae] pre-activations
    subtracts_b_dec: bool  # what the suite's reference does
    threshold: np.ndarray  # [d_sae] the gate on pre (zeros for ReLU and TopK)
    decoder: np.ndarray  # [d_sae, d_model] the reconstruction per unit activation, in the stream's units

    def activation(self, h: np.ndarray) -> np.ndarray:
        return self._activate(self.pre(np.atleast_2d(h).astype(np.float64), self.subtracts_b_dec))

    def other_b_dec(self, h: np.ndarray) -> np.ndarray:
        return self._activate(self.pre(np.atleast_2d(h).astype(np.float64), not self.subtracts_b_dec))

    def _activate(self, pre: np.ndarray) -> np.ndarray:
        if self.kind == "topk":  # each token's k largest pre-activations, those above 0
            out = np.zeros_like(pre)
            top = np.argsort(-pre, axis=1, kind="stable")[:, :TOP_K]
            np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, 1), 0.0), 1)
            return out
        return np.where(pre > self.threshold, np.maximum(pre, 0.0), 0.0)  # relu(pre) * (pre > threshold)

    def direction(self, feature: int) -> np.ndarray:
        return self.decoder[feature]


@dataclass
class Weights:
    """Random weights calibrated on ``streams`` so that FEATURE's reference activation is
    positive on about half of them, and ``b_dec`` moves FEATURE's pre-activation by about the
    spread of its values (reading the suite the wrong way changes which tokens fire)."""

    encoder: np.ndarray  # [d_sae, d_model]
    b_enc: np.ndarray
    b_dec: np.ndarray
    decoder: np.ndarray  # [d_sae, d_model]
    threshold: np.ndarray


def weights(streams: np.ndarray, d_sae: int, seed: int, *, gate: float, scale: float = 1.0,
            subtract: bool = True) -> Weights:
    """``gate``: the threshold on pre-activations (0 for ReLU); ``scale`` and ``subtract``: how
    the suite's reference reads the stream (``pre = W (scale h - b_dec) + b_enc``)."""
    streams = np.atleast_2d(streams).astype(np.float64)
    d_model = streams.shape[1]
    rng = np.random.default_rng(seed)
    encoder = rng.standard_normal((d_sae, d_model)) / np.sqrt(d_model)
    raw = scale * streams @ encoder.T  # [tokens, d_sae]
    spread = raw.std(axis=0) + 1e-3
    b_dec = rng.standard_normal(d_model) * float(spread.mean()) / 2
    along = encoder[FEATURE] / np.dot(encoder[FEATURE], encoder[FEATURE])
    b_dec += (1.5 * spread[FEATURE] - np.dot(encoder[FEATURE], b_dec)) * along  # <e_F, b_dec> = 1.5 spread
    pre = raw - (b_dec @ encoder.T if subtract else 0.0)
    # Every feature fires on about half the tokens; FEATURE's median sits between two tokens.
    ordered = np.sort(pre, axis=0)
    middle = len(ordered) // 2
    b_enc = gate - (ordered[middle - 1] + ordered[middle]) / 2 if len(ordered) > 1 else gate - ordered[0] + 0.5
    norm = float(np.linalg.norm(streams, axis=1).mean())
    decoder = rng.standard_normal((d_sae, d_model)) * norm / (2 * np.sqrt(d_model))
    as32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return Weights(as32(encoder), as32(b_enc), as32(b_dec), as32(decoder), np.full(d_sae, gate, np.float32))


def _pre(encoder, b_enc, b_dec, scale: float = 1.0):
    """``(h, subtract) -> W_enc (scale h - b_dec) + b_enc`` in float64 (b_dec only with subtract)."""
    enc, be, bd = (np.asarray(a, np.float64) for a in (encoder, b_enc, b_dec))
    return lambda h, subtract: (scale * h - (bd if subtract else 0.0)) @ enc.T + be


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _t(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


# ---- dictionary_learning (saprmarks/dictionary_learning) ------------------------------------------
def dictionary_learning_autoencoder(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """``AutoEncoder.encode`` (dictionary_learning/dictionary.py): ``relu(self.encoder(x - self.bias))``,
    its decoder bias stored as ``bias``."""
    w = weights(streams, d_sae, 11, gate=0.0)
    path = _folder(root / f"resid_post_layer_{layer}" / "trainer_0") / "ae.pt"
    torch.save({"encoder.weight": _t(w.encoder), "encoder.bias": _t(w.b_enc), "decoder.weight": _t(w.decoder.T),
                "bias": _t(w.b_dec)}, path)
    (path.parent / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    return SuiteSae("dictionary_learning AutoEncoder", str(path), layer, "threshold", _pre(w.encoder, w.b_enc, w.b_dec),
                    True, np.zeros(d_sae), w.decoder)


def dictionary_learning_batchtopk(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """``BatchTopKSAE.encode`` (trainers/batch_top_k.py, ``use_threshold=True``):
    ``relu(self.encoder(x - self.b_dec))`` kept where it is above the scalar ``threshold``."""
    w = weights(streams, d_sae, 12, gate=0.2)
    path = _folder(root / f"resid_post_layer_{layer}" / "trainer_1") / "ae.pt"
    torch.save({"encoder.weight": _t(w.encoder), "encoder.bias": _t(w.b_enc), "decoder.weight": _t(w.decoder.T),
                "b_dec": _t(w.b_dec), "threshold": torch.tensor(0.2), "k": torch.tensor(TOP_K)}, path)
    (path.parent / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": TOP_K}}))
    return SuiteSae("dictionary_learning BatchTopKSAE", str(path), layer, "threshold",
                    _pre(w.encoder, w.b_enc, w.b_dec), True, np.full(d_sae, 0.2), w.decoder)


def dictionary_learning_topk(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """``AutoEncoderTopK.encode`` (trainers/top_k.py, ``use_threshold=False`` by default):
    ``relu(self.encoder(x - self.b_dec))`` then each token's top ``k``; the threshold it
    tracks is stored but not used."""
    w = weights(streams, d_sae, 13, gate=0.0)
    path = _folder(root / f"resid_post_layer_{layer}" / "trainer_2") / "ae.pt"
    torch.save({"encoder.weight": _t(w.encoder), "encoder.bias": _t(w.b_enc), "decoder.weight": _t(w.decoder.T),
                "b_dec": _t(w.b_dec), "threshold": torch.tensor(0.3), "k": torch.tensor(TOP_K)}, path)
    (path.parent / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": TOP_K}}))
    return SuiteSae("dictionary_learning AutoEncoderTopK", str(path), layer, "topk", _pre(w.encoder, w.b_enc, w.b_dec),
                    True, np.zeros(d_sae), w.decoder)


def dictionary_learning_jumprelu(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """``JumpReluAutoEncoder.encode`` (dictionary_learning/dictionary.py): ``x @ W_enc + b_enc``
    (``apply_b_dec_to_input`` defaults to False), ``relu(pre * (pre > threshold))``."""
    w = weights(streams, d_sae, 14, gate=0.3, subtract=False)
    path = _folder(root / f"resid_post_layer_{layer}" / "trainer_3") / "ae.pt"
    torch.save({"W_enc": _t(w.encoder.T), "b_enc": _t(w.b_enc), "W_dec": _t(w.decoder), "b_dec": _t(w.b_dec),
                "threshold": _t(w.threshold)}, path)
    return SuiteSae("dictionary_learning JumpReluAutoEncoder", str(path), layer, "threshold",
                    _pre(w.encoder, w.b_enc, w.b_dec), False, w.threshold, w.decoder)


# ---- SAELens (sae_lens/saes/sae.py, jumprelu_sae.py) ----------------------------------------------
def _saelens(root: Path, name: str, layer: int, w: Weights, config: dict, *, threshold: bool) -> Path:
    folder = _folder(root / name / f"blocks.{layer}.hook_resid_post")
    tensors = {"W_enc": _t(w.encoder.T), "W_dec": _t(w.decoder), "b_enc": _t(w.b_enc), "b_dec": _t(w.b_dec)}
    save_file(tensors | ({"threshold": _t(w.threshold)} if threshold else {}), str(folder / "sae_weights.safetensors"))
    base = {"d_in": w.encoder.shape[1], "d_sae": w.encoder.shape[0], "hook_name": f"blocks.{layer}.hook_resid_post"}
    (folder / "cfg.json").write_text(json.dumps(base | config))
    return folder


def saelens_standard(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """SAELens ``standard`` with the default ``apply_b_dec_to_input: true``: ``process_sae_in``
    is ``sae_in - b_dec``, then ``relu(sae_in @ W_enc + b_enc)``."""
    w = weights(streams, d_sae, 21, gate=0.0)
    folder = _saelens(root, "standard", layer, w, {"architecture": "standard", "apply_b_dec_to_input": True,
                                                    "normalize_activations": "none"}, threshold=False)
    return SuiteSae("SAELens standard", str(folder), layer, "threshold", _pre(w.encoder, w.b_enc, w.b_dec), True,
                    np.zeros(d_sae), w.decoder)


def saelens_jumprelu(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """SAELens ``jumprelu`` with ``apply_b_dec_to_input: false`` (as its Gemma Scope configs):
    ``relu(pre) * (pre > threshold)`` with ``pre = h @ W_enc + b_enc``."""
    w = weights(streams, d_sae, 22, gate=0.25, subtract=False)
    folder = _saelens(root, "jumprelu", layer, w, {"architecture": "jumprelu", "apply_b_dec_to_input": False},
                      threshold=True)
    return SuiteSae("SAELens jumprelu", str(folder), layer, "threshold", _pre(w.encoder, w.b_enc, w.b_dec), False,
                    w.threshold, w.decoder)


SAELENS_SCALE = 1.75


def saelens_scaled(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """SAELens ``normalize_activations: expected_average_only_in`` with its release's
    ``norm_scaling_factor`` S, given on the source: SAELens folds it at load
    (``fold_activation_norm_scaling_factor``: ``W_enc *= S; W_dec /= S; b_dec /= S``), so
    ``pre = (h - b_dec / S) @ (S W_enc) + b_enc`` and the reconstruction moves by ``W_dec / S``."""
    w = weights(streams, d_sae, 23, gate=0.25, scale=SAELENS_SCALE)
    folder = _saelens(root, "scaled", layer, w, {"architecture": "jumprelu", "normalize_activations":
                                                 "expected_average_only_in"}, threshold=True)
    return SuiteSae("SAELens expected_average_only_in", f"{folder}#norm_scaling_factor={SAELENS_SCALE}", layer,
                    "threshold", _pre(w.encoder, w.b_enc, w.b_dec, SAELENS_SCALE), True, w.threshold,
                    w.decoder / SAELENS_SCALE)


# ---- Gemma Scope, Gemma Scope 2 --------------------------------------------------------------------
def gemma_scope(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """The Gemma Scope tutorial's ``JumpReLUSAE.encode``: ``pre_acts = input_acts @ self.W_enc +
    self.b_enc``, ``mask = (pre_acts > self.threshold)``, ``mask * relu(pre_acts)``: no b_dec."""
    w = weights(streams, d_sae, 31, gate=0.3, subtract=False)
    folder = _folder(root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_71")
    np.savez(folder / "params.npz", W_enc=w.encoder.T.copy(), W_dec=w.decoder, b_enc=w.b_enc, b_dec=w.b_dec,
             threshold=w.threshold)
    return SuiteSae("Gemma Scope", str(folder / "params.npz"), layer, "threshold", _pre(w.encoder, w.b_enc, w.b_dec),
                    False, w.threshold, w.decoder)


def gemma_scope_2(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """Gemma Scope 2 (SAELens ``gemma_3_sae_huggingface_loader``, ``apply_b_dec_to_input:
    False``): the same encoder as Gemma Scope's, lower-case keys."""
    w = weights(streams, d_sae, 32, gate=0.3, subtract=False)
    folder = _folder(root / "resid_post" / f"layer_{layer}_width_16k_l0_medium")
    save_file({"w_enc": _t(w.encoder.T), "w_dec": _t(w.decoder), "b_enc": _t(w.b_enc), "b_dec": _t(w.b_dec),
               "threshold": _t(w.threshold)}, str(folder / "params.safetensors"))
    hook = f"model.layers.{layer}.output"
    (folder / "config.json").write_text(json.dumps({"hf_hook_point_in": hook, "hf_hook_point_out": hook,
                                                    "architecture": "jump_relu", "width": d_sae, "type": "sae"}))
    return SuiteSae("Gemma Scope 2", str(folder / "params.safetensors"), layer, "threshold",
                    _pre(w.encoder, w.b_enc, w.b_dec), False, w.threshold, w.decoder)


# ---- Llama Scope, Qwen-Scope, Goodfire -------------------------------------------------------------
LLAMA_SCOPE_NORM = 37.5  # dataset_average_activation_norm["in"]
LLAMA_SCOPE_THRESHOLD = 0.1  # jump_relu_threshold


def llama_scope(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """SAELens ``get_llama_scope_config_from_hf`` (OpenMOSS lm_saes ``compute_norm_factor``
    "dataset-wise"): ``S = sqrt(d_model) / dataset_average_activation_norm["in"]``, folded as
    ``W_enc *= S``, ``W_dec /= S``; no b_dec (``apply_b_dec_to_input: False``); gated at
    ``jump_relu_threshold * S``."""
    d_model = np.atleast_2d(streams).shape[1]
    scale = math.sqrt(d_model) / LLAMA_SCOPE_NORM
    gate = LLAMA_SCOPE_THRESHOLD * scale
    w = weights(streams, d_sae, 41, gate=gate, scale=scale, subtract=False)
    folder = _folder(root / "Llama3_1-8B-Base-LXR-8x" / f"Llama3_1-8B-Base-L{layer}R-8x")
    _folder(folder / "checkpoints")
    save_file({"encoder.weight": _t(w.encoder), "encoder.bias": _t(w.b_enc), "decoder.weight": _t(w.decoder.T),
               "decoder.bias": _t(w.b_dec)}, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps({
        "hook_point_in": f"blocks.{layer}.hook_resid_post", "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "d_model": d_model, "d_sae": d_sae, "act_fn": "jumprelu", "jump_relu_threshold": LLAMA_SCOPE_THRESHOLD,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": LLAMA_SCOPE_NORM, "out": LLAMA_SCOPE_NORM},
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True,
        "top_k": 50, "dtype": "torch.float32",
    }))
    return SuiteSae("Llama Scope", str(folder / "checkpoints" / "final.safetensors"), layer, "threshold",
                    _pre(w.encoder, w.b_enc, w.b_dec, scale), False, np.full(d_sae, gate), w.decoder / scale)


def qwen_scope(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """Qwen-Scope (SAELens ``get_qwen_scope_config_from_hf``: ``architecture: topk`` with k from
    the repo name's ``L0_{k}``, ``apply_b_dec_to_input: False``): TopK of ``h @ W_enc.T + b_enc``."""
    w = weights(streams, d_sae, 51, gate=0.0, subtract=False)
    folder = _folder(root / f"SAE-Res-Tiny-W{d_sae}-L0_{TOP_K}")
    torch.save({"W_enc": _t(w.encoder), "W_dec": _t(w.decoder.T), "b_enc": _t(w.b_enc), "b_dec": _t(w.b_dec)},
               folder / f"layer{layer}.sae.pt")
    return SuiteSae("Qwen-Scope", str(folder / f"layer{layer}.sae.pt"), layer, "topk", _pre(w.encoder, w.b_enc, w.b_dec),
                    False, np.zeros(d_sae), w.decoder)


def goodfire(root: Path, streams, layer: int, d_sae: int) -> SuiteSae:
    """Goodfire's ``SparseAutoEncoder.encode`` (its model card): ``relu(self.encoder_linear(x))``,
    no decoder bias subtracted (SAELens ``get_goodfire_config_from_hf``: ``apply_b_dec_to_input: False``)."""
    w = weights(streams, d_sae, 61, gate=0.0, subtract=False)
    path = _folder(root / f"Llama-3.1-8B-Instruct-SAE-l{layer}") / f"Llama-3.1-8B-Instruct-SAE-l{layer}.pth"
    torch.save({"encoder_linear.weight": _t(w.encoder), "encoder_linear.bias": _t(w.b_enc),
                "decoder_linear.weight": _t(w.decoder.T), "decoder_linear.bias": _t(w.b_dec)}, path)
    return SuiteSae("Goodfire", str(path), layer, "threshold", _pre(w.encoder, w.b_enc, w.b_dec), False,
                    np.zeros(d_sae), w.decoder)


SUITES = {
    "dictionary_learning AutoEncoder": dictionary_learning_autoencoder,
    "dictionary_learning BatchTopKSAE": dictionary_learning_batchtopk,
    "dictionary_learning AutoEncoderTopK": dictionary_learning_topk,
    "dictionary_learning JumpReluAutoEncoder": dictionary_learning_jumprelu,
    "SAELens standard": saelens_standard,
    "SAELens jumprelu": saelens_jumprelu,
    "SAELens expected_average_only_in": saelens_scaled,
    "Gemma Scope": gemma_scope,
    "Gemma Scope 2": gemma_scope_2,
    "Llama Scope": llama_scope,
    "Qwen-Scope": qwen_scope,
    "Goodfire": goodfire,
}
