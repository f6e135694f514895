"""Resolution (vllm_steer/core/resolve.py): what each entry of a spec becomes, checked against
the model's shape and the registry. The spec's shape errors, the basic op forms and the
fingerprint are in test_spec.py; here, resolve's own rules: normalization by mode, the
SAE feature forms, what is dropped and what travels inline, magnitude and row limits, and
the errors that name their field."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_steer.core.plan import Gate, ModelShape, Op, ResolvedSteering
from vllm_steer.core.registry import VectorRegistry
from vllm_steer.core.resolve import resolve
from vllm_steer.core.spec import SteeringError, vector_digest

HIDDEN = 8
SHAPE = ModelShape(num_layers=4, hidden_size=HIDDEN, steerable_layers=(0, 1, 2, 3), max_directions=2)
EIFFEL = np.arange(1, HIDDEN + 1, dtype=np.float32)  # largest entry 8, norm sqrt(204)
SAE_LAYER = 2


def shape(**changes) -> ModelShape:
    return ModelShape(**{**SHAPE.__dict__, **changes})


def vec(*values: float) -> list[float]:
    return list(values) + [0.0] * (HIDDEN - len(values))


class Sae:
    """An SAE of layer 2 read on demand: decoder row f is ``f + 1`` everywhere but entry 0
    (so it differs from a loaded feature vector of the same id), encoder row f is ``e_{f % 8}``."""

    layer, num_features, d_model, description = SAE_LAYER, 16, HIDDEN, "test SAE"

    def feature(self, feature_id: int) -> np.ndarray:
        if not 0 <= feature_id < self.num_features:
            raise KeyError(feature_id)
        row = np.full(HIDDEN, feature_id + 1.0, np.float32)
        row[0] = -1.0
        return row

    def encoder(self, feature_id: int):
        if not 0 <= feature_id < self.num_features:
            raise KeyError(feature_id)
        row = np.zeros(HIDDEN, np.float32)
        row[feature_id % HIDDEN] = 2.0
        return SimpleNamespace(row=row, offset=-0.5 * feature_id, threshold=0.25 * feature_id)


@pytest.fixture
def registry() -> VectorRegistry:
    registry = VectorRegistry()
    registry.add("eiffel", EIFFEL)
    registry.add("happy", {1: np.full(HIDDEN, 1.0, np.float32), 3: np.full(HIDDEN, 3.0, np.float32)}, source="control vector")
    registry.add_feature(1, 7, np.linspace(-1, 1, HIDDEN, dtype=np.float32), source="test")
    registry.add_feature(SAE_LAYER, 5, np.ones(HIDDEN, np.float32), source="test")  # loaded: wins for the add forms
    registry.add_feature_source(Sae())
    return registry


def refused(spec, registry, model: ModelShape = SHAPE) -> SteeringError:
    with pytest.raises(SteeringError) as info:
        resolve(spec, model, registry)
    return info.value


# ---- what each entry becomes ------------------------------------------------------------------
@pytest.mark.parametrize("entry, normalize, coeff", [
    ({"mode": "add"}, False, 3.0),  # an add moves by the raw vector times its scale
    ({"mode": "add", "normalize": True}, True, 3.0),
    ({"mode": "clamp"}, True, 3.0),  # a clamp's target is on the unit direction
    ({"mode": "clamp", "normalize": True}, True, 3.0),
    ({"mode": "ablate"}, True, 0.0),  # no strength: a fixed coefficient keeps equal steering equal
    ({"mode": "range", "min": -1.0}, True, 0.0),
])
def test_each_mode_normalizes_as_documented_and_multiplies_the_scales(registry, entry, normalize, coeff):
    scale = 1.5 if entry["mode"] != "range" else 1.0
    resolved = resolve({"vectors": [{"name": "eiffel", "layers": [2], "scale": 2.0 if entry["mode"] != "range" else 1.0, **entry}],
                        "scale": scale}, SHAPE, registry)
    [op] = resolved.ops
    assert (op.layer, op.mode, op.digest, op.normalize) == (2, entry["mode"], vector_digest(EIFFEL), normalize)
    assert op.coeff == (coeff if entry["mode"] != "range" else 0.0)
    assert op.bounds == ((-1.0, None) if entry["mode"] == "range" else None)
    assert resolved.inline == {}  # a registered vector travels by digest


def test_an_add_of_a_feature_uses_its_decoder_direction_at_its_own_layer(registry):
    loaded = resolve({"vectors": [{"feature": [1, 7], "scale": 2.0}]}, SHAPE, registry)
    assert loaded.ops == (Op(1, "add", registry.feature_digest(1, 7), 2.0, False),)
    assert loaded.inline == {}  # every process loaded it
    on_demand = resolve({"vectors": [{"feature": [SAE_LAYER, 9], "mode": "clamp", "scale": 4.0}]}, SHAPE, registry)
    [op] = on_demand.ops
    assert (op.layer, op.mode, op.coeff, op.normalize) == (SAE_LAYER, "clamp", 4.0, True)
    # Read on demand here: other processes may not hold it, so it travels inline.
    assert on_demand.inline.keys() == {op.digest} and on_demand.inline[op.digest].tobytes() == Sae().feature(9).tobytes()


def test_a_feature_clamp_moves_along_the_saes_own_decoder_row_and_reads_its_encoder(registry):
    resolved = resolve({"vectors": [{"feature": [SAE_LAYER, 5], "mode": "feature_clamp", "scale": 3.0, "only_active": True}],
                        "scale": 0.5}, SHAPE, registry)
    [op] = resolved.ops
    decoder, encoder = vector_digest(Sae().feature(5)), vector_digest(Sae().encoder(5).row)
    # The SAE's row, not the feature vector loaded under the same (layer, id); not normalized.
    assert op.digest == decoder != registry.feature_digest(SAE_LAYER, 5)
    assert (op.layer, op.mode, op.coeff, op.normalize, op.only_active) == (SAE_LAYER, "feature_clamp", 1.5, False, True)
    assert op.probe == (encoder, -2.5, 1.25) and op.bounds is None
    assert resolved.inline.keys() == {decoder, encoder}  # both rows travel with the request
    assert ResolvedSteering.from_wire(resolved.wire) == resolved


def test_a_feature_clamp_needs_an_sae_at_the_features_layer(registry):
    error = refused({"vectors": [{"feature": [1, 7], "mode": "feature_clamp"}]}, registry)
    assert error.field == "steering.vectors[0].feature" and "no SAE is loaded for layer 1" in error.reason
    error = refused({"vectors": [{"feature": [SAE_LAYER, 99], "mode": "feature_clamp"}]}, registry)
    assert error.field == "steering.vectors[0].feature" and "has no usable encoder" in error.reason


def test_notebook_features_normalize_and_scale_by_their_layer(registry):
    digest = registry.feature_digest(1, 7)
    resolved = resolve({"features": [[1, 7, 0.5], [SAE_LAYER, 5, -2.0]], "scale": 3.0}, SHAPE, registry)
    assert resolved.ops == (Op(1, "add", digest, 3.0 * 0.5 * 1, True),
                            Op(SAE_LAYER, "add", registry.feature_digest(SAE_LAYER, 5), 3.0 * -2.0 * SAE_LAYER, True))
    # Reduced strengths at layer 0 are zero: such an add is nothing, and is dropped.
    registry.add_feature(0, 1, np.ones(HIDDEN, np.float32), source="test")
    assert resolve({"features": [[0, 1, 5.0]]}, SHAPE, registry) is None
    assert resolve({"features": [[0, 1, 5.0]], "reduced_strengths": False}, SHAPE, registry).ops[0].coeff == 5.0
    clamped = resolve({"features": [[0, 1, 5.0]], "clamp": True}, SHAPE, registry)
    assert clamped.ops == (Op(0, "clamp", registry.feature_digest(0, 1), 0.0, True),)  # a clamp to 0 is kept


def test_vector_entries_come_before_feature_rows(registry):
    resolved = resolve({"features": [[1, 7, 1.0]], "vectors": [{"name": "eiffel", "layers": [1]}]}, SHAPE, registry)
    assert [op.digest for op in resolved.ops] == [vector_digest(EIFFEL), registry.feature_digest(1, 7)]


def test_zero_adds_are_dropped_and_their_inline_vectors_not_carried(registry):
    spec = {"vectors": [{"vector": vec(1, 2), "layers": [1], "scale": 0.0},
                        {"vector": vec(0, 0, 3), "layers": [2], "mode": "clamp", "scale": 0.0},
                        {"vector": vec(4), "layers": [3], "scale": 2.0}]}
    resolved = resolve(spec, SHAPE, registry)
    kept_clamp, kept_add = (vector_digest(np.array(v, np.float32)) for v in (vec(0, 0, 3), vec(4)))
    assert resolved.ops == (Op(2, "clamp", kept_clamp, 0.0, True), Op(3, "add", kept_add, 2.0, False))
    assert resolved.inline.keys() == {kept_clamp, kept_add}
    assert resolve({"vectors": [{"vector": vec(1), "layers": [1, 2], "scale": 0.0}]}, SHAPE, registry) is None


def test_an_inline_vector_equal_to_a_registered_one_travels_by_digest(registry):
    resolved = resolve({"vectors": [{"vector": EIFFEL.tolist(), "layers": [1]}, {"vector": vec(1), "layers": [1]}]}, SHAPE, registry)
    assert resolved.inline.keys() == {vector_digest(np.array(vec(1), np.float32))}


def test_a_zero_vector_adds_nothing_but_has_no_direction(registry):
    assert resolve({"vectors": [{"vector": vec(), "layers": [1]}]}, SHAPE, registry).ops[0].normalize is False
    for entry in ({"normalize": True}, {"mode": "ablate"}, {"mode": "range", "max": 1.0}):
        error = refused({"vectors": [{"vector": vec(), "layers": [1], **entry}]}, registry)
        assert error.field == "steering.vectors[0].vector" and "all zeros" in error.reason


def test_layered_vectors_and_the_default_phase(registry):
    resolved = resolve({"vectors": [{"name": "happy", "mode": "ablate"}]}, SHAPE, registry)
    assert [(op.layer, op.digest) for op in resolved.ops] == [(1, registry.digest_of("happy", 1)), (3, registry.digest_of("happy", 3))]
    assert resolved.apply_to == "all" and resolved.gate is None
    # A layered vector's own layers must be steerable too: the error names the entry's name.
    error = refused({"vectors": [{"name": "happy"}]}, registry, shape(steerable_layers=(0, 1, 2)))
    assert error.field == "steering.vectors[0].name" and "layer 3 is not steerable" in error.reason


# ---- errors that name their field ---------------------------------------------------------------
def test_a_later_layer_out_of_range_names_its_position(registry):
    error = refused({"vectors": [{"name": "eiffel", "layers": [0, 4]}]}, registry)
    assert error.field == "steering.vectors[0].layers[1]" and "layer 4 is out of range: this model has layers 0-3" in error.reason
    error = refused({"vectors": [{"name": "eiffel", "layers": [0]}, {"vector": vec(1), "layers": [2, 0, 1]}]}, registry,
                    shape(steerable_layers=(0, 2)))
    assert error.field == "steering.vectors[1].layers[2]" and "layer 1 is not steerable on this server; steerable layers: [0, 2]" in error.reason
    error = refused({"features": [[1, 7, 1.0], [5, 1, 1.0]]}, registry)
    assert error.field == "steering.features[1]" and "out of range" in error.reason


def test_unknown_names_list_what_is_loaded():
    empty = VectorRegistry()
    error = refused({"vectors": [{"name": "tower", "layers": [1]}]}, empty)
    assert error.field == "steering.vectors[0].name" and error.reason == "unknown vector 'tower'; none are loaded"
    many = VectorRegistry()
    for index in range(12):
        many.add(f"v{index:02d}", np.ones(HIDDEN, np.float32) * (index + 1))
    error = refused({"vectors": [{"name": "tower", "layers": [1]}]}, many)
    assert "loaded: v00, v01, v02, v03, v04, v05, v06, v07, v08, v09 ... (12 in all)" in error.reason
    assert "v10" not in error.reason


def test_an_unknown_feature_lists_loaded_features_and_sae_ranges(registry):
    error = refused({"features": [[SAE_LAYER, 40, 1.0]]}, registry)
    assert error.field == "steering.features[0]"
    assert "no feature vector for (layer 2, feature 40) = L2/F40" in error.reason
    assert "[1, 7], [2, 5], layer 2: features 0-15 (test SAE)" in error.reason


def test_too_many_directions_count_per_layer_and_not_adds(registry):
    clamp = {"name": "eiffel", "mode": "clamp"}
    # Two directions at each of two layers, and adds anywhere: within max_directions 2.
    assert len(resolve({"vectors": [{**clamp, "layers": [1, 2]}, {**clamp, "layers": [1, 2], "scale": 2.0},
                                    {"name": "eiffel", "layers": [1]}, {"name": "happy"}]}, SHAPE, registry).ops) == 7
    error = refused({"vectors": [{**clamp, "layers": [2]}, {"feature": [SAE_LAYER, 3], "mode": "feature_clamp"},
                                 {"name": "eiffel", "layers": [2], "mode": "range", "max": 1.0}]}, registry)
    assert error.field == "steering" and "layer 2 has 3 clamp/ablate/range directions" in error.reason
    error = refused({"vectors": [clamp | {"layers": [1]}]}, registry, shape(max_directions=0))
    assert "at most 0 per layer" in error.reason


def test_too_many_ops_count_layers_and_features(registry):
    small = shape(max_request_ops=3)
    assert len(resolve({"vectors": [{"name": "eiffel", "layers": [0, 1]}], "features": [[1, 7, 1.0]]}, SHAPE, registry).ops) == 3
    error = refused({"vectors": [{"name": "eiffel", "layers": [0, 1, 2]}], "features": [[1, 7, 1.0]]}, registry, small)
    assert error.field == "steering" and "4 steering operations; this server allows at most 3" in error.reason


# ---- what the model's dtype can hold --------------------------------------------------------------
def test_a_scale_that_would_overflow_float16_is_refused_there(registry):
    big = {"vectors": [{"name": "eiffel", "layers": [1], "scale": 10_000.0}]}  # raw vector: up to 80000
    assert resolve(big, SHAPE, registry) is not None  # fits float32
    error = refused(big, registry, shape(dtype="float16"))
    assert error.field == "steering.vectors[0].scale" and "the steering would overflow float16" in error.reason
    # Normalized, the same scale moves by at most 10000.
    assert resolve({"vectors": [{**big["vectors"][0], "normalize": True}]}, shape(dtype="float16"), registry) is not None
    assert resolve(big, shape(dtype="bfloat16"), registry) is not None  # bfloat16 reaches 3.4e38
    error = refused({"vectors": [{"name": "eiffel", "layers": [1], "mode": "clamp"}], "scale": 70_000.0}, registry, shape(dtype="float16"))
    assert error.field == "steering.vectors[0].scale"
    error = refused({"vectors": [{"name": "eiffel", "layers": [1], "mode": "range", "max": 7e4}]}, registry, shape(dtype="float16"))
    assert error.field == "steering.vectors[0].max"
    error = refused({"features": [[1, 7, 40_000.0]], "reduced_strengths": False, "scale": 2.0}, registry, shape(dtype="float16"))
    assert error.field == "steering.features[0]" and "overflow float16" in error.reason


def test_adds_summed_into_one_row_must_fit_together(registry):
    half = {"vector": vec(1), "normalize": True, "scale": 40_000.0}  # moves one entry by 40000
    fp16 = shape(dtype="float16")
    assert resolve({"vectors": [{**half, "layers": [1]}, {**half, "layers": [2]}]}, fp16, registry) is not None  # two rows
    error = refused({"vectors": [{**half, "layers": [1]}, {**half, "layers": [1, 2]}]}, registry, fp16)
    assert error.field == "steering.scale" and "the adds at layer 1 together reach" in error.reason
    # Opposite signs still count at full size: a layer's adds are bounded by their magnitudes.
    error = refused({"vectors": [{**half, "layers": [1]}, {**half, "layers": [1], "scale": -40_000.0}]}, registry, fp16)
    assert "the adds at layer 1" in error.reason


# ---- rows and conditions -----------------------------------------------------------------------------
def test_steering_that_needs_more_rows_than_the_pool_holds_is_refused(registry):
    pool = shape(table_rows=3)  # rows 1 and 2 usable
    assert len(resolve({"vectors": [{"name": "eiffel", "layers": [0, 1, 2, 3]}]}, SHAPE, registry).rows) == 1  # steered alike
    assert resolve({"vectors": [{"name": "eiffel", "layers": [0, 1, 2, 3]}]}, pool, registry) is not None
    assert resolve({"vectors": [{"name": "happy"}]}, pool, registry) is not None  # two distinct rows
    error = refused({"vectors": [{"name": "happy"}, {"name": "eiffel", "layers": [2]}]}, registry, pool)
    assert error.field == "steering" and "needs 3 table rows" in error.reason and "budget holds 2" in error.reason
    gated = {"vectors": [{"name": "happy"}], "condition": {"name": "eiffel", "layer": 2, "threshold": 0.0}}
    assert "needs 3 table rows" in refused(gated, registry, pool).reason  # the condition reads through a row of its own


def test_a_vector_condition_reads_a_unit_direction(registry):
    resolved = resolve({"vectors": [{"name": "eiffel", "layers": [1]}],
                        "condition": {"vector": vec(0, 5), "layer": 3, "threshold": 2.0, "compare": "below"}}, SHAPE, registry)
    digest = vector_digest(np.array(vec(0, 5), np.float32))
    assert resolved.gate == Gate(3, digest, True, 0.0, None, "below", 2.0)
    assert resolved.apply_to == "generated" and digest in resolved.inline
    named = resolve({"vectors": [{"name": "eiffel", "layers": [1]}], "condition": {"name": "happy", "layer": 3, "threshold": 1.0}},
                    SHAPE, registry)
    assert named.gate == Gate(3, registry.digest_of("happy", 3), True, 0.0, None, "above", 1.0) and named.inline == {}


def test_a_feature_condition_reads_the_saes_encoder_at_the_features_layer(registry):
    resolved = resolve({"vectors": [{"name": "eiffel", "layers": [1]}],
                        "condition": {"feature": [SAE_LAYER, 6], "threshold": 0.5}}, SHAPE, registry)
    encoder = vector_digest(Sae().encoder(6).row)
    # Not normalized: the feature's pre-activation, counted above its own threshold.
    assert resolved.gate == Gate(SAE_LAYER, encoder, False, -3.0, 1.5, "above", 0.5)
    assert resolved.inline.keys() == {encoder}
    error = refused({"vectors": [{"name": "eiffel", "layers": [1]}], "condition": {"feature": [SAE_LAYER, 6], "threshold": 0.5}},
                    registry, shape(steerable_layers=(1,)))
    assert error.field == "steering.condition.feature" and "not steerable" in error.reason


def test_a_condition_on_steering_that_changes_nothing_is_nothing(registry):
    spec = {"vectors": [{"name": "eiffel", "layers": [1], "scale": 0.0}], "condition": {"name": "happy", "layer": 1, "threshold": 0.0}}
    assert resolve(spec, SHAPE, registry) is None


def test_a_bad_condition_is_an_error_even_when_the_steering_adds_nothing(registry):
    """Without it, a spec whose adds are all zero returned unsteered before its condition was read."""
    spec = {"vectors": [{"name": "eiffel", "layers": [1], "scale": 0.0}],
            "condition": {"name": "nope", "layer": 1, "threshold": 0.0}}
    error = refused(spec, registry)
    assert error.field == "steering.condition.name" and "unknown vector 'nope'" in error.reason
    spec["condition"] = {"name": "eiffel", "layer": 9, "threshold": 0.0}
    assert refused(spec, registry).field == "steering.condition.layer"
    spec["condition"]["layer"] = 1
    assert resolve(spec, SHAPE, registry) is None  # a good condition over nothing: unsteered


def test_a_negative_zero_coefficient_fingerprints_as_zero(registry):
    """A clamp to 0 reached by a negative spec scale steers as a clamp to 0: same cache namespace."""
    clamp = {"name": "eiffel", "layers": [1], "mode": "clamp", "scale": 0.0}
    negative = resolve({"vectors": [clamp], "scale": -1.0}, SHAPE, registry)
    positive = resolve({"vectors": [clamp], "scale": 1.0}, SHAPE, registry)
    assert negative.fingerprint == positive.fingerprint and negative.row_keys == positive.row_keys
