"""Spec -> concrete operations on concrete vectors, checked against the model: once, at
the front end.

``resolve`` validates a spec against the model's shape and the front end's registry and
returns a ``ResolvedSteering`` (plan.py): every vector a ``sha256:`` digest (or inline bytes
for vectors no other process holds). Its wire form is what travels to the workers, which
only decode it: a re-registered name can never change a request already accepted, and no
check runs twice on two different forms.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from vllm_steer.core.plan import Gate, ModelShape, Op, ResolvedSteering
from vllm_steer.core.registry import VectorRegistry, feature_name
from vllm_steer.core.spec import FLOAT32_MAX, Condition, Mode, SteeringError, SteeringSpec, parse_spec, vector_digest


def resolve(spec_value, shape: ModelShape, registry: VectorRegistry) -> ResolvedSteering | None:
    """Validate against the model and registry. None when the spec changes nothing."""
    spec: SteeringSpec = parse_spec(spec_value)
    # Every entry steers at least one layer: refuse an oversized spec before expanding it.
    _check_op_count(len(spec.vectors) + len(spec.features), shape)
    ops: list[Op] = []
    inline: dict[str, np.ndarray] = {}

    for index, entry in enumerate(spec.vectors):
        where = f"steering.vectors[{index}]"
        needs_direction = entry.mode != "add" or entry.normalize
        # Ablation and ranges have no strength; a fixed coefficient keeps equal steering equal.
        # + 0.0: a -0.0 (a zero scale times a negative one) steers as 0.0 and must fingerprint as it.
        coeff = 0.0 if entry.mode in ("ablate", "range") else spec.scale * entry.scale + 0.0
        # A feature_clamp moves along the SAE's own decoder row, as the SAE would decode it.
        normalize = entry.normalize or entry.mode not in ("add", "feature_clamp")
        bounds = (entry.min, entry.max) if entry.mode == "range" else None
        for bound, name in zip(bounds or (), ("min", "max")):
            if bound is not None:
                _check_magnitude(bound, 1.0, shape, f"{where}.{name}")
        checked = None  # a layered entry's layers often share one vector: check it once
        for layer, layer_field, digest, vector_field in _entry_vectors(entry, registry, inline, where):
            check_layer(layer, shape, layer_field)
            if digest != checked:
                array = inline[digest] if digest in inline else registry.array(digest)
                _check_vector(array, needs_direction, shape, vector_field)
                _check_magnitude(coeff, 1.0 if normalize else float(np.abs(array).max()), shape, f"{where}.scale")
                checked = digest
            probe = _feature_probe(entry, registry, inline, shape, where) if entry.mode == "feature_clamp" else None
            ops.append(Op(layer, entry.mode, digest, coeff, normalize, bounds, probe, entry.only_active))

    mode: Mode = "clamp" if spec.use_clamp else "add"
    for index, (layer, feature_id, strength) in enumerate(spec.features):
        where = f"steering.features[{index}]"
        check_layer(layer, shape, where)
        digest = _feature_digest(layer, feature_id, registry, inline, where)
        _check_vector(registry.array(digest), True, shape, where)
        effective = strength * layer if spec.use_reduced_strengths else strength
        _check_magnitude(spec.scale * effective, 1.0, shape, where)
        ops.append(Op(layer, mode, digest, spec.scale * effective + 0.0, True))

    _check_op_count(len(ops), shape)
    directions = Counter(op.layer for op in ops if op.mode != "add")
    for layer, count in sorted(directions.items()):
        if count > shape.max_directions:
            raise SteeringError(
                f"layer {layer} has {count} clamp/ablate/range directions; this server allows at most "
                f"{shape.max_directions} per layer (hf_overrides steering.max_directions)"
            )

    # A condition is checked even when nothing else applies: a bad one is an error, not ignored.
    gate = _resolve_condition(spec.condition, shape, registry, inline) if spec.condition is not None else None
    # An add with coefficient 0 is exactly nothing: drop it, so `scale: 0` is unsteered.
    ops = [op for op in ops if op.mode != "add" or op.coeff != 0.0]
    if not ops:
        return None
    used = {digest for op in ops for digest in op.digests} | ({gate.digest} if gate else set())
    resolved = ResolvedSteering(tuple(ops), spec.phase, {d: a for d, a in inline.items() if d in used}, gate)
    _check_summed_adds(resolved, resolved.arrays(registry), shape)
    _check_rows(resolved, shape)
    return resolved


def _resolve_condition(condition: Condition, shape: ModelShape, registry: VectorRegistry, inline: dict[str, np.ndarray]) -> Gate:
    where = "steering.condition"
    if not shape.max_directions:
        raise SteeringError("a condition is read through a direction slot; this server has none "
                            "(hf_overrides steering.max_directions is 0)", where)
    if shape.pipeline_stages > 1:
        # Each stage judges its own layers; the others would steer without knowing the outcome.
        raise SteeringError("conditions are not supported with pipeline parallelism", where)
    layer = condition.at_layer
    layer_field = f"{where}.{'feature' if condition.feature is not None else 'layer'}"
    check_layer(layer, shape, layer_field)
    if condition.feature is not None:  # the feature's activation: its SAE's encoder row
        try:
            _, digest, offset, feature_threshold = registry.sae_feature(*condition.feature)
        except (KeyError, ValueError) as exc:
            raise SteeringError(f"feature {list(condition.feature)} has no usable encoder: {exc}", layer_field) from None
        inline[digest] = registry.array(digest)
        _check_vector(inline[digest], True, shape, layer_field)
        return Gate(layer, digest, False, offset, feature_threshold, condition.compare, condition.threshold)
    array = condition.inline_array()
    if array is not None:
        digest, vector_field = _inline_digest(condition, array, registry, inline, where)
    else:
        digest = registry.digest_of(condition.name, layer)
        vector_field = f"{where}.name"
        if digest is None:
            if registry.layers_of(condition.name) is not None:
                raise SteeringError(f"{condition.name!r} has directions for layers {list(registry.layers_of(condition.name))}, "
                                    f"none for layer {layer}", f"{where}.layer")
            raise SteeringError(_unknown_name(condition.name, registry), vector_field)
        array = registry.array(digest)
    _check_vector(array, True, shape, vector_field)
    return Gate(layer, digest, True, 0.0, None, condition.compare, condition.threshold)


def _inline_digest(source, array: np.ndarray, registry: VectorRegistry, inline: dict[str, np.ndarray], where: str) -> tuple[str, str]:
    """An inline direction's digest (carried with the request unless the registry holds the
    same content) and the field it came from."""
    digest = vector_digest(array)
    if registry.digest_of(digest) is None:
        inline[digest] = array
    return digest, f"{where}.{'vector' if source.vector is not None else 'vector_b64'}"


def _entry_vectors(entry, registry: VectorRegistry, inline: dict[str, np.ndarray], where: str):
    """(layer, its field, digest, the vector's field) for each layer an entry steers."""
    if entry.feature is not None:
        layer, feature_id = entry.feature
        if entry.mode == "feature_clamp":  # the SAE's own decoder row, with its encoder (_feature_probe)
            digest = _sae_feature(entry, registry, inline, f"{where}.feature")[0]
        else:
            digest = _feature_digest(layer, feature_id, registry, inline, f"{where}.feature")
        return [(layer, f"{where}.feature", digest, f"{where}.feature")]
    array = entry.inline_array()
    if array is not None:
        digest, field = _inline_digest(entry, array, registry, inline, where)
        return [(layer, f"{where}.layers[{i}]", digest, field) for i, layer in enumerate(entry.layers)]
    own_layers = registry.layers_of(entry.name)
    if registry.digest_of(entry.name) is None and own_layers is None:
        raise SteeringError(_unknown_name(entry.name, registry), f"{where}.name")
    if entry.layers is None and own_layers is None:
        raise SteeringError(f"required: {entry.name!r} is one vector, usable at any layer you name", f"{where}.layers")
    found = []
    for i, layer in enumerate(entry.layers or own_layers):
        layer_field = f"{where}.layers[{i}]" if entry.layers else f"{where}.name"
        digest = registry.digest_of(entry.name, layer)
        if digest is None:
            raise SteeringError(f"{entry.name!r} has directions for layers {list(own_layers)}, none for layer {layer}", layer_field)
        found.append((layer, layer_field, digest, f"{where}.name"))
    return found


def _feature_digest(layer: int, feature_id: int, registry: VectorRegistry, inline: dict[str, np.ndarray], where: str) -> str:
    """A feature's decoder direction (carried inline when read on demand: other processes may not hold it)."""
    try:
        digest = registry.feature_digest(layer, feature_id)
    except (KeyError, ValueError) as exc:  # an on-demand source with an unusable row
        raise SteeringError(f"feature ({layer}, {feature_id}) cannot be read: {exc}", where) from None
    if digest is None:
        raise SteeringError(_unknown_feature(layer, feature_id, registry), where)
    if registry.is_on_demand(digest):
        inline[digest] = registry.array(digest)
    return digest


def _sae_feature(entry, registry: VectorRegistry, inline: dict[str, np.ndarray], where: str) -> tuple[str, str, float, float]:
    """A feature of its layer's SAE (registry.sae_feature); both rows travel inline."""
    layer, feature_id = entry.feature
    try:
        found = registry.sae_feature(layer, feature_id)
    except (KeyError, ValueError) as exc:
        raise SteeringError(f"feature ({layer}, {feature_id}) has no usable encoder: {exc}", where) from None
    for digest in found[:2]:
        inline[digest] = registry.array(digest)
    return found


def _feature_probe(entry, registry: VectorRegistry, inline: dict[str, np.ndarray], shape: ModelShape, where: str) -> tuple[str, float, float]:
    """A feature_clamp's encoder: (row digest, offset, threshold)."""
    _, encoder, offset, threshold = _sae_feature(entry, registry, inline, f"{where}.feature")
    _check_vector(registry.array(encoder), True, shape, f"{where}.feature")
    return encoder, offset, threshold


def _check_op_count(count: int, shape: ModelShape) -> None:
    if count > shape.max_request_ops:
        raise SteeringError(
            f"{count} steering operations; this server allows at most {shape.max_request_ops} per request. "
            "An operation is one vector or feature at one layer: a layered vector counts once per layer it steers "
            "(hf_overrides steering.max_request_ops)"
        )


def check_layer(layer: int, shape: ModelShape, where: str) -> None:
    if not 0 <= layer < shape.num_layers:
        raise SteeringError(
            f"layer {layer} is out of range: this model has layers 0-{shape.num_layers - 1}", where
        )
    if layer not in shape.steerable_layers:
        raise SteeringError(
            f"layer {layer} is not steerable on this server; steerable layers: "
            f"{list(shape.steerable_layers)} (hf_overrides steering.layers)",
            where,
        )


def _check_vector(array: np.ndarray, needs_direction: bool, shape: ModelShape, where: str) -> None:
    if array.size != shape.hidden_size:
        raise SteeringError(
            f"vector has {array.size} values; this model's hidden size is {shape.hidden_size}", where
        )
    if needs_direction and not np.any(array):
        raise SteeringError("vector is all zeros, so it has no direction to clamp, ablate or normalize", where)


def _check_magnitude(coeff: float, largest: float, shape: ModelShape, where: str) -> None:
    """The steering must stay finite in the model's dtype (float16 ends at 65504): a scale that
    overflows would turn the stream into inf/NaN."""
    if not abs(coeff) * largest < min(shape.dtype_max, FLOAT32_MAX):
        raise SteeringError(f"scale {coeff:.4g} is too large: the steering would overflow {shape.dtype}", where)


def _check_summed_adds(resolved: ResolvedSteering, arrays: dict[str, np.ndarray], shape: ModelShape) -> None:
    """A layer's adds are summed into one row: that sum must fit the model's dtype too."""
    largest: Counter[int] = Counter()
    peak: dict[tuple[str, bool], float] = {}  # per vector (and normalization): its largest entry
    for op in resolved.ops:
        if op.mode == "add":
            if (op.digest, op.normalize) not in peak:
                array = arrays[op.digest]
                norm = float(np.linalg.norm(array.astype(np.float64))) if op.normalize else 1.0
                peak[op.digest, op.normalize] = float(np.abs(array).max()) / (norm or 1.0)
            largest[op.layer] += abs(op.coeff) * peak[op.digest, op.normalize]
    for layer, bound in sorted(largest.items()):
        if not bound < shape.dtype_max:
            raise SteeringError(f"the adds at layer {layer} together reach {bound:.4g}: the steering would overflow {shape.dtype}", "steering.scale")


def _check_rows(resolved: ResolvedSteering, shape: ModelShape) -> None:
    """A request whose own rows exceed the whole pool would wait for capacity forever."""
    needed = len(resolved.rows)
    if shape.table_rows is not None and needed > shape.table_rows - 1:
        raise SteeringError(
            f"this steering needs {needed} table rows (one per layer it steers, one for a condition); this server's steering table "
            f"budget holds {shape.table_rows - 1} (hf_overrides steering.table_budget_mib)"
        )


def _listing(items: list[str], limit: int = 10) -> str:
    if not items:
        return "none are loaded"
    shown = ", ".join(items[:limit])
    return f"loaded: {shown}" + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _unknown_name(name: str, registry: VectorRegistry) -> str:
    return f"unknown vector {name!r}; {_listing(registry.names())}"


def _unknown_feature(layer: int, feature_id: int, registry: VectorRegistry) -> str:
    held = [f"[{layer_}, {fid}]" for layer_, fid in registry.features()]
    held += [f"layer {s.layer}: features 0-{s.num_features - 1} ({s.description})" for s in registry.feature_sources()]
    return (
        f"no feature vector for (layer {layer}, feature {feature_id}) = {feature_name(layer, feature_id)}; "
        f"{_listing(held)}"
    )
