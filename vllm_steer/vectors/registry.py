"""A content-addressed store of steering vectors.

Every vector is kept once, by digest (sha256 of its float32 bytes). Names and notebook
features ``(layer, feature_id)`` are labels pointing at digests, so replacing a name never
changes what an existing digest means: a request resolved to digests keeps its vectors.

A name points either at one vector (usable at any layer) or, for a *layered* vector such
as a llama.cpp/repeng control vector or an extracted concept, at one vector per layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vllm_steer.spec import DIGEST_PREFIX, vector_digest

ANY_LAYER = -1  # the key of a vector that applies at whichever layer a request names


@dataclass(frozen=True)
class VectorInfo:
    name: str
    digest: str  # the vector's digest; for a layered vector, a digest of its per-layer digests
    dimension: int
    norm: float  # for a layered vector, the largest per-layer norm
    layers: tuple[int, ...] | None  # None: usable at any layer
    source: str


class FeatureSource(Protocol):
    """A large set of feature vectors of one layer (an SAE decoder), read on demand."""

    layer: int
    num_features: int
    description: str

    def feature(self, feature_id: int) -> np.ndarray:
        """The decoder vector of one feature (raises KeyError when out of range)."""


class VectorRegistry:
    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._names: dict[str, dict[int, str]] = {}
        self._sources: dict[str, str] = {}
        self._features: dict[tuple[int, int], str] = {}
        self._feature_sources: dict[int, FeatureSource] = {}
        # Digests read on demand from a feature source: other processes may not hold them,
        # so requests carry them inline (see resolve.py).
        self.on_demand: set[str] = set()

    def _store(self, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        if array.size == 0 or not np.isfinite(array).all():
            raise ValueError("a steering vector must be non-empty and finite")
        digest = vector_digest(array)
        array.setflags(write=False)
        self._arrays.setdefault(digest, array)
        return digest

    def add(
        self,
        name: str,
        vector: np.ndarray | Mapping[int, np.ndarray],
        *,
        replace: bool = False,
        source: str = "inline",
    ) -> str:
        """Register ``name`` (one vector, or ``{layer: vector}``); with ``replace`` an existing
        name is re-pointed. Returns the entry's digest."""
        if not name or name.startswith(DIGEST_PREFIX):
            raise ValueError(f"invalid vector name {name!r}")
        if name in self._names and not replace:
            raise ValueError(f"vector {name!r} already exists; pass replace=True to replace it")
        if isinstance(vector, Mapping):
            if not vector:
                raise ValueError(f"layered vector {name!r} has no layers")
            if any(int(layer) < 0 for layer in vector):
                raise ValueError(f"layered vector {name!r}: layer numbers start at 0")
            sizes = {np.asarray(v).size for v in vector.values()}
            if len(sizes) != 1:
                raise ValueError(f"layered vector {name!r}: every layer's vector must have the same size")
            entry = {int(layer): self._store(v) for layer, v in sorted(vector.items())}
        else:
            entry = {ANY_LAYER: self._store(vector)}
        self._names[name] = entry
        self._sources[name] = source
        return _entry_digest(entry)

    def add_feature(self, layer: int, feature_id: int, array: np.ndarray, *, source: str) -> str:
        digest = self._store(array)
        self._features[(layer, feature_id)] = digest
        self._names[feature_name(layer, feature_id)] = {ANY_LAYER: digest}
        self._sources[feature_name(layer, feature_id)] = source
        return digest

    def remove(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(f"no vector named {name!r}")
        del self._names[name]
        del self._sources[name]
        self._features = {key: d for key, d in self._features.items() if feature_name(*key) != name}

    def digest_of(self, name: str, layer: int = ANY_LAYER) -> str | None:
        """The digest a name (or a ``sha256:`` reference) means at ``layer``; None when unknown
        (or when a layered vector has no direction for that layer)."""
        if name.startswith(DIGEST_PREFIX):
            return name if name in self._arrays else None
        entry = self._names.get(name)
        if entry is None:
            return None
        return entry.get(ANY_LAYER) or entry.get(layer)

    def layers_of(self, name: str) -> tuple[int, ...] | None:
        """The layers of a layered vector; None for a vector usable at any layer (or unknown)."""
        entry = self._names.get(name)
        if entry is None or ANY_LAYER in entry:
            return None
        return tuple(entry)

    def add_feature_source(self, source: FeatureSource) -> None:
        """Serve features of ``source.layer`` not loaded explicitly from ``source``, on demand."""
        self._feature_sources[source.layer] = source

    def feature_digest(self, layer: int, feature_id: int) -> str | None:
        digest = self._features.get((layer, feature_id))
        source = self._feature_sources.get(layer)
        if digest is None and source is not None and 0 <= feature_id < source.num_features:
            digest = self._store(source.feature(feature_id))
            self._features[(layer, feature_id)] = digest
            self.on_demand.add(digest)
        return digest

    def feature_sources(self) -> list[FeatureSource]:
        return [self._feature_sources[layer] for layer in sorted(self._feature_sources)]

    def array(self, digest: str) -> np.ndarray:
        return self._arrays[digest]

    def arrays_of(self, name: str) -> dict[int, np.ndarray]:
        """``{layer: vector}`` of a name (key ``ANY_LAYER`` for a vector usable anywhere)."""
        return {layer: self._arrays[digest] for layer, digest in self._names[name].items()}

    def names(self) -> list[str]:
        return sorted(self._names)

    def features(self) -> list[tuple[int, int]]:
        """Features loaded explicitly (not those read on demand from a feature source)."""
        return sorted(key for key, digest in self._features.items() if digest not in self.on_demand)

    def info(self, name: str) -> VectorInfo:
        entry = self._names[name]
        arrays = [self._arrays[d] for d in entry.values()]
        return VectorInfo(
            name=name,
            digest=_entry_digest(entry),
            dimension=int(arrays[0].size),
            norm=max(float(np.linalg.norm(a)) for a in arrays),
            layers=self.layers_of(name),
            source=self._sources[name],
        )

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names


Vector = np.ndarray | Mapping[int, np.ndarray]


def vector_to_wire(vector: Vector) -> bytes | dict[int, bytes]:
    """float32 bytes (per layer for a layered vector): how vectors travel to the workers."""
    if isinstance(vector, Mapping):
        return {int(layer): vector_to_wire(v) for layer, v in vector.items()}
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from_wire(raw: bytes | Mapping[int, bytes]) -> Vector:
    if isinstance(raw, Mapping):
        return {int(layer): np.frombuffer(v, dtype="<f4") for layer, v in raw.items()}
    return np.frombuffer(raw, dtype="<f4")


def _entry_digest(entry: dict[int, str]) -> str:
    if ANY_LAYER in entry:
        return entry[ANY_LAYER]
    body = ",".join(f"{layer}:{digest}" for layer, digest in sorted(entry.items()))
    return DIGEST_PREFIX + hashlib.sha256(body.encode()).hexdigest()


def feature_name(layer: int, feature_id: int) -> str:
    """The registry name of a notebook feature: ``L{layer}/F{feature_id}``."""
    return f"L{layer}/F{feature_id}"
