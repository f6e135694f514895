"""Small pieces the file formats share: name conventions and tensor -> float32 vector."""

from __future__ import annotations

import re

import numpy as np
import torch

from vllm_steer.core.registry import ANY_LAYER

# The registry name of a notebook feature (registry.feature_name): a vector stored under this
# name in a file is registered as that feature, usable in the spec's ``features`` form.
FEATURE_NAME = re.compile(r"L(\d+)/F(\d+)")

# What export hands a writer: name -> {layer: vector}, with key ANY_LAYER for a vector usable
# at any layer. Arrays are float32 and 1-D.
Entries = dict[str, dict[int, np.ndarray]]


def as_vector(value: object, where: str) -> np.ndarray:
    """A 1-D floating-point tensor or array as a float32 numpy vector (bit-exact for float32)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: expected a 1-D tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{where}: expected a 1-D tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{where}: expected floating-point values, got {value.dtype}")
    return value.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def feature_key(name: str) -> tuple[int, int] | None:
    """``(layer, feature_id)`` when ``name`` is a feature name ``L{layer}/F{feature_id}``."""
    match = FEATURE_NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def is_layered(layers: dict[int, np.ndarray]) -> bool:
    return ANY_LAYER not in layers
