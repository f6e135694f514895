"""The spec and its resolution: what a client sees when a spec is wrong, and what it means."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vllm_steer.core.plan import Gate, ModelShape, Op, ResolvedSteering
from vllm_steer.core.resolve import resolve
from vllm_steer.core.spec import SteeringError, encode_b64, parse_spec, vector_digest
from vllm_steer.vectors import VectorRegistry

SHAPE = ModelShape(num_layers=4, hidden_size=8, steerable_layers=(0, 1, 2, 3), max_directions=2)


@pytest.fixture
def registry() -> VectorRegistry:
    registry = VectorRegistry()
    registry.add("eiffel", np.arange(1, 9, dtype=np.float32))
    registry.add_feature(2, 74457, np.ones(8, dtype=np.float32), source="test")
    registry.add("happy", {1: np.full(8, 1.0, np.float32), 2: np.full(8, 2.0, np.float32)}, source="control vector")
    return registry


STEER = {"vectors": [{"name": "eiffel", "layers": [1]}]}


def vec(*values: float) -> list[float]:
    return list(values) + [0.0] * (8 - len(values))


@pytest.mark.parametrize(
    "spec, field, fragment",
    [
        ({}, "steering", "empty steering spec"),
        ({"vectors": []}, "steering", "empty steering spec"),
        ({"vectors": [{"vector": [1.0]}]}, "steering.vectors[0]", "'layers' is required for an inline vector"),
        ({"vectors": [{"name": "eiffel", "layers": []}]}, "steering.vectors[0].layers", "at least 1"),
        ({"vectors": [{"name": "eiffel", "layers": [-1]}]}, "steering.vectors[0].layers", "start at 0"),
        ({"vectors": [{"name": "eiffel", "layers": [1, 1]}]}, "steering.vectors[0].layers", "once"),
        ({"vectors": [{"layers": [1]}]}, "steering.vectors[0]", "exactly one of 'name', 'vector'"),
        ({"vectors": [{"name": "a", "vector": [1.0], "layers": [1]}]}, "steering.vectors[0]", "got name, vector"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "boost"}]}, "steering.vectors[0].mode", "'add', 'clamp', 'ablate', 'range' or 'feature_clamp'"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "colour": 1}]}, "steering.vectors[0].colour", "allowed: feature, layers, max, min, mode, name"),
        ({"vectors": [{"vector": [1.0, math.nan], "layers": [1]}]}, "steering.vectors[0].vector", "NaN or inf"),
        ({"vectors": [{"vector_b64": "!!!", "layers": [1]}]}, "steering.vectors[0].vector_b64", "not valid base64"),
        ({"vectors": [{"vector_b64": "AAA=", "layers": [1]}]}, "steering.vectors[0].vector_b64", "multiple of 4 bytes"),
        ({"vectors": [{"vector_b64": encode_b64(np.array([np.inf], np.float32)), "layers": [1]}]}, "steering.vectors[0].vector_b64", "NaN or inf"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "scale": math.inf}]}, "steering.vectors[0].scale", "finite"),
        ({"vectors": [{"name": "eiffel", "layers": [1]}], "scale": "big"}, "steering.scale", "valid number"),
        ({"vectors": [{"name": "eiffel", "layers": [1]}], "apply_to": "outputs"}, "steering.apply_to", "'all', 'prompt' or 'generated'"),
        ({"vectors": [{"name": "eiffel", "layers": [1]}], "clamp": True}, "steering", "apply to 'features' only"),
        ({"features": [[2, 74457]]}, "steering.features[0][2]", "Field required"),
        ({"features": [[-2, 74457, 0.1]]}, "steering.features", "non-negative"),
        ({"steer": True}, "steering.steer", "unknown field"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range"}]}, "steering.vectors[0]", "needs 'min', 'max' or both"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "min": 3, "max": 1}]}, "steering.vectors[0]", "'min' (3) is above 'max' (1)"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "max": 1, "scale": 2}]}, "steering.vectors[0]", "'scale' does not apply"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "clamp", "max": 1}]}, "steering.vectors[0]", "apply to mode 'range' only"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "min": math.inf}]}, "steering.vectors[0].min", "finite"),
        ({"vectors": [{"name": "eiffel", "layers": [1], "mode": "feature_clamp"}]}, "steering.vectors[0]", "give 'feature': [layer, feature_id]"),
        ({"vectors": [{"feature": [3, 7], "layers": [2]}]}, "steering.vectors[0]", "a feature steers its own layer (3)"),
        ({"vectors": [{"feature": [3, -7]}]}, "steering.vectors[0].feature", "non-negative"),
        ({"vectors": [{"feature": [3, 7], "name": "eiffel"}]}, "steering.vectors[0]", "got name, feature"),
        ({"vectors": [{"feature": [3, 7], "only_active": True}]}, "steering.vectors[0]", "'only_active' applies to mode 'feature_clamp' only"),
        ({**STEER, "condition": {"name": "eiffel", "threshold": 1}}, "steering.condition", "'layer' is required"),
        ({**STEER, "condition": {"name": "eiffel", "layer": 1}}, "steering.condition.threshold", "Field required"),
        ({**STEER, "condition": {"layer": 1, "threshold": 1}}, "steering.condition", "exactly one of 'name', 'vector'"),
        ({**STEER, "condition": {"name": "eiffel", "layer": 1, "threshold": math.nan}}, "steering.condition.threshold", "finite"),
        ({**STEER, "condition": {"name": "eiffel", "layer": 1, "threshold": 1, "compare": ">"}}, "steering.condition.compare", "'above' or 'below'"),
        ({**STEER, "condition": {"name": "eiffel", "layer": -1, "threshold": 1}}, "steering.condition.layer", "start at 0"),
        ({**STEER, "condition": {"feature": [2, 5], "layer": 1, "threshold": 1}}, "steering.condition", "read at its own layer (2)"),
        ({**STEER, "condition": {"name": "eiffel", "layer": 1, "threshold": 1, "min": 0}}, "steering.condition.min", "allowed: compare, feature, layer, name, threshold"),
        ({**STEER, "condition": {"name": "eiffel", "layer": 1, "threshold": 1}, "apply_to": "all"}, "steering.apply_to", "gates generated tokens only"),
    ],
)
def test_shape_errors_name_the_field(spec, field, fragment):
    with pytest.raises(SteeringError) as info:
        parse_spec(spec)
    assert info.value.field == field
    assert fragment in info.value.reason


@pytest.mark.parametrize(
    "spec, field, fragment",
    [
        ({"vectors": [{"name": "tower", "layers": [1]}]}, "steering.vectors[0].name", "unknown vector 'tower'; loaded: L2/F74457, eiffel, happy"),
        ({"vectors": [{"name": "eiffel", "layers": [4]}]}, "steering.vectors[0].layers[0]", "layer 4 is out of range: this model has layers 0-3"),
        ({"vectors": [{"name": "eiffel"}]}, "steering.vectors[0].layers", "required: 'eiffel' is one vector, usable at any layer you name"),
        ({"vectors": [{"name": "happy", "layers": [1, 3]}]}, "steering.vectors[0].layers[1]", "'happy' has directions for layers [1, 2], none for layer 3"),
        ({"vectors": [{"vector": [1.0, 2.0], "layers": [1]}]}, "steering.vectors[0].vector", "has 2 values; this model's hidden size is 8"),
        ({"vectors": [{"vector": vec(), "layers": [1], "mode": "clamp"}]}, "steering.vectors[0].vector", "all zeros"),
        ({"features": [[2, 1, 0.5]]}, "steering.features[0]", "no feature vector for (layer 2, feature 1)"),
        ({"features": [[9, 1, 0.5]]}, "steering.features[0]", "out of range"),
        (
            {"vectors": [{"vector": vec(1), "layers": [1], "mode": "clamp"}, {"vector": vec(0, 1), "layers": [1], "mode": "ablate"}, {"vector": vec(0, 0, 1), "layers": [1], "mode": "clamp"}]},
            "steering",
            "layer 1 has 3 clamp/ablate/range directions; this server allows at most 2 per layer",
        ),
        ({**STEER, "condition": {"name": "tower", "layer": 1, "threshold": 1}}, "steering.condition.name", "unknown vector 'tower'"),
        ({**STEER, "condition": {"name": "eiffel", "layer": 4, "threshold": 1}}, "steering.condition.layer", "layer 4 is out of range"),
        ({**STEER, "condition": {"name": "happy", "layer": 3, "threshold": 1}}, "steering.condition.layer", "'happy' has directions for layers [1, 2]"),
        ({**STEER, "condition": {"vector": [1.0], "layer": 1, "threshold": 1}}, "steering.condition.vector", "has 1 values"),
        ({**STEER, "condition": {"vector": vec(), "layer": 1, "threshold": 1}}, "steering.condition.vector", "all zeros"),
        ({**STEER, "condition": {"feature": [2, 74457], "threshold": 1}}, "steering.condition.feature", "no SAE is loaded for layer 2"),
    ],
)
def test_model_errors_name_the_field(spec, field, fragment, registry):
    with pytest.raises(SteeringError) as info:
        resolve(spec, SHAPE, registry)
    assert info.value.field == field
    assert fragment in info.value.reason, info.value.reason


def test_request_size_limit_counts_operations_and_names_the_setting(registry):
    shape = ModelShape(num_layers=4, hidden_size=8, steerable_layers=(0, 1, 2, 3), max_directions=2, max_request_ops=3)
    spec = {"vectors": [{"name": "eiffel", "layers": [1]}] * 3, "features": [[2, 74457, 1.0]]}
    with pytest.raises(SteeringError, match=r"4 steering operations; this server allows at most 3 per request. An operation is one vector or feature at one layer"):
        resolve(spec, shape, registry)
    # One layered vector over four layers is four operations: refused once, at resolution,
    # with the same message (it used to pass one count and fail a second one later).
    registry.add("control", {layer: np.full(8, layer + 1.0, np.float32) for layer in range(4)})
    with pytest.raises(SteeringError, match=r"4 steering operations.*a layered vector counts once per layer it steers \(hf_overrides steering.max_request_ops\)"):
        resolve({"vectors": [{"name": "control"}]}, shape, registry)
    assert len(resolve({"vectors": [{"name": "control", "layers": [0, 1, 2]}]}, shape, registry).ops) == 3


def test_layer_not_steerable_says_which_are(registry):
    shape = ModelShape(num_layers=4, hidden_size=8, steerable_layers=(2,), max_directions=2)
    with pytest.raises(SteeringError, match=r"layer 1 is not steerable on this server; steerable layers: \[2\]"):
        resolve({"vectors": [{"name": "eiffel", "layers": [1]}]}, shape, registry)


def test_json_text_and_dict_parse_alike():
    spec = {"vectors": [{"name": "eiffel", "layers": [1, 2], "scale": 2.0}], "apply_to": "prompt"}
    assert parse_spec(json.dumps(spec)) == parse_spec(spec)
    with pytest.raises(SteeringError, match="not valid JSON"):
        parse_spec("{vectors")
    with pytest.raises(SteeringError, match="must be a JSON object"):
        parse_spec("[1, 2]")


def test_ops_carry_combined_scale_and_order(registry):
    resolved = resolve(
        {
            "vectors": [
                {"name": "eiffel", "layers": [1, 3], "scale": 2.0},
                {"vector": vec(1), "layers": [1], "mode": "clamp", "scale": 4.0},
                {"vector": vec(0, 1), "layers": [1], "mode": "ablate", "scale": 9.0},
            ],
            "scale": 0.5,
        },
        SHAPE,
        registry,
    )
    eiffel = registry.digest_of("eiffel")
    assert resolved.ops == (
        Op(1, "add", eiffel, 1.0, False),
        Op(3, "add", eiffel, 1.0, False),
        Op(1, "clamp", vector_digest(np.array(vec(1), np.float32)), 2.0, True),
        Op(1, "ablate", vector_digest(np.array(vec(0, 1), np.float32)), 0.0, True),
    )


def test_notebook_features_use_reduced_strengths_by_default(registry):
    digest = registry.feature_digest(2, 74457)
    reduced = resolve({"features": [[2, 74457, 0.25]], "scale": 0.8, "clamp": True}, SHAPE, registry)
    assert reduced.ops == (Op(2, "clamp", digest, 0.8 * 0.25 * 2, True),)
    plain = resolve({"features": [[2, 74457, 0.25]], "reduced_strengths": False}, SHAPE, registry)
    assert plain.ops == (Op(2, "add", digest, 0.25, True),)


def test_scale_zero_add_resolves_to_nothing(registry):
    assert resolve({"vectors": [{"name": "eiffel", "layers": [1]}], "scale": 0}, SHAPE, registry) is None
    clamp_to_zero = resolve({"vectors": [{"name": "eiffel", "layers": [1], "mode": "clamp"}], "scale": 0}, SHAPE, registry)
    assert clamp_to_zero is not None and clamp_to_zero.ops[0].coeff == 0.0


def test_fingerprint_is_content_not_name(registry):
    spec = {"vectors": [{"name": "eiffel", "layers": [1]}]}
    before = resolve(spec, SHAPE, registry)
    inline = resolve({"vectors": [{"vector": np.arange(1, 9).tolist(), "layers": [1]}]}, SHAPE, registry)
    assert inline.fingerprint == before.fingerprint  # same floats, same steering
    registry.add("eiffel", np.arange(2, 10, dtype=np.float32), replace=True)
    after = resolve(spec, SHAPE, registry)
    assert after.fingerprint != before.fingerprint
    other_scale = resolve({"vectors": [{"name": "eiffel", "layers": [1], "scale": 2}]}, SHAPE, registry)
    assert other_scale.fingerprint != after.fingerprint


def test_wire_form_decodes_to_the_same_ops_and_vectors_after_the_name_moves(registry):
    resolved = resolve(
        {"vectors": [{"name": "eiffel", "layers": [1]}, {"vector": vec(3), "layers": [2], "mode": "clamp"}], "apply_to": "generated"},
        SHAPE,
        registry,
    )
    before = resolved.arrays(registry)
    registry.add("eiffel", np.ones(8, np.float32), replace=True)  # the name moves on
    again = ResolvedSteering.from_wire(resolved.wire)
    assert again == resolved and again.fingerprint == resolved.fingerprint
    assert again.inline.keys() == resolved.inline.keys()
    after = again.arrays(registry)  # the replaced content is retired, still held for this request
    assert after.keys() == before.keys() and all(after[d].tobytes() == before[d].tobytes() for d in before)


def test_replacing_needs_replace_and_keeps_old_content():
    registry = VectorRegistry()
    old = registry.add("v", np.ones(4, np.float32))
    with pytest.raises(ValueError, match="already exists; pass replace=True"):
        registry.add("v", np.zeros(4, np.float32))
    new = registry.add("v", np.full(4, 2, np.float32), replace=True)
    assert new != old and registry.digest_of("v") == new
    assert registry.array(old).tolist() == [1.0] * 4  # requests accepted before still get it
    assert registry.digest_of(old) is None  # but no new request can name the replaced content
    registry.remove("v")
    assert registry.digest_of("v") is None and registry.digest_of(new) is None


def test_registry_frees_content_no_name_references():
    registry = VectorRegistry(retired_limit=8)
    shared = np.ones(4, np.float32)
    registry.add("keep", shared)
    for index in range(500):
        registry.add(f"v{index % 3}", np.full(4, index, np.float32), replace=True)
        registry.add("twin", shared, replace=True)  # same content as "keep": held once
        if index % 2:
            registry.remove(f"v{index % 3}")
    sizes = registry.content_size()
    assert sizes["live"] <= 4 and sizes["retired"] <= 8, sizes
    registry.remove("twin")
    assert registry.digest_of("keep") is not None and registry.array(registry.digest_of("keep")).tolist() == [1.0] * 4


def test_features_read_on_demand_are_a_bounded_cache():
    class Source:
        layer, num_features, description = 1, 10_000, "test"

        def feature(self, feature_id):
            return np.full(4, feature_id + 1, np.float32)

    registry = VectorRegistry(on_demand_limit=16)
    registry.add_feature_source(Source())
    digests = [registry.feature_digest(1, feature_id) for feature_id in range(200)]
    assert registry.content_size()["on_demand"] == 16
    assert registry.array(digests[-1]).tolist() == [200.0] * 4
    assert registry.is_on_demand(digests[-1])
    assert registry.feature_digest(1, 0) == digests[0]  # read again once evicted


def test_layered_vector_steers_its_own_layers_with_their_own_directions(registry):
    one, two = registry.digest_of("happy", 1), registry.digest_of("happy", 2)
    assert one != two and registry.layers_of("happy") == (1, 2) and registry.layers_of("eiffel") is None
    every = resolve({"vectors": [{"name": "happy", "scale": 0.5}]}, SHAPE, registry)
    assert every.ops == (Op(1, "add", one, 0.5, False), Op(2, "add", two, 0.5, False))
    chosen = resolve({"vectors": [{"name": "happy", "layers": [2], "mode": "clamp"}]}, SHAPE, registry)
    assert chosen.ops == (Op(2, "clamp", two, 1.0, True),)
    info = registry.info("happy")
    assert (info.layers, info.dimension, info.norm) == ((1, 2), 8, pytest.approx(np.sqrt(32)))


def test_a_condition_travels_in_the_wire_form_and_changes_the_fingerprint(registry):
    plain = resolve(STEER, SHAPE, registry)
    gated = resolve({**STEER, "condition": {"name": "happy", "layer": 2, "threshold": 0.5, "compare": "below"}}, SHAPE, registry)
    assert gated.apply_to == "generated" and plain.apply_to == "all"
    assert gated.gate == Gate(2, registry.digest_of("happy", 2), True, 0.0, None, "below", 0.5)
    assert ResolvedSteering.from_wire(gated.wire) == gated
    other = resolve({**STEER, "condition": {"name": "happy", "layer": 2, "threshold": 0.6, "compare": "below"}}, SHAPE, registry)
    assert len({plain.fingerprint, gated.fingerprint, other.fingerprint}) == 3
    # Gates on one direction share their row, whatever the threshold.
    assert gated.rows == plain.rows | {gated.gate.row_key} and other.gate.row_key == gated.gate.row_key
    inline = resolve({**STEER, "condition": {"vector": vec(0, 3), "layer": 1, "threshold": 0.5}}, SHAPE, registry)
    assert set(inline.inline) == {inline.gate.digest}
    no_directions = ModelShape(num_layers=4, hidden_size=8, steerable_layers=(0, 1, 2, 3), max_directions=0)
    with pytest.raises(SteeringError, match="max_directions is 0"):
        resolve({**STEER, "condition": {"name": "eiffel", "layer": 1, "threshold": 1}}, no_directions, registry)
    pipeline = ModelShape(num_layers=4, hidden_size=8, steerable_layers=(0, 1, 2, 3), max_directions=2, pipeline_stages=2)
    with pytest.raises(SteeringError, match="pipeline parallelism"):
        resolve({**STEER, "condition": {"name": "eiffel", "layer": 1, "threshold": 1}}, pipeline, registry)


def test_range_ops_carry_their_bounds_through_the_wire(registry):
    eiffel = registry.digest_of("eiffel")
    spec = {"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "max": 2.5},
                        {"name": "eiffel", "layers": [2], "mode": "range", "min": -1.0, "max": 4.0}], "scale": 3.0}
    resolved = resolve(spec, SHAPE, registry)
    # Bounds are absolute: the spec's scale does not move them.
    assert resolved.ops == (Op(1, "range", eiffel, 0.0, True, (None, 2.5)), Op(2, "range", eiffel, 0.0, True, (-1.0, 4.0)))
    assert ResolvedSteering.from_wire(resolved.wire).ops == resolved.ops
    other = resolve({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "max": 2.0}]}, SHAPE, registry)
    assert other.fingerprint != resolve({"vectors": spec["vectors"][:1]}, SHAPE, registry).fingerprint
    with pytest.raises(SteeringError) as info:
        resolve({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "min": 1e39}]}, SHAPE, registry)
    assert info.value.field == "steering.vectors[0].min"
