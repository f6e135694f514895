"""SAE decoders as on-demand feature sources: the spec's ``features`` form names
``[layer, feature_id, strength]``, and the vector of a feature is its decoder direction.

Only the requested feature's row/column is copied out, each time into a fresh float32 array:
the decoder stays memory-mapped (``torch.load(mmap=True)`` for ``.pt``/``.pth``, ``safe_open``
slices for ``.safetensors``, ``np.memmap`` into a stored ``.npz`` member; sae_arrays.py), so
the process holds no copy of it. (The OS pages in what is touched, and around it, as page
cache: a column of a ``[d_model, d_sae]`` decoder touches one page per row.) Vectors are
returned raw; the spec's resolution unit-normalizes features, as the notebook did. A source
also tells its ``d_model`` (the decoder's hidden size), ``num_features`` and its ``layout``:
the keys of its encoder weights, bias and threshold where the suite has them. ``encoder(f)``
(for ``feature_clamp``) reads feature ``f``'s encoder the same way, one row or column (a
feature's encoder is a row where its decoder is a column and vice versa, in every suite
below), with the biases and threshold read whole once; a suite whose activation cannot be
computed per token from what it stores (TopK without a threshold) is refused. For finding
features (vllm_steer/discovery), ``encoding`` says how the SAE encodes (its activation: ReLU,
JumpReLU/BatchTopK threshold, or TopK with its ``k``) and ``encoder_chunks()`` reads the whole
encoder a bounded chunk of features at a time. A TopK SAE's ``k`` comes from ``#k=N``, a ``k``
in the file (dictionary_learning), SAELens' ``cfg.json`` or a Qwen-Scope repo name (``-L0_{k}``,
the model cards' Top-K).

Each suite encodes exactly as its own reference does (the "Encoder" of each suite below, read
from the named code): ``pre = W_enc (S h - b_dec) + b_enc`` where ``b_dec`` is subtracted only
by suites whose reference subtracts it, ``S`` is 1 but for a dataset-wise input normalization
(Llama Scope; SAELens with ``#norm_scaling_factor``), then the activation, ``pre`` where ``pre >
threshold`` (every reference gates ``relu(pre)``, so a negative threshold acts as 0). Where
``S`` is not 1 a feature's decoder direction is the stored one divided by ``S`` (SAELens folds
it so: ``W_dec / S``), so that it is in the stream's units. ``#subtract_b_dec=0|1`` overrides
the suite's choice (an escape hatch for files whose origin says otherwise); per-token
normalizations (SAELens ``constant_norm_rescale``, ``layer_norm``; Llama Scope ``token-wise``)
cannot be reproduced by a steering row and are refused by name for ``feature_clamp``,
conditions and finding features (the decoder directions still steer).

Which layout a source is follows from its file name or, for a local folder, the files in it;
there is no guessing from tensor shapes. The layer comes from the path or config as each suite
names it, and ``#layer=L`` always wins. Our layer ``L`` is the output of decoder layer ``L``
(HF ``model.layers[L]``): a hook ``blocks.L.hook_resid_post`` (TransformerLens) or
``model.layers.L[.output]`` (HF) is layer ``L``; ``blocks.L.hook_resid_pre`` is layer ``L - 1``
(the input of block ``L`` is the output of block ``L - 1``; see ``hook_layer``). Hooks that are
not a layer's residual output (attention/MLP outputs, transcoders, ``hook_resid_mid``,
embeddings) are refused unless ``#layer=`` says where to use them.

SAE source strings (paths and ``hf://`` addresses as in sources.py, option ``#layer=L``). Facts
below were read from the named public sources; "row" means the decoder is ``[d_sae, d_model]``
and feature ``f`` is ``decoder[f]``, "column" means ``[d_model, d_sae]`` (an
``nn.Linear(d_sae, d_model).weight``) and feature ``f`` is ``decoder[:, f]``.

- dictionary_learning ``ae.pt`` -- e.g. ``hf://andyrdt/saes-llama-3.1-8b-instruct/
  resid_post_layer_11/trainer_1/ae.pt``: a state dict whose ``decoder.weight`` is
  ``[d_model, d_sae]``, column (``nn.Linear(dict_size, activation_dim)`` of ``AutoEncoder`` and
  ``BatchTopKSAE`` in saprmarks/dictionary_learning ``dictionary_learning/dictionary.py`` and
  ``trainers/batch_top_k.py``; the Eiffel Tower code reads ``sae["decoder.weight"][:, feature]``).
  A ``W_dec`` ``[d_sae, d_model]`` key (``JumpReluAutoEncoder``) is read by rows. The layer
  comes from ``resid_post_layer_{L}`` in the path (that repo's ``model.model.layers[L]``
  output, our layer ``L``). A folder holding ``ae.pt`` works too. Encoder (``dictionary.py``
  and ``trainers/``): ``AutoEncoder.encode`` is ``relu(encoder(x - bias))`` (its decoder bias
  is the key ``bias``); ``BatchTopKSAE`` ``relu(encoder(x - b_dec))`` kept above its scalar
  inference ``threshold`` (-1: never learned, then its ``k``); ``AutoEncoderTopK`` the same
  pre-activation, TopK with its ``k`` (named by ``trainer.dict_class`` in the ``config.json``
  beside ``ae.pt``; it stores a threshold it does not use by default);
  ``JumpReluAutoEncoder`` ``x @ W_enc + b_enc`` (``apply_b_dec_to_input`` defaults to false)
  gated at its per-feature ``threshold``. Checkpoints are saved with any norm factor folded in
  (``scale_biases``), so they read ``h`` itself.
- SAELens -- a folder holding ``sae_weights.safetensors`` (``W_dec`` ``[d_sae, d_in]``, row)
  and ``cfg.json``, or the ``.safetensors`` file itself (``cfg.json`` next to it). The layer
  comes from the hook name (top-level ``hook_name`` or, from SAELens 6, ``meta.hook_name``);
  with no hook name, ``hook_layer``. A hub folder is read as SAELens (nothing is listed to
  look for other layouts): name the weights file for every other suite. Encoder
  (``sae_lens/saes/sae.py``): ``process_sae_in`` subtracts ``b_dec`` when
  ``apply_b_dec_to_input`` (default true); ``standard`` is a ReLU, ``jumprelu`` gates
  ``relu(pre)`` at ``pre > threshold``, ``topk`` keeps each token's ``k`` largest;
  ``normalize_activations`` as ``_saelens_hints`` says.
- Gemma Scope (Gemma 2) -- ``params.npz``, e.g. ``hf://google/gemma-scope-2b-pt-res/
  layer_20/width_16k/average_l0_71/params.npz`` (or a folder holding it). Keys ``W_enc``
  ``[d_model, d_sae]``, ``W_dec`` ``[d_sae, d_model]`` (row), ``b_enc``, ``b_dec``,
  ``threshold``, float32 (the Gemma Scope tutorial's ``JumpReLUSAE`` and SAELens
  ``sae_lens/loading/pretrained_sae_loaders.py`` ``gemma_2_sae_huggingface_loader``, which
  also accepts lower-case ``w_`` keys: matched case-insensitively here). Encoder: the
  tutorial's ``JumpReLUSAE.encode``, ``pre_acts = input_acts @ W_enc + b_enc`` then
  ``(pre_acts > threshold) * relu(pre_acts)``: no ``b_dec`` is subtracted (SAELens
  ``get_gemma_2_config_from_hf``: ``apply_b_dec_to_input: False``). Folder layout
  ``layer_{L}/width_{W}/average_l0_{N}/params.npz`` (google/gemma-scope-2b-pt-res on the
  hub); the ``-res`` repos are ``blocks.L.hook_resid_post`` (SAELens ``get_gemma_2_config_from_hf``),
  so the layer is the ``layer_{L}`` folder. A path naming a ``gemma-scope-*-mlp``/``-att``/
  ``-transcoders`` repo, or an ``embedding`` folder, is refused. The archive's members are
  read in place when stored uncompressed; the hub's file sizes suggest both kinds exist
  (``layer_9/width_65k/average_l0_61`` is 1.21 GB, float32's exact size, while
  ``layer_22/width_65k/average_l0_62`` is 454 MB), and a compressed ``W_dec`` is streamed up
  to the requested row on every read (a warning says so at load; see sae_arrays.py).
- Gemma Scope 2 (Gemma 3) -- ``params.safetensors`` with ``config.json`` next to it, e.g.
  ``hf://google/gemma-scope-2-1b-pt/resid_post/layer_13_width_16k_l0_medium/params.safetensors``
  (or a folder holding it). Lower-case keys ``w_enc`` ``[d_model, d_sae]``, ``w_dec``
  ``[d_sae, d_model]`` (row), ``b_enc``, ``b_dec``, ``threshold`` (SAELens
  ``gemma_3_sae_huggingface_loader`` and its tests in ``tests/loading/
  test_pretrained_sae_loaders.py``: ``d_in, d_sae = shape of w_enc``). Encoder: as Gemma
  Scope's, ``h @ w_enc + b_enc`` gated at ``threshold``, no ``b_dec`` (SAELens
  ``get_gemma_3_config_from_hf``: ``apply_b_dec_to_input: False``). Folders are
  ``{site}/layer_{L}_width_{W}_l0_{S}`` with site ``resid_post``, ``resid_post_all``,
  ``attn_out``, ``mlp_out``, ``transcoder``, ...; ``config.json`` holds ``hf_hook_point_in``
  (``model.layers.L.output`` for ``resid_post``) and ``hf_hook_point_out``. The layer comes
  from ``hf_hook_point_in`` (refused when ``hf_hook_point_out`` differs: a transcoder) or,
  with no ``config.json``, from a ``resid_post``/``resid_post_all`` folder's ``layer_{L}``.
- Llama Scope -- a folder holding ``hyperparams.json`` and ``checkpoints/final.safetensors``,
  or that file, e.g. ``hf://fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L15R-8x/
  checkpoints/final.safetensors``. Keys ``encoder.weight`` ``[d_sae, d_model]``,
  ``encoder.bias``, ``decoder.weight`` ``[d_model, d_sae]`` (column), ``decoder.bias``; the
  JumpReLU threshold is one number, ``jump_relu_threshold`` in ``hyperparams.json``, whose
  ``dtype`` says ``torch.bfloat16`` (SAELens ``llama_scope_sae_huggingface_loader``, which
  transposes ``decoder.weight`` into ``W_dec`` and casts to bfloat16; the tensors' stored dtype
  was not seen, and any float dtype is read). The layer comes from ``hook_point_in``
  (``blocks.L.hook_resid_post`` for the ``LXR`` repos; ``LXA``/``LXM``/``LXTC`` are attention,
  MLP and transcoder SAEs, refused). Encoder (SAELens ``get_llama_scope_config_from_hf``;
  OpenMOSS Language-Model-SAEs ``src/lm_saes/sae.py`` ``encode`` and ``compute_norm_factor``):
  the stream times ``S = sqrt(d_model) / dataset_average_activation_norm["in"]``
  (``norm_activation: "dataset-wise"``), ``@ encoder.weight.T + encoder.bias``, no ``b_dec``
  (``apply_decoder_bias_to_pre_encoder: false``), gated at ``jump_relu_threshold * S``
  (SAELens PR 483); features are read in SAELens' units. lm_saes also divides its released
  decoders to unit norm with ``sparsity_include_decoder_norm``, which SAELens' loader does not:
  activations follow SAELens, whose gate is the one its authors fixed.
- Qwen-Scope -- ``layer{L}.sae.pt``, e.g. ``hf://Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50/
  layer20.sae.pt``: a torch dict ``W_enc`` ``[d_sae, d_model]``, ``W_dec`` ``[d_model, d_sae]``
  (column, unlike SAELens' ``W_dec``), ``b_enc``, ``b_dec`` (the model card of
  Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100: "Each checkpoint file layer{n}.sae.pt is a Python
  dict with four tensors", hook point "Residual stream", layers 0-23 of 24; a public test
  suite's copy of Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50's ``config.json`` reads
  ``"hook_point": "resid_post"``, ``"dtype": "float32"``). The layer is ``L`` of the file name
  (the residual stream after decoder layer ``L``). ``b_dec``'s length confirms which decoder
  axis is ``d_model``. Encoder (SAELens ``get_qwen_scope_config_from_hf``; the model cards give
  no code): TopK of ``h @ W_enc.T + b_enc``, no ``b_dec`` (``apply_b_dec_to_input: False``).
- Goodfire -- ``Goodfire/Llama-3.1-8B-Instruct-SAE-l19`` (``Llama-3.1-8B-Instruct-SAE-l19.pth``)
  and ``Goodfire/Llama-3.3-70B-Instruct-SAE-l50`` (``Llama-3.3-70B-Instruct-SAE-l50.pt``, once
  named ``Llama-3.3-70B-Instruct__model.layers.50.pt``): a ``.pt``/``.pth`` state dict with
  ``encoder_linear.weight`` ``[d_sae, d_model]``, ``encoder_linear.bias``,
  ``decoder_linear.weight`` ``[d_model, d_sae]`` (column), ``decoder_linear.bias``, float32
  (SAELens ``get_goodfire_huggingface_loader``, which transposes it into ``W_dec``, with
  ``blocks.19``/``blocks.50.hook_resid_post``; the hub lists FloatStorage pickles). Found by
  the ``decoder_linear.weight`` key in any ``.pt``/``.pth``; the layer is ``l{L}`` of
  ``-SAE-l{L}`` (or ``model.layers.{L}``) in the path. Encoder: the model card's
  ``SparseAutoEncoder.encode``, ``relu(encoder_linear(x))``, no decoder bias subtracted
  (SAELens ``get_goodfire_config_from_hf``: ``apply_b_dec_to_input: False``).

An SAE whose ``d_model`` differs from the model's hidden size is refused when a feature of it
is resolved (resolve.py: the vector's size against the hidden size).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huggingface_hub import errors as hub_errors

from vllm_steer.core.registry import FeatureSource
from vllm_steer.vectors.sae_arrays import NpzArrays, SafetensorsArrays, TorchArrays
from vllm_steer.vectors.sources import Source, int_option, parse_source

logger = logging.getLogger(__name__)

OPTIONS = ("layer", "k", "subtract_b_dec", "norm_scaling_factor")
AE_LAYER = re.compile(r"resid_post_layer_(\d+)")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
AE_FILE = "ae.pt"
GEMMA_SCOPE_FILE = "params.npz"
GEMMA_SCOPE_2_FILE = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
LLAMA_SCOPE_FILE = "checkpoints/final.safetensors"
LLAMA_SCOPE_CONFIG = "hyperparams.json"
QWEN_SCOPE_FILE = re.compile(r"layer(\d+)\.sae\.pt")
QWEN_SCOPE_TOP_K = re.compile(r"SAE-Res-[^/]*-L0_(\d+)(?:/|$)")  # Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50: Top-K 50
GOODFIRE_LAYER = re.compile(r"-SAE-l(\d+)|model\.layers\.(\d+)")
GEMMA_SCOPE_SITE = re.compile(r"gemma-scope-\d+b-(?:pt|it)-(res|mlp|att|transcoders)\b")
GEMMA_SCOPE_LAYER = re.compile(r"(?:^|/)layer_(\d+)/")
GEMMA_SCOPE_2_FOLDER = re.compile(r"(?:^|/)(\w+)/layer_(\d+)_width_")
RESIDUAL_HOOKS = "blocks.L.hook_resid_post, blocks.L.hook_resid_pre or model.layers.L"
ENCODER_CHUNK_BYTES = 64 << 20  # float32 encoder weights read at once by encoder_chunks


@dataclass(frozen=True)
class Layout:
    """Where one suite keeps its weights, and how its reference encodes. ``columns``: a feature
    is a column of the decoder (``[d_model, d_sae]``), else a row (``[d_sae, d_model]``); its
    encoder is the other way round. ``decoder_bias``: the names it may have (the first found
    is used). ``relu``: without a threshold the activation is a plain ReLU; otherwise (the
    suite may be TopK, or keep its threshold elsewhere) the encoder is refused.
    ``subtract_b_dec``: the reference encoder reads ``h - b_dec`` (a config may say otherwise:
    EncoderHints)."""

    suite: str
    decoder: str
    columns: bool
    encoder: str | None = None
    encoder_bias: str | None = None
    decoder_bias: tuple[str, ...] = ()
    threshold: str | None = None
    relu: bool = False
    subtract_b_dec: bool = False


@dataclass(frozen=True)
class EncoderHints:
    """What a suite's config (not its weights) says about the encoder: ``relu``, without a
    threshold the activation is a plain ReLU; ``k``, a TopK SAE's k; ``topk``, the encoder is
    TopK even where the file stores a threshold (dictionary_learning's AutoEncoderTopK);
    ``threshold``, one threshold for every feature kept in the config (Llama Scope);
    ``subtract_b_dec``, whether the encoder reads ``h - b_dec`` (None: the layout's);
    ``scale``, a constant the encoder multiplies the stream by first (a dataset-wise input
    normalization; the decoder then writes back divided by it); ``unsupported``, why the
    reference encoder cannot be reproduced per token (the decoder stays readable)."""

    relu: bool = False
    k: int | None = None
    topk: bool = False
    threshold: float | None = None
    subtract_b_dec: bool | None = None
    scale: float = 1.0
    unsupported: str | None = None


@dataclass(frozen=True)
class Encoding:
    """How the SAE encodes a stream ``h``: ``pre = W_enc (scale h - b_dec) + b_enc``, then
    ``kind``: "jumprelu" (``pre if pre > threshold else 0``; ReLU is threshold 0, "relu") or
    "topk" (the ``k`` largest ``pre`` of each token, those above 0). ``b_dec`` is zeros for an
    SAE that does not subtract it, ``scale`` 1 for one that does not rescale its input."""

    kind: str
    b_enc: np.ndarray  # [d_sae] float32
    b_dec: np.ndarray  # [d_model] float64
    threshold: np.ndarray  # [d_sae] float32, >= 0 (zeros but for JumpReLU)
    k: int | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class FeatureEncoder:
    """One feature's encoder: its activation on a stream ``h`` is ``act(<row, h> + offset)``
    with ``act(s) = s if s > threshold else 0`` (JumpReLU; ReLU is threshold 0): ``row`` is
    ``scale * W_enc[f]`` and ``offset = b_enc[f] - <W_enc[f], b_dec>`` (Encoding)."""

    row: np.ndarray
    offset: float
    threshold: float


# Each suite's reference encoder is in the module docstring.
DICTIONARY_LEARNING = Layout("dictionary_learning", "decoder.weight", True, "encoder.weight", "encoder.bias",
                             ("b_dec", "bias"), "threshold", relu=True, subtract_b_dec=True)
JUMPRELU = Layout("JumpReLU", "W_dec", False, "W_enc", "b_enc", ("b_dec",), "threshold")  # JumpReluAutoEncoder
SAELENS = dataclasses.replace(JUMPRELU, suite="SAELens", subtract_b_dec=True)  # SAEConfig's default; cfg.json decides
GEMMA_SCOPE = dataclasses.replace(JUMPRELU, suite="Gemma Scope")
GEMMA_SCOPE_2 = Layout("Gemma Scope 2", "w_dec", False, "w_enc", "b_enc", ("b_dec",), "threshold")
LLAMA_SCOPE = Layout("Llama Scope", "decoder.weight", True, "encoder.weight", "encoder.bias", ("decoder.bias",))
QWEN_SCOPE = Layout("Qwen-Scope", "W_dec", True, "W_enc", "b_enc", ("b_dec",))
GOODFIRE = Layout(
    "Goodfire", "decoder_linear.weight", True, "encoder_linear.weight", "encoder_linear.bias", ("decoder_linear.bias",),
    relu=True,
)
# A .pt/.pth or SAELens-style .safetensors is read by whichever decoder key it holds.
TORCH_LAYOUTS = (DICTIONARY_LEARNING, JUMPRELU, GOODFIRE)
SAFETENSORS_LAYOUTS = (SAELENS, DICTIONARY_LEARNING)


class DecoderSource:
    """A feature source over the decoder of one SAE file, read a row/column at a time."""

    def __init__(self, arrays, layout: Layout, layer: int, description: str, hints=None, k: int | None = None,
                 subtract_b_dec: bool | None = None):
        where = f"{arrays.path}[{layout.decoder!r}]"
        key = _find_key(arrays, layout.decoder)
        if key is None:
            found = _shown(arrays.keys())
            raise ValueError(f"{arrays.path}: no {layout.decoder!r} ({layout.suite} decoder); found {found}")
        shape = arrays.shape(key)
        if len(shape) != 2:
            raise ValueError(f"{where}: the decoder has shape {list(shape)}; expected 2-D")
        if not arrays.floating(key):
            raise ValueError(f"{where}: the decoder is not a floating-point array")
        self.arrays = arrays
        self.key = key
        self.layout = layout
        self.layer = layer
        self.columns = layout.columns
        self.num_features = int(shape[1] if layout.columns else shape[0])
        self.d_model = int(shape[0] if layout.columns else shape[1])
        self.description = description
        # What the suite's config says about the encoder, read now: a feature read never fetches.
        read_hints = hints or (lambda d_model: EncoderHints(relu=layout.relu))
        self.hints = read_hints(self.d_model)
        if subtract_b_dec is not None:  # #subtract_b_dec=0|1
            self.hints = dataclasses.replace(self.hints, subtract_b_dec=subtract_b_dec)
        self._k = k  # #k=N
        self._decoder_bias = next(filter(None, (_find_key(arrays, name) for name in layout.decoder_bias)), None)
        bias = self._decoder_bias
        if bias and arrays.shape(bias) != (self.d_model,):
            expected = "[d_model, d_sae]" if layout.columns else "[d_sae, d_model]"
            raise ValueError(
                f"{where}: the decoder is {list(shape)} but {bias!r} is {list(arrays.shape(bias))}: "
                f"expected a {layout.suite} decoder as {expected}"
            )

    def feature(self, feature_id: int) -> np.ndarray:
        """The feature's decoder direction in the stream's units: the stored row or column,
        divided by the input scale where the SAE rescales its input (SAELens folds it so)."""
        self._check_id(feature_id)
        read = self.arrays.column if self.columns else self.arrays.row
        vector = read(self.key, feature_id)
        scale = self.hints.scale
        return vector if scale == 1.0 else (vector.astype(np.float64) / scale).astype(np.float32)

    def encoder(self, feature_id: int) -> FeatureEncoder:
        """The encoder of one feature: its row of the encoder weights, read on demand (the
        encoder is never loaded whole), its offset and threshold. ValueError when this SAE's
        encoder is missing or its activation cannot be computed per token (TopK)."""
        self._check_id(feature_id)
        encoding = self.encoding
        if encoding.kind == "topk":
            raise ValueError(
                f"{self.description} ({self.layout.suite}): no threshold array, so its activation (TopK, k={encoding.k}) "
                "cannot be computed per token; feature_clamp needs an SAE with a threshold (JumpReLU, BatchTopK) or a "
                "ReLU one"
            )
        row = (self.arrays.row if self.columns else self.arrays.column)(self._encoder_weight, feature_id).astype(np.float64)
        offset = float(encoding.b_enc[feature_id]) - float(np.dot(row, encoding.b_dec))
        return FeatureEncoder((encoding.scale * row).astype(np.float32), offset, float(encoding.threshold[feature_id]))

    def encoder_chunks(self, features_per_chunk: int | None = None):
        """The whole encoder, a chunk of features at a time: ``(start, weights)`` with
        ``weights[i]`` (``[n, d_model]`` float32) the encoder row of feature ``start + i``.
        Only one chunk (``ENCODER_CHUNK_BYTES`` by default) is in memory at once."""
        weight = self._encoder_weight
        size = features_per_chunk or max(1, ENCODER_CHUNK_BYTES // (4 * self.d_model))
        for start in range(0, self.num_features, size):
            stop = min(start + size, self.num_features)
            yield start, self.arrays.rows(weight, start, stop) if self.columns else self.arrays.columns(weight, start, stop).T

    def _check_id(self, feature_id: int) -> None:
        if not 0 <= feature_id < self.num_features:
            raise KeyError(
                f"feature {feature_id} is out of range: {self.description} has features 0-{self.num_features - 1}"
            )

    @functools.cached_property
    def _encoder_weight(self) -> str:
        """The encoder weights' key, checked against the decoder's shape."""
        layout = self.layout
        where = f"{self.description} ({layout.suite})"
        weight = layout.encoder and _find_key(self.arrays, layout.encoder)
        if not weight:
            raise ValueError(f"{where} has no encoder ({layout.encoder or 'none in this suite'}); found {_shown(self.arrays.keys())}")
        expected = (self.num_features, self.d_model) if self.columns else (self.d_model, self.num_features)
        if tuple(self.arrays.shape(weight)) != expected:
            raise ValueError(
                f"{where}: the encoder {weight!r} is {list(self.arrays.shape(weight))}, the decoder {self.key!r} "
                f"{list(self.arrays.shape(self.key))}: expected the encoder as {list(expected)}"
            )
        return weight

    @functools.cached_property
    def encoding(self) -> Encoding:
        """How this SAE encodes (biases and threshold read whole, once). A threshold (the
        file's array, else the config's number) wins unless the config says TopK
        (JumpReLU, BatchTopK's inference threshold); else a known k makes it TopK; else the
        suite's ReLU; else ValueError."""
        where = f"{self.description} ({self.layout.suite})"
        hints = self.hints
        if hints.unsupported:
            raise ValueError(f"{where}: {hints.unsupported}")
        self._encoder_weight  # noqa: B018 - refuses an SAE without a usable encoder first

        def vector(found: str | None, size: int) -> np.ndarray | None:
            if not found:
                return None
            values = self.arrays.vector(found)
            if values.size not in (1, size):
                raise ValueError(f"{where}: {found!r} has {values.size} values; expected {size}")
            return np.broadcast_to(values, (size,)).astype(np.float32)

        threshold = None if hints.topk else vector(self.layout.threshold and _find_key(self.arrays, self.layout.threshold),
                                                   self.num_features)
        if threshold is not None and self.layout is DICTIONARY_LEARNING and threshold[0] < 0:
            threshold = None  # dictionary_learning's -1: no threshold was learned
        if threshold is None and hints.threshold is not None:
            threshold = np.full(self.num_features, hints.threshold, np.float32)
        k = self._k or _stored_k(self.arrays) or hints.k
        if threshold is not None:
            # Every reference gates relu(pre) (or pre > threshold >= 0): a threshold below 0 acts as 0.
            kind, threshold = "jumprelu", np.maximum(threshold, 0)
        elif k is not None:
            kind, threshold = "topk", np.zeros(self.num_features, np.float32)
        elif hints.relu:
            kind, threshold = "relu", np.zeros(self.num_features, np.float32)
        else:
            raise ValueError(
                f"{where}: no threshold array and no k, so its activation (JumpReLU, TopK, ...) cannot be computed; "
                "feature_clamp needs an SAE with a threshold (JumpReLU, BatchTopK) or a ReLU one, and a TopK SAE "
                "needs its k (add #k=N to the source)"
            )
        b_enc = vector(self.layout.encoder_bias and _find_key(self.arrays, self.layout.encoder_bias), self.num_features)
        subtract = self.layout.subtract_b_dec if hints.subtract_b_dec is None else hints.subtract_b_dec
        b_dec = vector(self._decoder_bias, self.d_model) if subtract else None
        return Encoding(
            kind,
            np.zeros(self.num_features, np.float32) if b_enc is None else b_enc,
            np.zeros(self.d_model) if b_dec is None else b_dec.astype(np.float64),
            threshold,
            k if kind == "topk" else None,
            hints.scale,
        )


def _stored_k(arrays) -> int | None:
    """A ``k`` the weights file stores (dictionary_learning's TopK and BatchTopK buffers)."""
    key = "k" in arrays.keys() and "k"
    return int(arrays.vector(key)[0]) if key else None


def load_sae(text: str) -> FeatureSource:
    """The feature source an SAE source string names (downloading hub files first). Its
    configs are read here, once each, so reading features later never fetches anything."""
    source = parse_source(text, OPTIONS)
    layer, k = int_option(source, "layer"), int_option(source, "k")
    subtract_b_dec = int_option(source, "subtract_b_dec")
    if subtract_b_dec not in (None, 0, 1):
        raise ValueError(f"{source.text}: subtract_b_dec must be 0 or 1, got {subtract_b_dec}")
    hub_folder = False
    if source.hub is None:
        path = source.local_path()
        if not path.exists():
            raise FileNotFoundError(f"SAE source not found: {path}")
        if path.is_dir():  # read as the file it holds, so the layer rules see that file's path
            source = dataclasses.replace(source, location=str(_folder_weights(path, source.text)))
    elif _suite(source) is None:
        # A hub folder: SAELens layout, as its sae_weights.safetensors (no listing is fetched to
        # look for anything else; SAELens folders are named like blocks.11.hook_resid_post).
        source = dataclasses.replace(source, hub=source.hub.child(SAELENS_WEIGHTS))
        hub_folder = True
    suite = _suite(source)
    if suite is None:
        raise _not_an_sae(source.text)
    if "norm_scaling_factor" in source.options and suite != "saelens":
        raise ValueError(f"{source.text}: norm_scaling_factor applies to SAELens SAEs (cfg.json normalize_activations "
                         "'expected_average_only_in') only")
    if suite == "torch":
        arrays = TorchArrays(source.local_path())
        layout = _pick_layout(arrays, TORCH_LAYOUTS)
        rule, read_hints = {GOODFIRE: (_goodfire_layer, None), JUMPRELU: (_ae_layer, None)}.get(
            layout, (_ae_layer, _dictionary_learning_hints))
        config_name = "config.json"
    elif suite == "saelens":
        arrays = SafetensorsArrays(_fetch(source, hub_folder))
        layout = _pick_layout(arrays, SAFETENSORS_LAYOUTS)
        config_name, rule, read_hints = SAELENS_CONFIG, _saelens_layer, _saelens_hints
    else:
        layout, reader, config_name, rule, read_hints = SUITES[suite]
        arrays = None
    config = _Config(source, config_name, optional=read_hints is _dictionary_learning_hints)
    found = layer if layer is not None else rule(source, config)  # before the weights: configs are small, and may refuse
    if arrays is None:
        arrays = reader(source.local_path())
    decoder = DecoderSource(arrays, layout, found, source.text, k=k,
                            hints=read_hints and functools.partial(read_hints, source, config),
                            subtract_b_dec=None if subtract_b_dec is None else bool(subtract_b_dec))
    if isinstance(decoder.arrays, NpzArrays) and decoder.arrays.compressed(decoder.key):
        logger.warning(
            "%s: %s is compressed in the archive, so each feature read decompresses it up to that feature "
            "(up to all %d rows); re-save it with np.savez to read features in place",
            source.text, decoder.key, decoder.num_features,
        )
    return decoder


class _Config:
    """A JSON config next to the weights (``name`` may start with ``../``), fetched and parsed
    at most once: ``content`` is None when there is none. An ``optional`` one (it refines the
    encoder, nothing else needs it) missing from an offline hub cache counts as none."""

    def __init__(self, source: Source, name: str | None, optional: bool = False):
        self.source, self.name, self.optional = source, name, optional

    @functools.cached_property
    def content(self) -> dict | None:
        if self.name is None:
            return None
        try:
            path = _beside(self.source, self.name)
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError: offline, not cached
            if not self.optional:
                raise
            logger.warning("%s: %s is not in the offline hub cache; reading the encoder from the weights alone (%s)",
                           self.source.text, self.name, exc)
            return None
        return json.loads(path.read_text()) if path else None


def _suite(source: Source) -> str | None:
    """Which layout a file is, by its name (None: not an SAE file name)."""
    name = source.name
    if QWEN_SCOPE_FILE.fullmatch(name):
        return "qwen_scope"
    if source.suffix in (".pt", ".pth"):
        return "torch"  # dictionary_learning, Goodfire or a W_dec state dict: by the keys in it
    if source.suffix == ".npz":
        return "gemma_scope"
    if name == GEMMA_SCOPE_2_FILE:
        return "gemma_scope_2"
    if ("/" + _location(source)).endswith("/" + LLAMA_SCOPE_FILE):
        return "llama_scope"
    if source.suffix == ".safetensors":
        return "saelens"
    return None


def _not_an_sae(text: str) -> ValueError:
    return ValueError(
        f"{text}: not an SAE decoder; supported: a dictionary_learning .pt (e.g. ae.pt), a SAELens "
        f"{SAELENS_WEIGHTS} (with {SAELENS_CONFIG} next to it), Gemma Scope {GEMMA_SCOPE_FILE}, Gemma Scope 2 "
        f"{GEMMA_SCOPE_2_FILE} (with {GEMMA_SCOPE_2_CONFIG}), Llama Scope {LLAMA_SCOPE_FILE} (with "
        f"{LLAMA_SCOPE_CONFIG} in the folder above), Qwen-Scope layer<L>.sae.pt, a Goodfire .pth/.pt, or a "
        "folder holding one of them"
    )


def _folder_weights(folder: Path, text: str) -> Path:
    """The weights file a local folder holds, by the files in it; refused when it holds the
    files of more than one layout."""
    candidates = [SAELENS_WEIGHTS, AE_FILE, GEMMA_SCOPE_FILE, GEMMA_SCOPE_2_FILE]
    found = [folder / name for name in candidates if (folder / name).is_file()]
    if (folder / LLAMA_SCOPE_FILE).is_file() and (folder / LLAMA_SCOPE_CONFIG).is_file():
        found.append(folder / LLAMA_SCOPE_FILE)
    if len(found) > 1:
        names = ", ".join(str(path.relative_to(folder)) for path in found)
        raise ValueError(f"{text}: the folder holds the weights of more than one SAE layout ({names}): name the file")
    if not found:
        raise _not_an_sae(text)
    return found[0]


def _fetch(source: Source, hub_folder: bool) -> Path:
    """The weights file; for a hub folder, a missing one says which files to name instead."""
    try:
        return source.local_path()
    except hub_errors.EntryNotFoundError as exc:
        if not hub_folder or isinstance(exc, hub_errors.LocalEntryNotFoundError):
            raise
        raise ValueError(
            f"{source.text}: no {SAELENS_WEIGHTS} in that folder; a hub folder is read as SAELens, so name the "
            f"weights file of other suites ({GEMMA_SCOPE_FILE}, {GEMMA_SCOPE_2_FILE}, {LLAMA_SCOPE_FILE}, "
            "layer<L>.sae.pt, the .pth)"
        ) from None


def _find_key(arrays, key: str) -> str | None:
    """``key`` as the file spells it: exactly, else the one key equal ignoring case."""
    keys = arrays.keys()
    if key in keys:
        return key
    folded = [k for k in keys if k.lower() == key.lower()]
    return folded[0] if len(folded) == 1 else None


def _pick_layout(arrays, layouts: tuple[Layout, ...]) -> Layout:
    keys = arrays.keys()
    for layout in layouts:
        if layout.decoder in keys:
            return layout
    expected = ", ".join(
        f"{layout.decoder!r} {'[d_model, d_sae]' if layout.columns else '[d_sae, d_model]'}" for layout in layouts
    )
    raise ValueError(f"{arrays.path}: no SAE decoder: expected one of {expected}; found {_shown(keys)}")


def _shown(keys) -> str:
    return ", ".join(sorted(keys)[:10]) or "nothing"


def _location(source: Source) -> str:
    """The path the layer rules read: the hub path with its repo, or the local path."""
    if source.hub:
        return f"{source.hub.repo_id}/{source.hub.filename}"
    return Path(source.location).expanduser().as_posix()


def _beside(source: Source, name: str) -> Path | None:
    """A file next to the weights (``name`` may start with ``../``); None when there is none."""
    if source.hub:
        filename = posixpath.normpath(posixpath.join(posixpath.dirname(source.hub.filename), name))
        return dataclasses.replace(source.hub, filename=filename).download_if_present()
    path = Path(os.path.normpath(Path(source.location).expanduser().parent / name))
    return path if path.is_file() else None


# ---- layers: #layer= wins, and then nothing is read to find one ------------------------------------
def _path_layer(source: Source, pattern: re.Pattern, named: str) -> int:
    match = pattern.search(_location(source))
    if match is None:
        raise ValueError(f"{source.text}: cannot tell the layer (no {named} in the path): add #layer=N")
    return int(next(group for group in match.groups() if group is not None))


def _ae_layer(source: Source, config: _Config) -> int:
    return _path_layer(source, AE_LAYER, "resid_post_layer_N")


def _goodfire_layer(source: Source, config: _Config) -> int:
    return _path_layer(source, GOODFIRE_LAYER, "-SAE-lN or model.layers.N")


def _qwen_scope_layer(source: Source, config: _Config) -> int:
    return int(QWEN_SCOPE_FILE.fullmatch(source.name)[1])


def _gemma_scope_layer(source: Source, config: _Config) -> int:
    where = _location(source)
    site = GEMMA_SCOPE_SITE.search(where)
    kinds = {"mlp": "an MLP-output", "att": "an attention-output", "transcoders": "a transcoder"}
    kind = kinds.get(site[1]) if site else None
    if kind is None and re.search(r"(?:^|/)embedding/", where):
        kind = "an embedding"
    if kind:
        raise ValueError(f"{source.text}: {kind} SAE, not the residual stream at a layer's output; {_anyway()}")
    return _path_layer(source, GEMMA_SCOPE_LAYER, "layer_N folder")


def _gemma_scope_2_layer(source: Source, config: _Config) -> int:
    if config.content is not None:
        return _config_hook_layer(source, config, "hf_hook_point_in", "hf_hook_point_out")
    match = GEMMA_SCOPE_2_FOLDER.search(_location(source))
    if match is None:
        raise ValueError(
            f"{source.text}: no {GEMMA_SCOPE_2_CONFIG} next to it and no site/layer_N_width_ folder: add #layer=N"
        )
    if match[1] not in ("resid_post", "resid_post_all"):
        raise ValueError(f"{source.text}: a {match[1]} SAE, not the residual stream at a layer's output; {_anyway()}")
    return int(match[2])


def _llama_scope_layer(source: Source, config: _Config) -> int:
    if config.content is None:
        raise ValueError(
            f"{source.text}: no {LLAMA_SCOPE_CONFIG} in the folder above to take the layer from: add #layer=N"
        )
    return _config_hook_layer(source, config, "hook_point_in", "hook_point_out")


def _config_hook_layer(source: Source, config: _Config, hook_in: str, hook_out: str) -> int:
    """The layer of a config's input hook; one that writes elsewhere than it reads is a transcoder."""
    hook, out = config.content.get(hook_in), config.content.get(hook_out)
    if hook is None:
        raise ValueError(f"{source.text}: {posixpath.basename(config.name)} names no {hook_in}: add #layer=N")
    if out is not None and out != hook:
        raise ValueError(f"{source.text}: reads {hook!r} and writes {out!r} (a transcoder), not an SAE; {_anyway()}")
    return _hook_to_layer(hook, source)


def _saelens_layer(source: Source, config: _Config) -> int:
    if config.content is None:
        raise ValueError(f"{source.text}: no {SAELENS_CONFIG} next to the weights to take the layer from: add #layer=N")
    meta = config.content.get("meta") or config.content.get("metadata") or {}
    hook = config.content.get("hook_name") or meta.get("hook_name")
    if hook:
        return _hook_to_layer(hook, source)
    number = config.content.get("hook_layer", meta.get("hook_layer"))
    if number is None:
        raise ValueError(f"{source.text}: {SAELENS_CONFIG} names no hook_name or hook_layer: add #layer=N")
    return int(number)


def _saelens_hints(source: Source, config: _Config, d_model: int) -> EncoderHints:
    """cfg.json's encoder (SAELens ``sae_lens/saes/sae.py``): ``architecture`` "standard" is a
    ReLU unless its ``activation_fn`` is "topk" (older configs, k in ``activation_fn_kwargs``);
    "topk" has ``k``; ``apply_b_dec_to_input`` (default true) says whether it reads
    ``h - b_dec``; ``normalize_activations`` "none" reads ``h`` as it is,
    "expected_average_only_in" (or an old ``true``) ``S h`` with S the release's
    ``norm_scaling_factor``, which SAELens keeps in its ``pretrained_saes.yaml`` and folds into
    the weights at load (``fold_activation_norm_scaling_factor``): given here as
    ``#norm_scaling_factor=S``. The per-token normalizations ("constant_norm_rescale",
    "layer_norm") and "covariance_whitening" are refused by name."""
    config = config.content or {}
    meta = config.get("meta") or config.get("metadata") or {}
    architecture = config.get("architecture") or meta.get("architecture")
    topk = architecture == "topk" or (config.get("activation_fn_str") or config.get("activation_fn")) == "topk"
    k = config.get("k", (config.get("activation_fn_kwargs") or {}).get("k")) if topk else None
    normalize = config.get("normalize_activations", "none")
    factor = source.options.get("norm_scaling_factor")
    scale, unsupported = 1.0, None
    if normalize in ("expected_average_only_in", True):
        if factor is None:
            unsupported = (
                f"{SAELENS_CONFIG} normalize_activations 'expected_average_only_in': the encoder reads the stream times "
                "a factor SAELens keeps outside cfg.json (its pretrained_saes.yaml norm_scaling_factor, folded into "
                "the weights at load); give it on the source as #norm_scaling_factor=S"
            )
        else:
            scale = _positive_float(source, "norm_scaling_factor", factor)
    elif normalize not in ("none", None, False):
        unsupported = (
            f"{SAELENS_CONFIG} normalize_activations {normalize!r}: the encoder normalizes each token's stream by its own "
            "statistics first, which a steering row cannot reproduce; supported: 'none', and "
            "'expected_average_only_in' with #norm_scaling_factor=S"
        )
    elif factor is not None:
        raise ValueError(f"{source.text}: norm_scaling_factor is given but {SAELENS_CONFIG} says normalize_activations "
                         f"{normalize!r}: the weights read the stream as it is")
    return EncoderHints(
        relu=architecture == "standard" and not topk,
        k=int(k) if k else None,
        topk=topk,
        subtract_b_dec=config.get("apply_b_dec_to_input", True) is not False,
        scale=scale,
        unsupported=unsupported,
    )


def _dictionary_learning_hints(source: Source, config: _Config, d_model: int) -> EncoderHints:
    """dictionary_learning saves ``config.json`` beside ``ae.pt``; its ``trainer.dict_class``
    "AutoEncoderTopK" encodes by TopK (``encode(..., use_threshold=False)``) though it stores
    a threshold; every other class encodes as its weights say (module docstring)."""
    trainer = (config.content or {}).get("trainer") or {}
    if trainer.get("dict_class") == "AutoEncoderTopK":
        return EncoderHints(topk=True, k=int(trainer["k"]) if trainer.get("k") else None)
    return EncoderHints(relu=True)


def _llama_scope_hints(source: Source, config: _Config, d_model: int) -> EncoderHints:
    """``hyperparams.json`` as SAELens' ``get_llama_scope_config_from_hf`` reads it:
    ``norm_activation`` "dataset-wise" scales the stream by ``S = sqrt(d_model) /
    dataset_average_activation_norm["in"]`` (lm_saes ``compute_norm_factor``; SAELens folds
    it into ``W_enc``, ``W_dec`` and ``b_dec`` and multiplies ``jump_relu_threshold`` by it),
    ``act_fn`` "jumprelu" gates at that one threshold; ``b_dec`` is subtracted only where
    ``use_decoder_bias`` and ``apply_decoder_bias_to_pre_encoder`` both say so (lm_saes
    ``encode``; SAELens: never, and the released files say false)."""
    if config.content is None:
        return EncoderHints(unsupported=f"no {LLAMA_SCOPE_CONFIG} in the folder above: its input normalization and "
                                        "threshold are unknown")
    config = config.content
    normalize = config.get("norm_activation", "inference")
    scale = 1.0
    if normalize == "dataset-wise":
        average = (config.get("dataset_average_activation_norm") or {}).get("in")
        if not average:
            return EncoderHints(unsupported=f"{LLAMA_SCOPE_CONFIG}: norm_activation 'dataset-wise' without "
                                            "dataset_average_activation_norm.in")
        scale = math.sqrt(d_model) / float(average)
    elif normalize != "inference":
        return EncoderHints(unsupported=f"{LLAMA_SCOPE_CONFIG} norm_activation {normalize!r}: the encoder rescales each "
                                        "token by its own norm, which a steering row cannot reproduce")
    subtract = bool(config.get("use_decoder_bias", True) and config.get("apply_decoder_bias_to_pre_encoder", False))
    activation = config.get("act_fn", "jumprelu")
    if activation == "jumprelu" and config.get("jump_relu_threshold") is not None:
        return EncoderHints(threshold=float(config["jump_relu_threshold"]) * scale, subtract_b_dec=subtract, scale=scale)
    if activation == "topk" and config.get("top_k"):
        return EncoderHints(topk=True, k=int(config["top_k"]), subtract_b_dec=subtract, scale=scale)
    if activation == "relu":
        return EncoderHints(relu=True, subtract_b_dec=subtract, scale=scale)
    return EncoderHints(subtract_b_dec=subtract, scale=scale,
                        unsupported=f"{LLAMA_SCOPE_CONFIG}: act_fn {activation!r} without its threshold or k")


def _qwen_scope_hints(source: Source, config: _Config, d_model: int) -> EncoderHints:
    """Qwen-Scope SAEs are TopK with k the repo name's L0 (``SAE-Res-...-L0_50``: Top-K 50),
    read as SAELens' ``get_qwen_scope_config_from_hf`` does: ``h`` itself (no ``b_dec``)."""
    match = QWEN_SCOPE_TOP_K.search(_location(source))
    return EncoderHints(k=int(match[1]) if match else None)


def _positive_float(source: Source, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{source.text}: {key} must be a positive number, got {value!r}")
    return number


def _hook_to_layer(hook: str, source: Source) -> int:
    parsed = hook_layer(hook)
    if parsed is None:
        raise ValueError(
            f"{source.text}: hook {hook!r} is not the residual stream at a decoder layer's output "
            f"({RESIDUAL_HOOKS}), where steering applies; {_anyway()}"
        )
    return parsed


def _anyway() -> str:
    return "add #layer=N to use it at layer N anyway"


# The suites found by file name alone: layout, reader, config, layer rule, encoder hints (None: the layout's).
SUITES = {
    "qwen_scope": (QWEN_SCOPE, TorchArrays, None, _qwen_scope_layer, _qwen_scope_hints),
    "gemma_scope": (GEMMA_SCOPE, NpzArrays, None, _gemma_scope_layer, None),
    "gemma_scope_2": (GEMMA_SCOPE_2, SafetensorsArrays, GEMMA_SCOPE_2_CONFIG, _gemma_scope_2_layer, None),
    "llama_scope": (LLAMA_SCOPE, SafetensorsArrays, "../" + LLAMA_SCOPE_CONFIG, _llama_scope_layer, _llama_scope_hints),
}


def hook_layer(hook: str) -> int | None:
    """Our layer for a SAELens/TransformerLens or HF hook name; None when it is not a layer's
    residual output."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook)
    if match:
        layer = int(match[1]) - (match[2] == "pre")
        return layer if layer >= 0 else None  # blocks.0.hook_resid_pre is the embeddings
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)(?:\.output)?", hook)
    return int(match[1]) if match else None
