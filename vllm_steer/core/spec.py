"""The request-level steering spec: one pydantic model for every entry path.

The same object arrives as the server's ``steering`` JSON field, the offline API's
``steering=`` argument and ``SamplingParams.extra_args["steering"]`` (a JSON string or a
dict). ``parse_spec`` validates its *shape*; what needs the model and the vector
registry (layer range, dimension, vector names) is checked in ``resolve.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Mode = Literal["add", "clamp", "ablate", "range", "feature_clamp"]
ApplyTo = Literal["all", "prompt", "generated"]
Compare = Literal["above", "below"]

FLOAT32_MAX = float(np.finfo(np.float32).max)

# A vector addressed by content: "sha256:<hex of the float32 little-endian bytes>".
DIGEST_PREFIX = "sha256:"


class SteeringError(ValueError):
    """A steering spec that cannot be applied. ``field`` names the offending part."""

    def __init__(self, message: str, field: str = "steering"):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


class DirectionSource(BaseModel):
    """Where a direction comes from: exactly one of ``name`` (a vector the engine has loaded),
    ``vector`` (inline floats), ``vector_b64`` (base64 of float32 little-endian bytes) or
    ``feature`` (``[layer, feature_id]`` of a loaded SAE or feature file, at its own layer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, min_length=1)
    vector: list[float] | None = Field(default=None, min_length=1)
    vector_b64: str | None = Field(default=None, min_length=1)
    feature: tuple[int, int] | None = None

    @field_validator("vector")
    @classmethod
    def _vector_finite(cls, vector: list[float] | None) -> list[float] | None:
        if vector is not None and not all(math.isfinite(x) for x in vector):
            raise ValueError("vector contains NaN or inf")
        if vector is not None and max(map(abs, vector)) > FLOAT32_MAX:
            raise ValueError(f"vector values must fit float32 (|x| <= {FLOAT32_MAX:.4g})")
        return vector

    @field_validator("vector_b64")
    @classmethod
    def _b64_decodes(cls, text: str | None) -> str | None:
        if text is not None:
            decode_b64(text)
        return text

    @field_validator("feature")
    @classmethod
    def _feature_sane(cls, feature: tuple[int, int] | None) -> tuple[int, int] | None:
        if feature is not None and min(feature) < 0:
            raise ValueError(f"[layer, feature_id] needs non-negative numbers, got {list(feature)}")
        return feature

    @model_validator(mode="after")
    def _one_source(self) -> DirectionSource:
        given = [k for k in ("name", "vector", "vector_b64", "feature") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'name', 'vector', 'vector_b64' or 'feature'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    def inline_array(self) -> np.ndarray | None:
        """The inline direction as float32, or None for a named one."""
        if self.vector is not None:
            return np.asarray(self.vector, dtype=np.float32)
        if self.vector_b64 is not None:
            return decode_b64(self.vector_b64)
        return None


class VectorEntry(DirectionSource):
    """One direction applied at one or more layers (a feature's: its decoder direction)."""

    # Layers to steer. May be left out only for a named *layered* vector (one direction per
    # layer, e.g. a control vector), which then steers all its layers.
    layers: list[int] | None = Field(default=None, min_length=1)
    scale: float = 1.0
    mode: Mode = "add"
    normalize: bool = False
    # Mode "range": bounds on the stream's component along the unit direction (one may be
    # absent): a component outside is moved to the nearest bound, one inside is left alone.
    min: float | None = None
    max: float | None = None
    # Mode "feature_clamp" (an SAE feature): change only the tokens where the feature fires.
    only_active: bool = False

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, layers: list[int] | None) -> list[int] | None:
        if layers is None:
            return None
        for layer in layers:
            if layer < 0:
                raise ValueError(f"layer numbers start at 0, got {layer}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"each layer may appear once, got {layers}")
        return layers

    @field_validator("scale")
    @classmethod
    def _scale_finite(cls, scale: float) -> float:
        return _finite(scale, "scale")

    @field_validator("min", "max")
    @classmethod
    def _bound_finite(cls, bound: float | None, info) -> float | None:
        return None if bound is None else _finite(bound, info.field_name)

    @model_validator(mode="after")
    def _modes(self) -> VectorEntry:
        if self.feature is not None and self.layers not in (None, [self.feature[0]]):
            raise ValueError(f"a feature steers its own layer ({self.feature[0]}): leave out 'layers'")
        if self.layers is None and self.name is None and self.feature is None:
            raise ValueError("'layers' is required for an inline vector")
        if self.mode == "feature_clamp" and self.feature is None:
            raise ValueError("mode 'feature_clamp' sets an SAE feature's activation: give 'feature': [layer, feature_id]")
        if self.only_active and self.mode != "feature_clamp":
            raise ValueError("'only_active' applies to mode 'feature_clamp' only")
        if self.mode == "range":
            if self.min is None and self.max is None:
                raise ValueError("mode 'range' needs 'min', 'max' or both")
            if self.min is not None and self.max is not None and self.min > self.max:
                raise ValueError(f"'min' ({self.min:g}) is above 'max' ({self.max:g})")
            if self.scale != 1.0:
                raise ValueError("mode 'range' takes 'min'/'max' bounds; 'scale' does not apply to it")
        elif self.min is not None or self.max is not None:
            raise ValueError(f"'min'/'max' apply to mode 'range' only, not to mode {self.mode!r}")
        return self


class Condition(DirectionSource):
    """Steer only requests whose prompt matches (CAST, conditional activation steering): the
    mean over the prompt's tokens of the stream's component along a unit direction, or of an
    SAE feature's activation (``feature``: its encoder), at ``layer`` (a feature's own), is
    ``above`` or ``below`` ``threshold``. The prompt is read unsteered, so a gated request
    steers its generated tokens only."""

    layer: int | None = None
    threshold: float
    compare: Compare = "above"

    @field_validator("threshold")
    @classmethod
    def _threshold_finite(cls, threshold: float) -> float:
        return _finite(threshold, "threshold")

    @field_validator("layer")
    @classmethod
    def _layer_non_negative(cls, layer: int | None) -> int | None:
        if layer is not None and layer < 0:
            raise ValueError(f"layer numbers start at 0, got {layer}")
        return layer

    @model_validator(mode="after")
    def _layer_given(self) -> Condition:
        if self.feature is not None and self.layer not in (None, self.feature[0]):
            raise ValueError(f"a feature is read at its own layer ({self.feature[0]}): leave out 'layer'")
        if self.feature is None and self.layer is None:
            raise ValueError("'layer' is required: the layer whose stream the condition reads")
        return self

    @property
    def at_layer(self) -> int:
        return self.feature[0] if self.feature is not None else self.layer


Feature = tuple[int, int, float]


class SteeringSpec(BaseModel):
    """What one request asks for.

    ``vectors`` is the general form. ``features`` is the original notebook's form:
    ``[layer, feature_id, strength]`` rows resolved through the engine's loaded feature
    vectors, unit-normalized, effective strength ``strength * layer`` when
    ``reduced_strengths`` (the notebook's default), and ``clamp`` choosing clamp over add.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vectors: list[VectorEntry] = Field(default_factory=list)
    features: list[Feature] = Field(default_factory=list)
    scale: float = 1.0
    clamp: bool | None = None
    reduced_strengths: bool | None = None
    condition: Condition | None = None
    # Default: every token, or with a condition the generated ones.
    apply_to: ApplyTo | None = None

    @field_validator("scale")
    @classmethod
    def _scale_finite(cls, scale: float) -> float:
        return _finite(scale, "scale")

    @field_validator("features")
    @classmethod
    def _features_sane(cls, features: list[Feature]) -> list[Feature]:
        for layer, feature_id, strength in features:
            if layer < 0 or feature_id < 0:
                raise ValueError(
                    f"[layer, feature_id, strength] needs non-negative layer and feature_id, "
                    f"got {[layer, feature_id, strength]}"
                )
            _finite(strength, "strength")
        return features

    @model_validator(mode="after")
    def _not_empty(self) -> SteeringSpec:
        if not self.vectors and not self.features:
            raise ValueError("empty steering spec: give 'vectors' or 'features'")
        if not self.features and (self.clamp is not None or self.reduced_strengths is not None):
            raise ValueError(
                "'clamp' and 'reduced_strengths' apply to 'features' only; "
                "give each entry of 'vectors' a 'mode' instead"
            )
        return self

    @field_validator("apply_to")
    @classmethod
    def _phase_fits_condition(cls, apply_to: ApplyTo | None, info) -> ApplyTo | None:
        if info.data.get("condition") is not None and apply_to not in (None, "generated"):
            raise ValueError(
                f"a condition is judged on the whole prompt, so it gates generated tokens only: "
                f"leave out 'apply_to' or give 'generated', not {apply_to!r}"
            )
        return apply_to

    @property
    def phase(self) -> ApplyTo:
        return self.apply_to or ("generated" if self.condition is not None else "all")

    @property
    def use_clamp(self) -> bool:
        return bool(self.clamp)

    @property
    def use_reduced_strengths(self) -> bool:
        return True if self.reduced_strengths is None else self.reduced_strengths


def decode_b64(text: str) -> np.ndarray:
    """base64 of float32 little-endian bytes -> a finite float32 vector."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"vector_b64 is not valid base64 ({exc})") from None
    if not raw or len(raw) % 4:
        raise ValueError(f"vector_b64 must hold float32 values (a multiple of 4 bytes), got {len(raw)} bytes")
    array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError("vector_b64 contains NaN or inf")
    return array


def encode_b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def vector_digest(array: np.ndarray) -> str:
    """Content address of a vector: sha256 of its float32 little-endian bytes."""
    return DIGEST_PREFIX + hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def _format_location(loc: tuple[Any, ...], root: str) -> str:
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


class CaptureSpec(BaseModel):
    """Record the residual stream of this request's prompt at ``layers`` (after any steering
    there): the last prompt token's, or the mean over prompt tokens. Results are collected
    by ``key``. Needs an engine started with capture on (``hf_overrides`` steering.capture)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, max_length=128)
    layers: list[int] = Field(min_length=1)
    reduce: Literal["last", "mean"] = "last"


def parse_spec(value: SteeringSpec | str | bytes | dict[str, Any]) -> SteeringSpec:
    """Validate a steering spec given as a model, a dict or JSON text; raise one SteeringError."""
    return _parse(SteeringSpec, value, "steering")


def parse_capture(value: CaptureSpec | str | bytes | dict[str, Any]) -> CaptureSpec:
    return _parse(CaptureSpec, value, "steering_capture")


def _parse(model: type[BaseModel], value: Any, root: str):
    if isinstance(value, model):
        return value
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise SteeringError(f"not valid JSON ({exc})", root) from None
    if not isinstance(value, dict):
        raise SteeringError(f"must be a JSON object, got {type(value).__name__}", root)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            inner = {"vectors": VectorEntry, "condition": Condition}
            fields = next((inner[part] for part in first["loc"] if part in inner), model).model_fields
            message = "unknown field; allowed: " + ", ".join(sorted(fields))
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise SteeringError(message, _format_location(first["loc"], root)) from None
