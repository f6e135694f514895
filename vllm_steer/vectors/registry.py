"""A content-addressed store of steering vectors.

Every vector is kept once, by digest (sha256 of its float32 bytes). Names and notebook
features ``(layer, feature_id)`` are labels pointing at digests, so replacing a name never
changes what an existing digest means: a request resolved to digests keeps its vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_steer.spec import DIGEST_PREFIX, vector_digest


@dataclass(frozen=True)
class VectorInfo:
    name: str
    digest: str
    dimension: int
    norm: float
    source: str


class VectorRegistry:
    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._names: dict[str, str] = {}
        self._sources: dict[str, str] = {}
        self._features: dict[tuple[int, int], str] = {}

    def _store(self, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        if array.size == 0 or not np.isfinite(array).all():
            raise ValueError("a steering vector must be non-empty and finite")
        digest = vector_digest(array)
        array.setflags(write=False)
        self._arrays.setdefault(digest, array)
        return digest

    def add(self, name: str, array: np.ndarray, *, replace: bool = False, source: str = "inline") -> str:
        """Register ``name``; with ``replace`` an existing name is re-pointed. Returns the digest."""
        if not name or name.startswith(DIGEST_PREFIX):
            raise ValueError(f"invalid vector name {name!r}")
        if name in self._names and not replace:
            raise ValueError(f"vector {name!r} already exists; pass replace=True to replace it")
        digest = self._store(array)
        self._names[name] = digest
        self._sources[name] = source
        return digest

    def add_feature(self, layer: int, feature_id: int, array: np.ndarray, *, source: str) -> str:
        digest = self._store(array)
        self._features[(layer, feature_id)] = digest
        self._names[feature_name(layer, feature_id)] = digest
        self._sources[feature_name(layer, feature_id)] = source
        return digest

    def add_digest(self, array: np.ndarray) -> str:
        """Store content only (no name): how workers receive vectors the front end resolved."""
        return self._store(array)

    def remove(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(f"no vector named {name!r}")
        del self._names[name]
        del self._sources[name]
        self._features = {key: d for key, d in self._features.items() if feature_name(*key) != name}

    def digest_of(self, name: str) -> str | None:
        """A name, or a ``sha256:`` reference, -> digest; None when unknown."""
        if name.startswith(DIGEST_PREFIX):
            return name if name in self._arrays else None
        return self._names.get(name)

    def feature_digest(self, layer: int, feature_id: int) -> str | None:
        return self._features.get((layer, feature_id))

    def array(self, digest: str) -> np.ndarray:
        return self._arrays[digest]

    def names(self) -> list[str]:
        return sorted(self._names)

    def features(self) -> list[tuple[int, int]]:
        return sorted(self._features)

    def info(self, name: str) -> VectorInfo:
        digest = self._names[name]
        array = self._arrays[digest]
        return VectorInfo(name, digest, int(array.size), float(np.linalg.norm(array)), self._sources[name])

    def __len__(self) -> int:
        return len(self._names)


def feature_name(layer: int, feature_id: int) -> str:
    """The registry name of a notebook feature: ``L{layer}/F{feature_id}``."""
    return f"L{layer}/F{feature_id}"
