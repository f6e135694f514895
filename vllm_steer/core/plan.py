"""What a resolved request steers, shared by every process: the model's shape as steering
sees it (``ModelShape``), one operation at one layer (``Op``), a condition (``Gate``) and a
request's whole steering (``ResolvedSteering``) with its canonical form (fingerprint and
cache namespace), its row keys and its wire form. The front end builds these (resolve.py);
the scheduler and the workers only decode them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from vllm_steer.core.registry import VectorRegistry
from vllm_steer.core.spec import ApplyTo, Compare, Mode, decode_b64, encode_b64


@dataclass(frozen=True)
class ModelShape:
    """What validation needs to know about the served model."""

    num_layers: int
    hidden_size: int
    steerable_layers: tuple[int, ...]
    max_directions: int
    max_request_ops: int = 256  # (vector, layer) operations in one spec
    dtype: str = "float32"  # the served model's: what the steered stream must fit
    table_rows: int | None = None  # rows of the steering row pool, row 0 included (rows.py)
    pipeline_stages: int = 1

    @property
    def dtype_max(self) -> float:
        return _dtype_max(self.dtype)


@functools.cache  # read per vector and layer of every request
def _dtype_max(dtype: str) -> float:
    return float(torch.finfo(getattr(torch, dtype)).max)


@dataclass(frozen=True)
class Op:
    """One operation at one layer, ``coeff = spec.scale * entry.scale`` (for a feature_clamp,
    the activation to set); a range's bounds (None: that side is open); a feature_clamp's
    ``probe`` (its encoder row's digest, offset and threshold: vectors.sae.FeatureEncoder)."""

    layer: int
    mode: Mode
    digest: str
    coeff: float
    normalize: bool
    bounds: tuple[float | None, float | None] | None = None
    probe: tuple[str, float, float] | None = None
    only_active: bool = False

    def as_list(self) -> list:
        """The op in the canonical and wire forms (a trailing dict holds what only some modes have)."""
        fields = [self.layer, self.mode, self.digest, self.coeff, self.normalize]
        extras = {key: value for key, value in (("bounds", self.bounds), ("probe", self.probe), ("only_active", self.only_active)) if value}
        return [*fields, extras] if extras else fields

    @classmethod
    def from_list(cls, fields: list) -> Op:
        layer, mode, digest, coeff, normalize, *rest = fields
        extras = rest[0] if rest else {}
        bounds, probe = extras.get("bounds"), extras.get("probe")
        return cls(int(layer), mode, digest, float(coeff), bool(normalize), tuple(bounds) if bounds else None,
                   tuple(probe) if probe else None, bool(extras.get("only_active", False)))

    @property
    def digests(self) -> tuple[str, ...]:
        """Every vector the op reads: its direction, and a feature_clamp's encoder row."""
        return (self.digest,) if self.probe is None else (self.digest, self.probe[0])


@dataclass(frozen=True)
class Gate:
    """A resolved condition: the mean over the prompt's tokens, at ``layer``, of
    ``a = <x, probe> + offset`` (``probe`` the unit direction when ``normalize``, else a
    feature's encoder row; a feature's ``a`` counts only above ``feature_threshold``), is
    ``compare`` (above/below) ``threshold``."""

    layer: int
    digest: str
    normalize: bool
    offset: float
    feature_threshold: float | None
    compare: Compare
    threshold: float

    def as_list(self) -> list:
        return [self.layer, self.digest, self.normalize, self.offset, self.feature_threshold, self.compare, self.threshold]

    @classmethod
    def from_list(cls, fields: list) -> Gate:
        layer, digest, normalize, offset, feature_threshold, compare, threshold = fields
        return cls(int(layer), digest, bool(normalize), float(offset),
                   None if feature_threshold is None else float(feature_threshold), compare, float(threshold))

    @property
    def row_key(self) -> tuple:
        """The content of the row that reads the condition (rows.build_gate_row): unlike a
        steering row's, it does not depend on the threshold, so gates on one direction share it."""
        return ("gate", self.digest, self.normalize, self.offset, self.feature_threshold)


@dataclass(frozen=True)
class ResolvedSteering:
    ops: tuple[Op, ...]
    apply_to: ApplyTo
    # Inline vectors (not in any registry) travel with the request.
    inline: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    gate: Gate | None = None

    def _body(self) -> dict:
        """What the steering is, by content: the canonical form, and the wire form's core."""
        body = {"apply_to": self.apply_to, "ops": [op.as_list() for op in self.ops]}
        if self.gate is not None:
            body["condition"] = self.gate.as_list()
        return body

    @cached_property
    def canonical(self) -> str:
        return json.dumps(self._body(), separators=(",", ":"))

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the steering by content: equal fingerprints steer identically."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:32]

    @cached_property
    def row_keys(self) -> dict[int, tuple]:
        """layer -> the content of its steering row (that layer's ops, in order; not the
        layer number): requests, and layers, with equal keys share one row of the pool
        (rows.py). The scheduler counts rows with these keys too, so both agree."""
        by_layer: dict[int, tuple] = {}
        for op in self.ops:
            by_layer[op.layer] = by_layer.get(op.layer, ()) + ((op.mode, op.digest, op.coeff, op.normalize, op.bounds, op.probe, op.only_active),)
        return by_layer

    @cached_property
    def rows(self) -> frozenset:
        """Every pool row the request holds: its steering rows and its gate's."""
        return frozenset(self.row_keys.values()) | ({self.gate.row_key} if self.gate else set())

    def cache_namespace(self, prompt_len: int) -> str:
        """What a request's KV blocks depend on. A phase-limited spec steers positions by
        where the prompt ends, so the same tokens cached under another prompt length (the
        next turn of a chat, whose prompt holds this turn's answer) were steered differently."""
        return self.fingerprint if self.apply_to == "all" else f"{self.fingerprint}@{prompt_len}"

    @cached_property
    def digests(self) -> frozenset[str]:
        """The content every op and the condition read."""
        return frozenset(digest for op in self.ops for digest in op.digests) | ({self.gate.digest} if self.gate else set())

    def arrays(self, registry: VectorRegistry) -> dict[str, np.ndarray]:
        """digest -> float32 vector for every op (inline ones first, then the registry's)."""
        return {digest: self.inline[digest] if digest in self.inline else registry.array(digest) for digest in self.digests}

    def carrying(self, arrays: Mapping[str, np.ndarray]) -> ResolvedSteering:
        """The same steering with ``arrays`` travelling inline too (same fingerprint)."""
        return replace(self, inline={**self.inline, **arrays})

    @cached_property
    def wire(self) -> str:
        """The form the workers receive (JSON): ops by digest, inline vectors as base64."""
        inline = {digest: encode_b64(array) for digest, array in self.inline.items()}
        return json.dumps({**self._body(), "inline": inline, "fingerprint": self.fingerprint}, separators=(",", ":"))

    @classmethod
    def from_wire(cls, text: str) -> ResolvedSteering:
        """Decode ``wire``. No validation: the front end resolved it."""
        body = json.loads(text)
        ops = tuple(Op.from_list(fields) for fields in body["ops"])
        gate = Gate.from_list(body["condition"]) if "condition" in body else None
        resolved = cls(ops, body["apply_to"], {digest: decode_b64(b64) for digest, b64 in body["inline"].items()}, gate)
        # Computed once, by the front end: admission is on the step path.
        resolved.__dict__["fingerprint"] = body["fingerprint"]
        resolved.__dict__["wire"] = text  # handed on as it came
        return resolved


def unit(vector: torch.Tensor) -> torch.Tensor:
    """The notebook's normalization, exactly: ``v / (||v|| + 1e-12)``."""
    return vector / (vector.norm() + 1e-12)
