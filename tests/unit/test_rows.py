"""The steering rows (vllm_steer/core/rows.py): the table layout every reader shares, the
memory budget in rows, what a request's steering at one layer becomes as a row, and the
pool that shares rows by content. How the runtime admits requests through the pool, and a
row's newest content after a free before the flush, are in test_runtime.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_steer.core.plan import Gate, Op, ResolvedSteering, unit
from vllm_steer.core.rows import (
    PARAM_NAMES, PARAMS, Direction, LayerRow, PoolFull, RowPool, budget_rows, build_gate_row, build_row, entry_width,
    projection_bounds, row_bytes, split_entry, stack_rows, worst_case_rows,
)
from vllm_steer.core.spec import vector_digest

HIDDEN = 6
RNG = np.random.default_rng(11)
A, B, C, ENC = (RNG.standard_normal(HIDDEN).astype(np.float32) for _ in range(4))
DA, DB, DC, DENC = (vector_digest(v) for v in (A, B, C, ENC))
VECTORS = {DA: A, DB: B, DC: C, DENC: ENC}
INF = math.inf


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy())


# ---- the layout -------------------------------------------------------------------------------
def test_a_direction_entry_is_edit_probe_then_the_params_in_order():
    assert PARAM_NAMES == ("lo", "hi", "offset", "threshold", "floor") and PARAMS == 5
    assert entry_width(HIDDEN) == 2 * HIDDEN + 5 and entry_width(4096) == 8197
    entries = torch.arange(3 * entry_width(HIDDEN), dtype=torch.float32).reshape(3, entry_width(HIDDEN))
    edit, probe, *params = split_entry(entries, HIDDEN)
    assert edit.shape == probe.shape == (3, HIDDEN) and len(params) == 5 and all(p.shape == (3, 1) for p in params)
    assert torch.equal(edit[1], entries[1, :HIDDEN]) and torch.equal(probe[1], entries[1, HIDDEN:2 * HIDDEN])
    for index, param in enumerate(params):
        assert torch.equal(param[:, 0], entries[:, 2 * HIDDEN + index])
    # Views, not copies: one gather of the entry reads them all.
    probe[2, 0] = -1.0
    assert entries[2, HIDDEN] == -1.0


def test_row_bytes_and_the_rows_a_budget_holds():
    assert row_bytes(HIDDEN, 0) == 4 * (HIDDEN + 1)
    assert row_bytes(4096, 4) == 4 * (4096 + 4 * 8197 + 1)
    one = row_bytes(HIDDEN, 2)
    assert budget_rows(10 * one, HIDDEN, 2) == 10 and budget_rows(10 * one + one - 1, HIDDEN, 2) == 10
    assert budget_rows(2 * one, HIDDEN, 2) == 2  # row 0 and one steering row
    with pytest.raises(ValueError) as info:
        budget_rows(2 * one - 1, HIDDEN, 2)
    message = str(info.value)
    assert "steering.table_budget_mib" in message and "holds no steering row" in message
    assert f"one row takes {one} bytes at hidden size {HIDDEN} and max_directions 2" in message


@pytest.mark.parametrize("requests, layers, max_directions, rows", [
    (1, 4, 2, 6),  # row 0, a row per layer, one for a condition
    (8, 32, 4, 1 + 8 * 33),
    (8, 32, 0, 1 + 8 * 32),  # no directions: no condition either
    (0, 32, 4, 1),
])
def test_worst_case_rows(requests, layers, max_directions, rows):
    assert worst_case_rows(requests, layers, max_directions) == rows


@pytest.mark.parametrize("mode, coeff, bounds, expected", [
    ("clamp", 2.5, None, (2.5, 2.5)),
    ("clamp", -1.0, None, (-1.0, -1.0)),
    ("ablate", 0.0, None, (0.0, 0.0)),
    ("ablate", 7.0, None, (0.0, 0.0)),  # an ablation holds the component at 0, whatever its coefficient
    ("range", 0.0, (-1.0, 2.0), (-1.0, 2.0)),
    ("range", 0.0, (None, 2.0), (-INF, 2.0)),
    ("range", 0.0, (-1.0, None), (-1.0, INF)),
])
def test_projection_bounds(mode, coeff, bounds, expected):
    assert projection_bounds(mode, coeff, bounds) == expected


# ---- a request's row ---------------------------------------------------------------------------
def test_a_row_sums_the_layers_adds_and_keeps_its_directions_in_order():
    ops = (
        Op(1, "add", DA, 2.0, False),
        Op(1, "clamp", DB, 3.0, True),
        Op(2, "add", DC, 100.0, False),  # another layer: not in this row
        Op(1, "add", DC, -0.5, True),
        Op(1, "range", DA, 0.0, True, (None, 1.5)),
        Op(1, "feature_clamp", DC, 4.0, False, probe=(DENC, -0.25, 0.75), only_active=True),
        Op(1, "ablate", DC, 0.0, True),
    )
    row = build_row(ResolvedSteering(ops, "all"), 1, VECTORS, HIDDEN)
    assert torch.equal(row.add, torch.zeros(HIDDEN) + 2.0 * t(A) + -0.5 * unit(t(C)))
    assert [(d.lo, d.hi, d.offset, d.threshold, d.feature, d.only_active) for d in row.directions] == [
        (3.0, 3.0, 0.0, 0.0, False, False),
        (-INF, 1.5, 0.0, 0.0, False, False),
        (4.0, 4.0, -0.25, 0.75, True, True),
        (0.0, 0.0, 0.0, 0.0, False, False),
    ]
    clamp, ranged, feature, ablate = row.directions
    # A clamp/ablate/range reads and moves along one unit direction.
    for direction, vector in ((clamp, B), (ranged, A), (ablate, C)):
        assert torch.equal(direction.edit, unit(t(vector))) and torch.equal(direction.probe, direction.edit)
    # A feature_clamp moves along its raw decoder row and reads its encoder row.
    assert torch.equal(feature.edit, t(C)) and torch.equal(feature.probe, t(ENC))
    assert feature.params() == [4.0, 4.0, -0.25, 0.75, 0.0]
    assert clamp.params() == [3.0, 3.0, 0.0, -INF, -INF]  # every token, and the projection as it is
    assert ranged.params() == [-INF, 1.5, 0.0, -INF, -INF]
    other = build_row(ResolvedSteering(ops, "all"), 2, VECTORS, HIDDEN)
    assert torch.equal(other.add, 100.0 * t(C)) and other.directions == []
    empty = build_row(ResolvedSteering(ops, "all"), 3, VECTORS, HIDDEN)
    assert not empty.add.any() and empty.directions == []


def test_a_feature_clamp_without_only_active_changes_every_token():
    op = Op(1, "feature_clamp", DC, 4.0, False, probe=(DENC, 0.5, 0.0))
    [direction] = build_row(ResolvedSteering((op,), "all"), 1, VECTORS, HIDDEN).directions
    assert direction.params() == [4.0, 4.0, 0.5, 0.0, -INF]


def test_build_row_does_not_write_into_the_vectors():
    vectors = {digest: array.copy() for digest, array in VECTORS.items()}
    row = build_row(ResolvedSteering((Op(1, "add", DA, 2.0, False),), "all"), 1, vectors, HIDDEN)
    row.add += 1.0
    assert vectors[DA].tobytes() == A.tobytes()


@pytest.mark.parametrize("gate, probe, params", [
    (Gate(1, DB, True, 0.0, None, "above", 5.0), unit(t(B)), [-INF, INF, 0.0, -INF, -INF]),
    (Gate(1, DENC, False, -0.5, 0.25, "below", 5.0), t(ENC), [-INF, INF, -0.5, 0.25, -INF]),
    (Gate(1, DENC, False, 1.0, 0.0, "above", 0.0), t(ENC), [-INF, INF, 1.0, 0.0, -INF]),  # a ReLU feature: threshold 0 counts
])
def test_a_gate_row_only_reads(gate, probe, params):
    row = build_gate_row(gate, VECTORS, HIDDEN)
    assert not row.add.any() and len(row.directions) == 1
    [direction] = row.directions
    assert not direction.edit.any() and torch.equal(direction.probe, probe)
    assert direction.params() == params


# ---- stacking ------------------------------------------------------------------------------------
def direction(seed: float, **kwargs) -> Direction:
    return Direction(torch.full((HIDDEN,), seed), torch.full((HIDDEN,), -seed), **{"lo": seed, "hi": seed + 1, **kwargs})


def test_stacked_rows_put_each_direction_at_its_index_and_zero_the_rest():
    rows = [
        LayerRow(torch.full((HIDDEN,), 1.0)),
        LayerRow(torch.full((HIDDEN,), 2.0), [direction(10.0), direction(11.0, offset=0.5)]),
        LayerRow(torch.full((HIDDEN,), 3.0), [direction(20.0, threshold=0.25, feature=True, only_active=True)]),
    ]
    adds, dirs, counts = stack_rows(rows, 3, HIDDEN)
    assert adds.shape == (3, HIDDEN) and dirs.shape == (3, 3, entry_width(HIDDEN)) and counts.dtype == torch.int32
    assert counts.tolist() == [0, 2, 1] and adds[:, 0].tolist() == [1.0, 2.0, 3.0]
    for k, n, source in ((0, 1, rows[1].directions[0]), (1, 1, rows[1].directions[1]), (0, 2, rows[2].directions[0])):
        edit, probe, *params = split_entry(dirs[k, n], HIDDEN)
        assert torch.equal(edit, source.edit) and torch.equal(probe, source.probe)
        assert [p.item() for p in params] == source.params()
    # Unused directions are zero: a row's k-th direction beyond its count reads as nothing.
    assert not dirs[:, 0].any() and not dirs[1:, 2].any() and not dirs[2].any()


def test_stacking_with_no_directions_keeps_the_adds():
    adds, dirs, counts = stack_rows([LayerRow(torch.ones(HIDDEN)), LayerRow(torch.zeros(HIDDEN))], 0, HIDDEN)
    assert dirs.shape == (0, 2, entry_width(HIDDEN)) and counts.tolist() == [0, 0] and torch.equal(adds[0], torch.ones(HIDDEN))


# ---- the pool ------------------------------------------------------------------------------------
def content(value: float, *directions: Direction) -> LayerRow:
    return LayerRow(torch.full((HIDDEN,), value), list(directions))


def test_the_pool_starts_empty_with_row_zero_reserved():
    pool = RowPool(4, HIDDEN, 2)
    assert pool.capacity == 3 and pool.in_use == 0
    assert pool.add.shape == (4, HIDDEN) and pool.dirs.shape == (2, 4, entry_width(HIDDEN)) and pool.count.shape == (4,)
    assert pool.direction_index.tolist() == [[0], [1]]
    rows = pool.acquire(["a", "b", "c"], {"a": content(1.0), "b": content(2.0), "c": content(3.0)})
    assert sorted(rows.values()) == [1, 2, 3]  # never row 0
    pool.flush()
    assert not pool.add[0].any() and not pool.dirs[:, 0].any() and pool.count[0] == 0


def test_acquire_shares_a_row_by_key_and_writes_it_once_at_flush():
    pool = RowPool(4, HIDDEN, 2)
    first = pool.acquire(["a", "b"], {"a": content(1.0, direction(5.0)), "b": content(2.0)})
    assert first["a"] != first["b"] and pool.in_use == 2
    assert not pool.add.any() and not pool.count.any()  # staged, not written before the step
    # A held key needs no content: the second request shares the row.
    second = pool.acquire(["a"], {})
    assert second == {"a": first["a"]} and pool.in_use == 2 and pool.held("a")
    pool.flush()
    assert torch.equal(pool.add[first["a"]], torch.ones(HIDDEN)) and torch.equal(pool.add[first["b"]], torch.full((HIDDEN,), 2.0))
    assert pool.count[first["a"]] == 1 and pool.count[first["b"]] == 0
    edit, probe, *params = split_entry(pool.dirs[0, first["a"]], HIDDEN)
    assert torch.equal(edit, torch.full((HIDDEN,), 5.0)) and [p.item() for p in params] == direction(5.0).params()
    # The row stays while any user holds it.
    pool.release(["a"])
    assert pool.held("a") and pool.in_use == 2
    pool.release(["a"])
    assert not pool.held("a") and pool.in_use == 1


def test_a_full_pool_refuses_the_whole_acquire_and_changes_nothing():
    pool = RowPool(3, HIDDEN, 1)  # two usable rows
    held = pool.acquire(["a"], {"a": content(1.0)})
    with pytest.raises(PoolFull, match="2 new steering rows needed, 1 of 2 free"):
        pool.acquire(["a", "b", "c"], {"b": content(2.0), "c": content(3.0)})
    assert pool.in_use == 1 and not pool.held("b") and not pool.held("c")
    # "a" got no extra user from the refused call: one release frees it.
    pool.release(["a"])
    assert not pool.held("a") and pool.in_use == 0
    # Keys already held cost nothing: with one row free, one new key and a held one fit.
    pool.acquire(["x"], {"x": content(4.0)})
    rows = pool.acquire(["x", "y"], {"y": content(5.0)})
    assert pool.in_use == 2 and set(rows) == {"x", "y"}
    assert held["a"] in rows.values()  # the freed row was reused


def test_an_acquire_missing_a_new_rows_content_changes_nothing():
    pool = RowPool(4, HIDDEN, 1)
    with pytest.raises(KeyError, match="no content for the new steering rows"):
        pool.acquire(["a", "b"], {"a": content(1.0)})
    assert pool.in_use == 0 and not pool.held("a")


def test_a_released_row_is_reused_and_rewritten_with_its_new_content():
    pool = RowPool(2, HIDDEN, 1)  # one usable row
    row = pool.acquire(["a"], {"a": content(1.0, direction(3.0))})["a"]
    pool.flush()
    pool.release(["a"])
    assert pool.acquire(["b"], {"b": content(2.0)})["b"] == row
    pool.flush()
    # All of the row is the new content: its add, its count, and no direction of the old one read.
    assert torch.equal(pool.add[row], torch.full((HIDDEN,), 2.0)) and pool.count[row] == 0
    assert not pool.dirs[:, row].any()


def test_flush_writes_each_staged_row_once_in_one_copy_per_table(monkeypatch):
    import vllm_steer.core.rows as rows

    pool = RowPool(5, HIDDEN, 1)
    pool.acquire(["a", "b"], {"a": content(1.0), "b": content(2.0)})
    pool.acquire(["c"], {"c": content(3.0)})
    stacked = []
    original = rows.stack_rows
    monkeypatch.setattr(rows, "stack_rows", lambda *args: stacked.append(len(args[0])) or original(*args))
    pool.flush()
    pool.flush()  # nothing staged: nothing written
    assert stacked == [3]
    assert sorted(pool.add[1:4, 0].tolist()) == [1.0, 2.0, 3.0] and not pool.add[4].any()


def test_release_of_a_set_of_keys_counts_each_key_once():
    pool = RowPool(3, HIDDEN, 1)
    pool.acquire(["a", "a"], {"a": content(1.0)})  # one request, one user
    pool.release(["a", "a"])
    assert not pool.held("a") and pool.in_use == 0
