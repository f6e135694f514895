"""PyTorch ``.pt``/``.pth`` vector files (the notebook's ``steering_vectors.pt``).

Accepted layouts (every vector a 1-D floating-point tensor):

- ``{(layer, feature_id): tensor}`` -- the notebook's file: each entry is registered as a
  feature (the spec's ``features`` form) and by name ``L{layer}/F{feature_id}``;
- ``{name: tensor}`` -- named vectors, usable at any layer (a name of the form
  ``L{layer}/F{feature_id}`` is registered as that feature too);
- ``{name: {layer: tensor}}`` -- a layered vector, one direction per layer;
- one tensor -- a vector named after the file's stem (or the source's ``#name=``).

Keys of different kinds may be mixed in one dict. A bare 2-D tensor is refused: nothing in
it says whether its rows are layers, separate vectors or SAE features (give SAE decoders as
``sae`` sources, see sae.py).

Files are read with ``torch.load(weights_only=True)``: a file holding any pickled object
other than tensors, containers and numbers (a class instance, a ``__reduce__`` callable) is
refused before anything in it runs. The writer produces the first three layouts.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from vllm_steer.vectors.common import Entries, as_vector, feature_key, is_layered
from vllm_steer.core.registry import ANY_LAYER, VectorRegistry

SUFFIXES = (".pt", ".pth")
DESCRIPTION = "PyTorch, read with weights_only=True"


def safe_torch_load(path: Path, **kwargs):
    """``torch.load`` that runs no pickled code: anything beyond tensors, containers and
    numbers is a ValueError saying so."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        # torch's message advises retrying with weights_only=False; keep only what it found.
        found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        reason = f" (it references {found[1]})" if found else ""
        raise ValueError(
            f"{path}: refused to load: it holds pickled objects other than tensors, dicts, lists, "
            f"tuples and numbers, which could run code; only weights_only loading is allowed{reason}"
        ) from None
    except (EOFError, RuntimeError) as exc:  # empty, truncated or not a torch file at all
        raise ValueError(f"{path}: not a readable PyTorch file ({exc or 'it ends early'})") from None


def read(path: Path, registry: VectorRegistry, *, name: str | None = None, source: str | None = None) -> None:
    source = source or str(path)
    data = safe_torch_load(path)
    if isinstance(data, torch.Tensor):
        if data.dim() == 2:
            raise ValueError(
                f"{path}: holds one 2-D tensor {tuple(data.shape)}; its rows could be layers, separate "
                "vectors or SAE features, so it is not read. Save a dict instead: {name: 1-D tensor}, "
                "{name: {layer: 1-D tensor}} or {(layer, feature_id): 1-D tensor} (SAE decoders: use `sae`)"
            )
        registry.add(name or path.stem, as_vector(data, str(path)), replace=True, source=source)
        return
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")
    if name is not None:
        raise ValueError(f"{source}: #name= applies to a file holding one vector; this one holds a dict")
    for key, value in data.items():
        where = f"{path}[{key!r}]"
        if isinstance(key, tuple) and len(key) == 2 and all(_is_int(k) for k in key):
            registry.add_feature(key[0], key[1], as_vector(value, where), source=source)
        elif isinstance(key, str) and isinstance(value, dict):
            if not value or not all(_is_int(layer) for layer in value):
                raise ValueError(f"{where}: a layered vector is a dict {{layer: 1-D tensor}} with integer layers")
            layers = {layer: as_vector(v, f"{where}[{layer}]") for layer, v in value.items()}
            registry.add(key, layers, replace=True, source=source)
        elif isinstance(key, str):
            vector = as_vector(value, where)
            feature = feature_key(key)
            if feature is not None:
                registry.add_feature(*feature, vector, source=source)
            else:
                registry.add(key, vector, replace=True, source=source)
        else:
            raise ValueError(f"{where}: keys must be (layer, feature_id) tuples or names")


def write(path: Path, entries: Entries) -> None:
    data: dict = {}
    for name, layers in entries.items():
        if is_layered(layers):
            data[name] = {layer: torch.from_numpy(v.copy()) for layer, v in sorted(layers.items())}
        else:
            vector = torch.from_numpy(layers[ANY_LAYER].copy())
            data[feature_key(name) or name] = vector
    torch.save(data, path)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
