"""A content-addressed store of steering vectors.

Every vector is kept once, by digest (sha256 of its float32 bytes). Names and notebook
features ``(layer, feature_id)`` are labels pointing at digests, so replacing a name never
changes what an existing digest means: a request resolved to digests keeps its vectors.

A name points either at one vector (usable at any layer) or, for a *layered* vector such
as a llama.cpp/repeng control vector or an extracted concept, at one vector per layer.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vllm_steer.core.spec import DIGEST_PREFIX, vector_digest

ANY_LAYER = -1  # the key of a vector that applies at whichever layer a request names
# Retired content (no name points at it) kept for requests accepted before a delete/replace.
RETIRED_LIMIT = 256
# SAE features read on demand and kept for reuse.
ON_DEMAND_LIMIT = 4096


class LRU(OrderedDict):
    """A dict that keeps its ``limit`` most recently used entries."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> list:
        """Store; return the (key, value) pairs evicted to stay within the limit."""
        self[key] = value
        self.move_to_end(key)
        evicted = []
        while len(self) > self.limit:
            evicted.append(self.popitem(last=False))
        return evicted


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
    d_model: int  # the hidden size it was trained on
    description: str

    def feature(self, feature_id: int) -> np.ndarray:
        """The decoder vector of one feature (raises KeyError when out of range)."""

    def encoder(self, feature_id: int):
        """The feature's encoder (vectors.sae.FeatureEncoder: row, offset, threshold); raises
        ValueError when the source has none it can use."""

    @property
    def encoding(self):
        """How the SAE encodes (vectors.sae.Encoding), for finding features; raises
        ValueError when it cannot."""

    def encoder_chunks(self, features_per_chunk: int | None = None):
        """The whole encoder as ``(start, [n, d_model] weights)``, a bounded chunk at a time."""

class VectorRegistry:
    """Names and features -> digests -> float32 arrays.

    Content lives while a name or a loaded feature points at it. Content that loses its last
    reference is *retired*: no longer resolvable by name or ``sha256:`` reference, but kept
    in a bounded LRU so a request accepted before the change (it carries the digest) can
    still be admitted. Features read on demand from an SAE are a bounded LRU as well.
    """

    def __init__(self, *, retired_limit: int = RETIRED_LIMIT, on_demand_limit: int = ON_DEMAND_LIMIT) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._refs: Counter[str] = Counter()
        self._names: dict[str, dict[int, str]] = {}
        self._sources: dict[str, str] = {}
        self._features: dict[tuple[int, int], str] = {}
        self._feature_sources: dict[int, FeatureSource] = {}
        self._retired: LRU = LRU(retired_limit)
        # (layer, feature_id) -> (digest, array) read from a feature source. Other processes
        # may not hold them, so requests carry them inline (see resolve.py).
        self._on_demand: LRU = LRU(on_demand_limit)
        self._on_demand_key: dict[str, tuple[int, int]] = {}  # digest -> its key in _on_demand

    # ---- content, reference-counted ------------------------------------------------------
    def _hold(self, array: np.ndarray) -> str:
        """Count one more reference to this content (stored if new); its digest."""
        digest = vector_digest(array)
        if digest not in self._arrays:
            revived = self._retired.pop(digest, None)
            array.setflags(write=False)
            self._arrays[digest] = array if revived is None else revived
        self._refs[digest] += 1
        return digest

    def _release(self, digest: str) -> None:
        self._refs[digest] -= 1
        if self._refs[digest] <= 0:
            del self._refs[digest]
            self._retired.put(digest, self._arrays.pop(digest))

    def _set_name(self, name: str, entry: dict[int, str], source: str) -> None:
        old = self._names.get(name)
        self._names[name] = entry
        self._sources[name] = source
        for digest in (old or {}).values():
            self._release(digest)

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
            checked = {int(layer): _clean(v) for layer, v in sorted(vector.items())}
        else:
            checked = {ANY_LAYER: _clean(vector)}
        entry = {layer: self._hold(array) for layer, array in checked.items()}
        self._set_name(name, entry, source)
        return _entry_digest(entry)

    def add_feature(self, layer: int, feature_id: int, array: np.ndarray, *, source: str) -> str:
        """A notebook feature, also registered by name ``feature_name(layer, feature_id)``."""
        array = _clean(array)
        digest = self._hold(array)
        old = self._features.get((layer, feature_id))
        self._features[(layer, feature_id)] = digest
        if old is not None:
            self._release(old)
        self._set_name(feature_name(layer, feature_id), {ANY_LAYER: self._hold(array)}, source)
        return digest

    def remove(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(f"no vector named {name!r}")
        for digest in self._names.pop(name).values():
            self._release(digest)
        del self._sources[name]
        for key in [key for key in self._features if feature_name(*key) == name]:
            self._release(self._features.pop(key))

    def digest_of(self, name: str, layer: int = ANY_LAYER) -> str | None:
        """The digest a name (or a ``sha256:`` reference to live content) means at ``layer``;
        None when unknown (or when a layered vector has no direction for that layer)."""
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
        """Serve features of ``source.layer`` not loaded explicitly from ``source``, on demand.
        One serving that layer before is replaced, and what was read from it forgotten."""
        self._feature_sources[source.layer] = source
        for key in [key for key in self._on_demand if key[0] == source.layer]:
            digest = self._on_demand.pop(key)[0]
            if self._on_demand_key.get(digest) == key:
                del self._on_demand_key[digest]

    def feature_digest(self, layer: int, feature_id: int) -> str | None:
        """The digest of a loaded feature, or of one its layer's feature source holds (read
        on demand, kept in a bounded LRU); None when neither has it."""
        digest = self._features.get((layer, feature_id))
        if digest is not None:
            return digest
        source = self._feature_sources.get(layer)
        if source is None or not 0 <= feature_id < source.num_features:
            return None
        return self._source_feature(layer, feature_id, source)

    def sae_feature(self, layer: int, feature_id: int) -> tuple[str, str, float, float]:
        """A feature of the layer's SAE, whole: (decoder row digest, encoder row digest, offset,
        threshold); both rows read on demand and held like decoder rows. Always the SAE's own
        decoder row, even where a loaded feature vector has the same (layer, id). KeyError or
        ValueError say why there is none."""
        source = self._feature_sources.get(layer)
        if source is None:
            raise ValueError(f"no SAE is loaded for layer {layer}, so feature {feature_id} has no encoder")
        key = (layer, feature_id, "encoder")
        cached = self._on_demand.get(key)
        if cached is None:
            encoder = source.encoder(feature_id)
            array = _frozen(encoder.row)
            cached = (vector_digest(array), array, encoder.offset, encoder.threshold)
            self._remember(key, cached)
        return self._source_feature(layer, feature_id, source), cached[0], cached[2], cached[3]

    def _source_feature(self, layer: int, feature_id: int, source: FeatureSource) -> str:
        """The digest of a feature's decoder row read from ``source`` (on demand)."""
        key = (layer, feature_id)
        cached = self._on_demand.get(key)
        if cached is not None:
            return cached[0]
        array = _frozen(source.feature(feature_id))
        digest = vector_digest(array)
        self._remember(key, (digest, array))
        return digest

    def _remember(self, key: tuple, entry: tuple) -> None:
        """Hold an on-demand read (digest first, array second) in the bounded LRU."""
        for old_key, (old_digest, *_) in self._on_demand.put(key, entry):
            if self._on_demand_key.get(old_digest) == old_key:
                del self._on_demand_key[old_digest]
        self._on_demand_key[entry[0]] = key

    def is_on_demand(self, digest: str) -> bool:
        """Read from a feature source and held only in this process's LRU."""
        return digest not in self._arrays and digest in self._on_demand_key

    def feature_sources(self) -> list[FeatureSource]:
        return [self._feature_sources[layer] for layer in sorted(self._feature_sources)]

    def array(self, digest: str) -> np.ndarray:
        """The content of a digest: live, read on demand, or retired (KeyError when gone)."""
        array = self._arrays.get(digest)
        if array is None:
            array = self._retired.get(digest)
        if array is None and digest in self._on_demand_key:
            array = self._on_demand.get(self._on_demand_key[digest])[1]
        if array is None:
            raise KeyError(f"vector {digest} is no longer held (deleted or replaced, and evicted)")
        return array

    def content_size(self) -> dict[str, int]:
        """How many arrays are held: live (named), retired, read on demand."""
        return {"live": len(self._arrays), "retired": len(self._retired), "on_demand": len(self._on_demand)}

    def entry_digest(self, name: str) -> str:
        """The digest of what a name points at (its vector, or all its layers' vectors)."""
        return _entry_digest(self._names[name])

    def vector(self, name: str) -> Vector:
        """A name's vector, or ``{layer: vector}`` for a layered one."""
        return as_vector(self.arrays_of(name))

    def content_digests(self, name: str) -> tuple[str, ...]:
        """The digests of a name's vectors (one per layer of a layered vector)."""
        return tuple(self._names[name].values())

    def arrays_of(self, name: str) -> dict[int, np.ndarray]:
        """``{layer: vector}`` of a name (key ``ANY_LAYER`` for a vector usable anywhere)."""
        return {layer: self._arrays[digest] for layer, digest in self._names[name].items()}

    def names(self) -> list[str]:
        return sorted(self._names)

    def features(self) -> list[tuple[int, int]]:
        """Features loaded explicitly (not those read on demand from a feature source)."""
        return sorted(self._features)

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


def as_vector(arrays: Mapping[int, np.ndarray]) -> Vector:
    """``{layer: vector}`` as a Vector: the one vector itself when it applies at any layer."""
    return arrays[ANY_LAYER] if ANY_LAYER in arrays else arrays


def vector_to_wire(vector: Vector) -> bytes | dict[int, bytes]:
    """float32 bytes (per layer for a layered vector): how vectors travel to the workers."""
    if isinstance(vector, Mapping):
        return {int(layer): vector_to_wire(v) for layer, v in vector.items()}
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from_wire(raw: bytes | Mapping[int, bytes]) -> Vector:
    if isinstance(raw, Mapping):
        return {int(layer): np.frombuffer(v, dtype="<f4") for layer, v in raw.items()}
    return np.frombuffer(raw, dtype="<f4")


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only flat float32 array (what on-demand reads are held as)."""
    array = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    array.setflags(write=False)
    return array


def _clean(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError("a steering vector must be non-empty and finite")
    return array


def _entry_digest(entry: dict[int, str]) -> str:
    if ANY_LAYER in entry:
        return entry[ANY_LAYER]
    body = ",".join(f"{layer}:{digest}" for layer, digest in sorted(entry.items()))
    return DIGEST_PREFIX + hashlib.sha256(body.encode()).hexdigest()


def feature_name(layer: int, feature_id: int) -> str:
    """The registry name of a notebook feature: ``L{layer}/F{feature_id}``."""
    return f"L{layer}/F{feature_id}"
