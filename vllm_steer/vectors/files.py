"""Vector files: the registry of formats, loading at start and export.

Formats, one module each (the module docstrings define the layouts):

- ``.pt``/``.pth`` (pt_format.py): the notebook's ``steering_vectors.pt`` -- a dict keyed by
  ``(layer, feature_id)``, by names, or by names of ``{layer: tensor}`` dicts, or one tensor;
  read with ``torch.load(weights_only=True)``, so pickled code is refused;
- ``.safetensors`` (safetensors_format.py): 1-D tensors ``NAME``, ``NAME.layer.L`` (layered)
  and ``L{layer}/F{feature_id}`` (features);
- ``.gguf`` (gguf_format.py): llama.cpp/repeng control vectors, ``direction.N`` = our layer N.

A vector file is given as a source string (sources.py): a local path or an ``hf://`` address,
with option ``#name=NAME`` for a file holding one vector (a GGUF control vector, a ``.pt`` of
one tensor). SAE decoders are given separately (``sae`` settings, sae.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_steer.vectors import gguf_format, pt_format, safetensors_format
from vllm_steer.vectors.common import Entries
from vllm_steer.core.registry import ANY_LAYER, VectorRegistry
from vllm_steer.vectors.sae import load_sae
from vllm_steer.vectors.sources import parse_source

VECTOR_OPTIONS = ("name",)


@dataclass(frozen=True)
class VectorFormat:
    name: str
    suffixes: tuple[str, ...]
    description: str
    read: Callable[..., None]  # read(path, registry, *, name=None, source=None)
    write: Callable[..., None]  # write(path, entries[, model_hint=...])


FORMATS: tuple[VectorFormat, ...] = (
    VectorFormat("pt", pt_format.SUFFIXES, pt_format.DESCRIPTION, pt_format.read, pt_format.write),
    VectorFormat(
        "safetensors",
        safetensors_format.SUFFIXES,
        safetensors_format.DESCRIPTION,
        safetensors_format.read,
        safetensors_format.write,
    ),
    VectorFormat("gguf", gguf_format.SUFFIXES, gguf_format.DESCRIPTION, gguf_format.read, gguf_format.write),
)
READERS: dict[str, Callable[..., None]] = {suffix: f.read for f in FORMATS for suffix in f.suffixes}


def format_for(suffix: str, what: str) -> VectorFormat:
    for candidate in FORMATS:
        if suffix.lower() in candidate.suffixes:
            return candidate
    supported = "; ".join(f"{', '.join(f.suffixes)} ({f.description})" for f in FORMATS)
    shown = repr(suffix) if suffix else "none"
    raise ValueError(f"{what}: unsupported vector file type {shown}; supported: {supported}")


def load_vector_file(path: str | Path, registry: VectorRegistry, *, name: str | None = None) -> None:
    """Read a vector file (a local path or ``hf://`` source, see sources.py) into ``registry``."""
    source = parse_source(path, VECTOR_OPTIONS)
    name = name or source.options.get("name") or None
    file_format = format_for(source.suffix, source.text)  # before any download
    local = source.local_path()
    if not local.is_file():
        raise FileNotFoundError(f"vector file not found: {local}")
    file_format.read(local, registry, name=name, source=source.text)


def load_registry(
    vector_files: Iterable[str] = (), sae: Iterable[str] = (), hidden_size: int | None = None, num_layers: int | None = None
) -> VectorRegistry:
    """A registry holding the configured vector files, with the configured SAE decoders as
    on-demand feature sources. Every process builds the same one from the same settings.
    Given the model's ``hidden_size`` and ``num_layers``, a vector or SAE made for another
    model is refused here, at start, rather than at its first request."""
    registry = VectorRegistry()
    for path in vector_files:
        load_vector_file(path, registry)
    by_layer: dict[int, str] = {}
    for text in sae:
        source = load_sae(text)
        if source.layer in by_layer:
            raise ValueError(f"two SAE decoders for layer {source.layer}: {by_layer[source.layer]} and {text}")
        by_layer[source.layer] = text
        registry.add_feature_source(source)
    if hidden_size is not None:
        _check_model_fit(registry, hidden_size, num_layers)
    return registry


def _check_model_fit(registry: VectorRegistry, hidden_size: int, num_layers: int | None) -> None:
    for name in registry.names():
        where = f"vector {name!r} from {registry.info(name).source}"
        for layer, array in registry.arrays_of(name).items():
            if array.size != hidden_size:
                raise ValueError(f"{where} has {array.size} values; this model's hidden size is {hidden_size}")
            if num_layers is not None and layer != ANY_LAYER and not 0 <= layer < num_layers:
                raise ValueError(f"{where} is for layer {layer}; this model has layers 0-{num_layers - 1}")
    for source in registry.feature_sources():
        if source.d_model != hidden_size:
            raise ValueError(f"SAE {source.description} has d_model {source.d_model}; this model's hidden size is {hidden_size}")
        if num_layers is not None and not 0 <= source.layer < num_layers:
            raise ValueError(f"SAE {source.description} is for layer {source.layer}; this model has layers 0-{num_layers - 1}")


def export_vectors(
    registry: VectorRegistry,
    names: str | Iterable[str],
    path: str | Path,
    *,
    layers: Iterable[int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write registry entries to ``path``, the format chosen by its suffix.

    A layered vector is written with its own layers. A vector usable at any layer stays so in
    ``.pt``/``.safetensors``, or, given ``layers``, is written as a layered vector with the
    same direction at each (needed for ``.gguf``: a control vector is one layered vector, so
    a ``.gguf`` takes exactly one name). ``model_hint`` is the GGUF ``controlvector.model_hint``
    (default ``"llama"``). Reading the file back gives the same float32 values, bit for bit.
    """
    path = Path(path).expanduser()
    file_format = format_for(path.suffix, str(path))
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("no vector names given to export")
    layer_list = None if layers is None else sorted({int(layer) for layer in layers})
    if layer_list is not None and (not layer_list or layer_list[0] < 0):
        raise ValueError(f"layers must be non-empty and start at 0, got {layers}")
    entries: Entries = {}
    for name in names:
        if name not in registry.names():
            raise KeyError(f"no vector named {name!r}; loaded: {', '.join(registry.names()) or 'none'}")
        arrays = {layer: np.asarray(v, dtype=np.float32) for layer, v in registry.arrays_of(name).items()}
        if ANY_LAYER not in arrays and layer_list is not None:
            raise ValueError(
                f"{name!r} is layered (layers {sorted(arrays)}); it is written with its own layers, "
                "and `layers` applies to vectors usable at any layer"
            )
        if ANY_LAYER in arrays and layer_list is not None:
            arrays = {layer: arrays[ANY_LAYER] for layer in layer_list}
        entries[name] = arrays
    if file_format.name == "gguf":
        file_format.write(path, entries, model_hint=model_hint)
    elif model_hint is not None:
        raise ValueError("model_hint is recorded in .gguf control vectors only")
    else:
        file_format.write(path, entries)
    return path
