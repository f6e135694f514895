"""``.safetensors`` vector files: one 1-D tensor per vector, named by its tensor name.

- ``NAME`` -- a vector usable at any layer;
- ``NAME.layer.L`` -- the direction of the layered vector ``NAME`` at layer ``L`` (our
  layer numbering: the output of decoder layer ``L``, from 0); all tensors ``NAME.layer.*``
  together make one layered vector;
- ``L{layer}/F{feature_id}`` -- a notebook feature (usable in the spec's ``features`` form).

Any other shape is refused (a 2-D tensor has no agreed meaning; SAE decoders are read as
``sae`` sources, see sae.py). Floating-point tensors of any width are read as float32. The
writer produces exactly this layout, in float32, and refuses a plain vector whose name would
read back as a layer of a layered one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from vllm_steer.vectors.common import Entries, as_vector, feature_key, is_layered
from vllm_steer.core.registry import ANY_LAYER, VectorRegistry

SUFFIXES = (".safetensors",)
DESCRIPTION = "safetensors: NAME, NAME.layer.L, L{layer}/F{feature_id}"
LAYERED_NAME = re.compile(r"(.+)\.layer\.(\d+)")


def layer_tensor_name(name: str, layer: int) -> str:
    return f"{name}.layer.{layer}"


def read(path: Path, registry: VectorRegistry, *, name: str | None = None, source: str | None = None) -> None:
    source = source or str(path)
    singles: dict[str, np.ndarray] = {}
    layered: dict[str, dict[int, np.ndarray]] = {}
    try:
        file = safe_open(str(path), framework="pt")
    except SafetensorError as exc:  # not a ValueError, which is what callers catch
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    with file:
        for key in file.keys():
            vector = as_vector(file.get_tensor(key), f"{path}[{key!r}]")
            match = LAYERED_NAME.fullmatch(key)
            if match:
                layered.setdefault(match[1], {})[int(match[2])] = vector
            else:
                singles[key] = vector
    clash = sorted(set(singles) & set(layered))
    if clash:
        raise ValueError(
            f"{path}: {clash[0]!r} is both a plain vector and a layered one ({clash[0]}.layer.N tensors)"
        )
    if name is not None:
        if len(singles) + len(layered) != 1:
            raise ValueError(f"{source}: #name= applies to a file holding one vector; this one holds several")
        (vector,) = [*singles.values(), *layered.values()]
        singles, layered = ({name: vector}, {}) if isinstance(vector, np.ndarray) else ({}, {name: vector})
    for key, vector in singles.items():
        feature = feature_key(key)
        if feature is not None and name is None:
            registry.add_feature(*feature, vector, source=source)
        else:
            registry.add(key, vector, replace=True, source=source)
    for key, layers in layered.items():
        registry.add(key, layers, replace=True, source=source)


def write(path: Path, entries: Entries) -> None:
    tensors: dict[str, np.ndarray] = {}
    for name, layers in entries.items():
        if is_layered(layers):
            for layer, vector in sorted(layers.items()):
                tensors[layer_tensor_name(name, layer)] = vector
        else:
            if LAYERED_NAME.fullmatch(name):
                raise ValueError(
                    f"cannot write vector {name!r} to safetensors: a name ending in '.layer.N' reads back "
                    "as one layer of a layered vector"
                )
            tensors[name] = layers[ANY_LAYER]
    if len(tensors) != sum(len(layers) for layers in entries.values()):
        raise ValueError("two vectors would get the same tensor name (a plain 'X.layer.N' and a layered 'X')")
    save_file({key: np.ascontiguousarray(v, dtype="<f4") for key, v in tensors.items()}, str(path))
