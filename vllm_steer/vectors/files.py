"""Vector files the engine loads at start.

Accepted here:
- ``.pt`` (the notebook's ``steering_vectors.pt``): a dict keyed by ``(layer, feature_id)``
  tuples (registered as features, usable in the spec's ``features`` form and by name
  ``L{layer}/F{feature_id}``), a dict keyed by strings (named vectors), or one 1-D tensor
  (named after the file). Read with ``torch.load(weights_only=True)``: no pickled code runs.
- ``.safetensors``: each 1-D tensor is a named vector.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from vllm_steer.vectors.registry import VectorRegistry


def _as_vector(value: object, where: str) -> np.ndarray:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{where}: expected a 1-D tensor, got {shape}")
    return value.detach().to(torch.float32).cpu().numpy()


def read_pt(path: Path, registry: VectorRegistry) -> None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused to load: it holds pickled objects other than tensors, dicts, "
            f"lists, tuples and numbers (loaded with weights_only=True). ({exc})".splitlines()[0]
        ) from None
    source = str(path)
    if isinstance(data, torch.Tensor):
        registry.add(path.stem, _as_vector(data, source), replace=True, source=source)
        return
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")
    for key, value in data.items():
        where = f"{path}[{key!r}]"
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
            registry.add_feature(key[0], key[1], _as_vector(value, where), source=source)
        elif isinstance(key, str):
            registry.add(key, _as_vector(value, where), replace=True, source=source)
        else:
            raise ValueError(f"{where}: keys must be (layer, feature_id) tuples or names")


def read_safetensors(path: Path, registry: VectorRegistry) -> None:
    from safetensors.torch import load_file

    for name, tensor in load_file(str(path)).items():
        registry.add(name, _as_vector(tensor, f"{path}[{name!r}]"), replace=True, source=str(path))


READERS = {".pt": read_pt, ".pth": read_pt, ".safetensors": read_safetensors}


def load_vector_file(path: str | Path, registry: VectorRegistry) -> None:
    path = Path(path).expanduser()
    reader = READERS.get(path.suffix)
    if reader is None:
        raise ValueError(f"{path}: unknown vector file type; supported: {', '.join(sorted(READERS))}")
    if not path.is_file():
        raise FileNotFoundError(f"vector file not found: {path}")
    reader(path, registry)


def load_registry(vector_files=(), sae=()) -> VectorRegistry:
    """A registry holding the configured vector files, with the configured SAE decoders as
    on-demand feature sources. Every process builds the same one from the same settings."""
    registry = VectorRegistry()
    for path in vector_files:
        load_vector_file(path, registry)
    if sae:
        raise NotImplementedError("SAE decoders are not readable yet")
    return registry
