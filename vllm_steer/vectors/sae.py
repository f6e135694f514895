"""SAE decoders as on-demand feature sources: the spec's ``features`` form names
``[layer, feature_id, strength]``, and the vector of a feature is its decoder direction.

Only the requested feature's row/column is copied out, each time into a fresh float32 array:
the decoder stays memory-mapped (``torch.load(mmap=True)`` for ``.pt``, ``safe_open`` slices
for ``.safetensors``), so the process holds no copy of it. (The OS pages in what is touched,
and around it, as page cache: a column of a ``[d_model, d_sae]`` decoder touches one page per
row.) Vectors are returned raw; the spec's resolution unit-normalizes features, as the
notebook did.

SAE source strings (paths and ``hf://`` addresses as in sources.py, option ``#layer=L``):

- dictionary_learning ``ae.pt`` -- e.g. ``hf://andyrdt/saes-llama-3.1-8b-instruct/
  resid_post_layer_11/trainer_1/ae.pt``: a state dict whose ``decoder.weight`` is
  ``[d_model, d_sae]`` (``nn.Linear(dict_size, activation_dim)`` of ``AutoEncoder`` and
  ``BatchTopKSAE`` in saprmarks/dictionary_learning ``dictionary_learning/dictionary.py`` and
  ``trainers/batch_top_k.py``; the Eiffel Tower code reads ``sae["decoder.weight"][:, feature]``),
  so a feature is a column. A ``W_dec`` ``[d_sae, d_model]`` key (``JumpReluAutoEncoder``) is
  read by rows. The layer comes from ``resid_post_layer_{L}`` in the path (that repo's
  ``model.model.layers[L]`` output, our layer ``L``) or ``#layer=``. A folder holding
  ``ae.pt`` works too.
- SAELens -- a folder holding ``sae_weights.safetensors`` (``W_dec`` ``[d_sae, d_in]``, a
  feature is a row) and ``cfg.json``, or the ``.safetensors`` file itself (``cfg.json`` next
  to it). The layer comes from the hook name (top-level ``hook_name`` or, from SAELens 6,
  ``meta.hook_name``): ``blocks.L.hook_resid_post`` is layer ``L``,
  ``blocks.L.hook_resid_pre`` is layer ``L - 1`` (the input of block ``L`` is the output of
  block ``L - 1``), ``model.layers.L`` (an HF module's output) is layer ``L``; with no hook
  name, ``hook_layer``. Other hooks (attention/MLP outputs, ``hook_resid_mid``) are not a
  layer's residual output and are refused unless ``#layer=`` says where to use them.

``#layer=L`` always wins over what the path or config says.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from vllm_steer.vectors.pt_format import safe_torch_load
from vllm_steer.vectors.registry import FeatureSource
from vllm_steer.vectors.sources import Source, int_option, parse_source

logger = logging.getLogger(__name__)

OPTIONS = ("layer",)
AE_LAYER = re.compile(r"resid_post_layer_(\d+)")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
AE_FILE = "ae.pt"
# (decoder key, whether a feature is a column): dictionary_learning, SAELens/JumpReLU.
DECODER_KEYS = (("decoder.weight", True), ("W_dec", False))


class _Decoder:
    """Shared bookkeeping: which axis is the feature axis, range checks, the description."""

    def __init__(self, layer: int, shape: tuple[int, ...], columns: bool, description: str, where: str):
        if len(shape) != 2:
            raise ValueError(f"{where}: the decoder has shape {list(shape)}; expected 2-D")
        self.layer = layer
        self.columns = columns
        self.num_features = int(shape[1] if columns else shape[0])
        self.dimension = int(shape[0] if columns else shape[1])
        self.description = description

    def _check(self, feature_id: int) -> None:
        if not 0 <= feature_id < self.num_features:
            raise KeyError(
                f"feature {feature_id} is out of range: {self.description} has features 0-{self.num_features - 1}"
            )


class TorchDecoderSource(_Decoder):
    """A feature source over a ``.pt`` state dict, memory-mapped."""

    def __init__(self, path: Path, layer: int, description: str):
        try:
            state = safe_torch_load(path, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            logger.warning("%s: saved in torch's legacy format, which cannot be memory-mapped; loading it whole", path)
            state = safe_torch_load(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected an SAE state dict, got {type(state).__name__}")
        key, columns = _decoder_key(state.keys(), path)
        decoder = state[key]
        if not isinstance(decoder, torch.Tensor) or not decoder.is_floating_point():
            raise ValueError(f"{path}: {key} is not a floating-point tensor")
        super().__init__(layer, tuple(decoder.shape), columns, description, f"{path}[{key!r}]")
        self._decoder = decoder  # memory-mapped; the rest of the state dict is dropped

    def feature(self, feature_id: int) -> np.ndarray:
        self._check(feature_id)
        row = self._decoder[:, feature_id] if self.columns else self._decoder[feature_id]
        out = torch.empty(self.dimension, dtype=torch.float32)
        out.copy_(row)
        return out.numpy()


class SafetensorsDecoderSource(_Decoder):
    """A feature source over a ``.safetensors`` decoder; each feature is one slice read."""

    def __init__(self, path: Path, layer: int, description: str):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            key, columns = _decoder_key(file.keys(), path)
            shape = tuple(file.get_slice(key).get_shape())
        super().__init__(layer, shape, columns, description, f"{path}[{key!r}]")
        self.path = path
        self.key = key

    def feature(self, feature_id: int) -> np.ndarray:
        from safetensors import safe_open

        self._check(feature_id)
        with safe_open(str(self.path), framework="pt") as file:
            part = file.get_slice(self.key)
            row = part[:, feature_id : feature_id + 1] if self.columns else part[feature_id : feature_id + 1]
        return row.reshape(-1).to(torch.float32).numpy().copy()


def load_sae(text: str) -> FeatureSource:
    """The feature source an SAE source string names (downloading hub files first)."""
    source = parse_source(text, OPTIONS)
    layer = int_option(source, "layer")
    if source.hub is None and not source.local_path().exists():
        raise FileNotFoundError(f"SAE source not found: {source.local_path()}")
    if source.suffix in (".pt", ".pth"):
        return TorchDecoderSource(source.local_path(), _ae_layer(source, layer), source.text)
    if source.suffix == ".safetensors":
        weights = source.local_path()
        config = None
        if layer is None:
            config = source.hub.sibling(SAELENS_CONFIG).download_if_present() if source.hub else weights.parent / SAELENS_CONFIG
        return SafetensorsDecoderSource(weights, _saelens_layer(config, layer, source), source.text)
    # Anything else is a folder (SAELens folders are named like blocks.11.hook_resid_post).
    if source.hub:  # a hub folder: SAELens layout (no listing is fetched to look for anything else)
        weights = source.hub.child(SAELENS_WEIGHTS).download()
        config = source.hub.child(SAELENS_CONFIG).download_if_present() if layer is None else None
        return SafetensorsDecoderSource(weights, _saelens_layer(config, layer, source), source.text)
    folder = source.local_path()
    if folder.is_dir() and (folder / SAELENS_WEIGHTS).is_file():
        config = folder / SAELENS_CONFIG if layer is None else None
        return SafetensorsDecoderSource(folder / SAELENS_WEIGHTS, _saelens_layer(config, layer, source), source.text)
    if folder.is_dir() and (folder / AE_FILE).is_file():
        return TorchDecoderSource(folder / AE_FILE, _ae_layer(source, layer), source.text)
    raise ValueError(
        f"{source.text}: not an SAE decoder; supported: a dictionary_learning .pt (e.g. ae.pt), a SAELens "
        f"{SAELENS_WEIGHTS} (with {SAELENS_CONFIG} next to it) or a folder holding either"
    )


def _decoder_key(keys, path: Path) -> tuple[str, bool]:
    keys = list(keys)
    for key, columns in DECODER_KEYS:
        if key in keys:
            return key, columns
    shown = ", ".join(sorted(keys)[:10])
    raise ValueError(
        f"{path}: no SAE decoder: expected 'decoder.weight' [d_model, d_sae] or 'W_dec' [d_sae, d_model]; found {shown}"
    )


def _ae_layer(source: Source, layer: int | None) -> int:
    if layer is not None:
        return layer
    match = AE_LAYER.search(source.location)
    if match is None:
        raise ValueError(f"{source.text}: cannot tell the layer (no resid_post_layer_N in the path): add #layer=N")
    return int(match[1])


def _saelens_layer(config_path: Path | None, layer: int | None, source: Source) -> int:
    if layer is not None:
        return layer
    if config_path is None or not config_path.is_file():
        raise ValueError(f"{source.text}: no {SAELENS_CONFIG} next to the weights to take the layer from: add #layer=N")
    config = json.loads(config_path.read_text())
    meta = config.get("meta") or config.get("metadata") or {}
    hook = config.get("hook_name") or meta.get("hook_name")
    if hook:
        parsed = hook_layer(hook)
        if parsed is None:
            raise ValueError(
                f"{source.text}: hook {hook!r} is not the residual stream at a decoder layer's output "
                "(blocks.L.hook_resid_post, blocks.L.hook_resid_pre or model.layers.L), where steering "
                "applies; add #layer=N to use it at layer N anyway"
            )
        return parsed
    number = config.get("hook_layer", meta.get("hook_layer"))
    if number is None:
        raise ValueError(f"{source.text}: {SAELENS_CONFIG} names no hook_name or hook_layer: add #layer=N")
    return int(number)


def hook_layer(hook: str) -> int | None:
    """Our layer for a SAELens/TransformerLens or HF hook name; None when it is not a layer's
    residual output."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook)
    if match:
        layer = int(match[1]) - (match[2] == "pre")
        return layer if layer >= 0 else None  # blocks.0.hook_resid_pre is the embeddings
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)", hook)
    return int(match[1]) if match else None
