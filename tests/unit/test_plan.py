"""The shared plan types (vllm_steer/core/plan.py): what travels from the front end to the
workers (the wire form), what names a steering by content (canonical form, fingerprint,
cache namespace) and which pool rows a request holds (row keys)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vllm_steer.core.plan import Gate, Op, ResolvedSteering, unit
from vllm_steer.core.registry import VectorRegistry
from vllm_steer.core.spec import encode_b64, vector_digest

HIDDEN = 6
RNG = np.random.default_rng(3)
NAMED = RNG.standard_normal(HIDDEN).astype(np.float32)
INLINE = RNG.standard_normal(HIDDEN).astype(np.float32)
ENCODER = RNG.standard_normal(HIDDEN).astype(np.float32)
GATE_VECTOR = RNG.standard_normal(HIDDEN).astype(np.float32)
D_NAMED, D_INLINE, D_ENCODER, D_GATE = (vector_digest(a) for a in (NAMED, INLINE, ENCODER, GATE_VECTOR))

ADD = Op(1, "add", D_NAMED, 2.5, False)
CLAMP = Op(1, "clamp", D_INLINE, -3.0, True)
RANGE = Op(2, "range", D_NAMED, 0.0, True, (None, 2.5))
FEATURE = Op(3, "feature_clamp", D_INLINE, 4.0, False, probe=(D_ENCODER, -0.25, 0.5), only_active=True)
GATE = Gate(1, D_GATE, True, 0.0, None, "below", 0.75)


def steering(ops=(ADD, CLAMP, RANGE, FEATURE), apply_to="all", gate=GATE, inline=None) -> ResolvedSteering:
    if inline is None:
        inline = {D_INLINE: INLINE.copy(), D_ENCODER: ENCODER.copy()}
    return ResolvedSteering(tuple(ops), apply_to, inline, gate)


def rebuilt(resolved: ResolvedSteering) -> ResolvedSteering:
    """A new object from the decoded fields: its forms are computed afresh, not handed on."""
    return ResolvedSteering(resolved.ops, resolved.apply_to, dict(resolved.inline), resolved.gate)


# ---- the wire form --------------------------------------------------------------------------
@pytest.mark.parametrize("apply_to", ["all", "prompt", "generated"])
@pytest.mark.parametrize("gate", [None, GATE, Gate(3, D_ENCODER, False, -0.25, 0.5, "above", -1.0)], ids=["no gate", "vector gate", "feature gate"])
def test_the_wire_form_decodes_to_the_same_steering(apply_to, gate):
    sent = steering(apply_to=apply_to, gate=gate)
    got = ResolvedSteering.from_wire(sent.wire)
    assert got.ops == sent.ops and got.gate == sent.gate and got.apply_to == apply_to
    assert got == sent and got.fingerprint == sent.fingerprint
    assert got.inline.keys() == sent.inline.keys()
    for digest, array in sent.inline.items():
        assert got.inline[digest].dtype == np.float32 and got.inline[digest].tobytes() == array.tobytes()
    # Nothing is lost on the way: what the worker decoded encodes to the very same text.
    again = rebuilt(got)
    assert again.wire == sent.wire and again.fingerprint == sent.fingerprint and again.canonical == sent.canonical
    assert got.row_keys == sent.row_keys and got.rows == sent.rows


def test_the_wire_form_is_json_with_the_fingerprint_and_base64_inline_vectors():
    sent = steering()
    body = json.loads(sent.wire)
    assert body["fingerprint"] == sent.fingerprint
    assert set(body["inline"]) == {D_INLINE, D_ENCODER}
    assert body["apply_to"] == "all" and len(body["ops"]) == 4 and body["condition"] == GATE.as_list()
    assert "condition" not in json.loads(steering(gate=None).wire)


# ---- canonical form and fingerprint: content only ---------------------------------------------
def test_equal_content_gives_equal_fingerprints():
    first, second = steering(), steering(ops=[dataclasses.replace(op) for op in (ADD, CLAMP, RANGE, FEATURE)])
    assert first is not second and first.fingerprint == second.fingerprint and first.canonical == second.canonical
    # Inline vectors travel with the request but are named by digest: they are not in the
    # canonical form, so the same content carried inline or held by the registry is one steering.
    held = steering(inline={})
    assert held.fingerprint == first.fingerprint
    assert encode_b64(INLINE) not in first.canonical and encode_b64(INLINE) in first.wire


@pytest.mark.parametrize("change", [
    "coeff", "digest", "normalize", "layer", "bounds", "probe", "only_active", "apply_to",
    "gate threshold", "gate compare", "no gate", "op order",
])
def test_any_change_of_content_changes_the_fingerprint(change):
    ops = [ADD, CLAMP, RANGE, FEATURE]
    apply_to, gate = "all", GATE
    if change == "coeff":
        ops[1] = dataclasses.replace(CLAMP, coeff=-3.0001)
    elif change == "digest":
        ops[0] = dataclasses.replace(ADD, digest=D_GATE)
    elif change == "normalize":
        ops[0] = dataclasses.replace(ADD, normalize=True)
    elif change == "layer":
        ops[0] = dataclasses.replace(ADD, layer=2)
    elif change == "bounds":
        ops[2] = dataclasses.replace(RANGE, bounds=(None, 2.0))
    elif change == "probe":
        ops[3] = dataclasses.replace(FEATURE, probe=(D_ENCODER, -0.25, 0.6))
    elif change == "only_active":
        ops[3] = dataclasses.replace(FEATURE, only_active=False)
    elif change == "apply_to":
        apply_to = "generated"
    elif change == "gate threshold":
        gate = dataclasses.replace(GATE, threshold=0.8)
    elif change == "gate compare":
        gate = dataclasses.replace(GATE, compare="above")
    elif change == "no gate":
        gate = None
    elif change == "op order":  # two directions at one layer act one after the other
        ops = [ADD, dataclasses.replace(RANGE, layer=1), CLAMP, FEATURE]
        assert steering(ops=[ADD, CLAMP, dataclasses.replace(RANGE, layer=1), FEATURE]).fingerprint != steering(ops=ops).fingerprint
        return
    changed = steering(ops=ops, apply_to=apply_to, gate=gate)
    assert changed.fingerprint != steering().fingerprint
    assert changed.canonical != steering().canonical


def test_the_cache_namespace_depends_on_the_prompt_length_only_for_phase_limited_steering():
    everywhere = steering(gate=None)
    assert everywhere.cache_namespace(3) == everywhere.cache_namespace(300) == everywhere.fingerprint
    for apply_to in ("prompt", "generated"):
        limited = steering(apply_to=apply_to, gate=None)
        assert limited.cache_namespace(3) != limited.cache_namespace(4)
        assert limited.cache_namespace(3) == limited.cache_namespace(3)
        assert limited.cache_namespace(3) != everywhere.cache_namespace(3)


# ---- rows -----------------------------------------------------------------------------------------
def test_requests_with_equal_steering_at_a_layer_share_its_row_key():
    one = steering(ops=[ADD, CLAMP, RANGE], gate=None)
    other = steering(ops=[ADD, CLAMP, dataclasses.replace(RANGE, bounds=(-1.0, 1.0))], gate=None)
    assert set(one.row_keys) == {1, 2}
    assert one.row_keys[1] == other.row_keys[1] and one.row_keys[2] != other.row_keys[2]
    assert one.rows & other.rows == {one.row_keys[1]}
    # A layer's key holds its ops in order; the layer number is not part of it.
    swapped = steering(ops=[CLAMP, ADD], gate=None)
    assert swapped.row_keys[1] != one.row_keys[1]
    moved = steering(ops=[dataclasses.replace(ADD, layer=3), dataclasses.replace(CLAMP, layer=3), RANGE], gate=None)
    assert moved.row_keys[3] == one.row_keys[1] and moved.rows == one.rows
    # Layers steered alike hold one row between them.
    alike = steering(ops=[ADD, dataclasses.replace(ADD, layer=2)], gate=None)
    assert len(alike.row_keys) == 2 and len(alike.rows) == 1


def test_a_gate_adds_one_row_whatever_its_threshold_or_comparison():
    plain = steering(gate=None)
    gated = steering()
    assert gated.rows == plain.rows | {GATE.row_key} and len(gated.rows) == len(plain.rows) + 1
    for other in (dataclasses.replace(GATE, threshold=-5.0), dataclasses.replace(GATE, compare="above")):
        assert other.row_key == GATE.row_key and steering(gate=other).rows == gated.rows
    # What the row reads does change it.
    for other in (dataclasses.replace(GATE, digest=D_NAMED), dataclasses.replace(GATE, normalize=False),
                  dataclasses.replace(GATE, offset=0.5), dataclasses.replace(GATE, feature_threshold=0.1)):
        assert other.row_key != GATE.row_key
    # A gate reading the same content as a steering row is still a row of its own.
    assert GATE.row_key not in plain.rows


# ---- the list forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [ADD, CLAMP, RANGE, FEATURE, Op(0, "range", D_NAMED, 0.0, True, (-1.5, None)),
                                Op(0, "feature_clamp", D_NAMED, 0.0, False, probe=(D_ENCODER, 0.0, 0.0))],
                         ids=["add", "clamp", "range max", "feature only_active", "range min", "feature"])
def test_op_list_form_round_trips(op):
    listed = op.as_list()
    assert Op.from_list(json.loads(json.dumps(listed))) == op
    assert listed[:5] == [op.layer, op.mode, op.digest, op.coeff, op.normalize]
    extras = listed[5] if len(listed) > 5 else {}
    assert extras.get("bounds") == op.bounds and extras.get("probe") == op.probe
    assert extras.get("only_active", False) == op.only_active
    # What a mode does not have is left out (the plain forms stay five fields).
    assert (len(listed) == 5) == (op.bounds is None and op.probe is None and not op.only_active)


def test_op_digests_include_a_feature_clamps_encoder_row():
    assert ADD.digests == (D_NAMED,) and FEATURE.digests == (D_INLINE, D_ENCODER)


@pytest.mark.parametrize("gate", [GATE, Gate(2, D_ENCODER, False, -0.25, 0.5, "above", 1e-3), Gate(0, D_GATE, False, 1.0, 0.0, "below", -2.0)])
def test_gate_list_form_round_trips(gate):
    assert Gate.from_list(json.loads(json.dumps(gate.as_list()))) == gate


# ---- vectors -------------------------------------------------------------------------------------
def test_arrays_take_inline_vectors_first_then_the_registry():
    registry = VectorRegistry()
    registry.add("named", NAMED)
    registry.add("gate", GATE_VECTOR)
    registry.add("shadow", INLINE + 1)  # another content: the inline vector is found by its own digest
    arrays = steering().arrays(registry)
    assert set(arrays) == {D_NAMED, D_INLINE, D_ENCODER, D_GATE}  # directions, encoder rows, the gate's
    for digest, array in ((D_NAMED, NAMED), (D_INLINE, INLINE), (D_ENCODER, ENCODER), (D_GATE, GATE_VECTOR)):
        assert arrays[digest].tobytes() == array.tobytes()
    with pytest.raises(KeyError):
        steering(inline={}).arrays(registry)  # the encoder row is held nowhere


@pytest.mark.parametrize("values", [[3.0, 4.0], [1e-13, 0.0], [0.0, 0.0], [-2.5, 1e-6, 7.0]])
def test_unit_is_the_notebooks_normalization_exactly(values):
    vector = torch.tensor(values, dtype=torch.float32)
    expected = vector / (torch.linalg.vector_norm(vector) + 1e-12)
    got = unit(vector)
    assert torch.equal(got, expected) and torch.isfinite(got).all()
    if values == [3.0, 4.0]:
        torch.testing.assert_close(got, torch.tensor([0.6, 0.8]))
    if values == [1e-13, 0.0]:  # the epsilon matters for tiny vectors: not a unit vector
        assert got[0].item() == pytest.approx(1e-13 / (1e-13 + 1e-12), rel=1e-5)
