"""The layer math (vllm_steer/core/layer.py ``steer``) against a float64 reference written
here from the formula, on tables built by the row pool (rows.py): adds first, then each
direction in order, ``x += (clip(a, lo, hi) - a) * edit`` with ``a = <x, probe> + offset``
(an SAE feature's ``a`` is 0 unless above its threshold; ``only_active`` changes only tokens
where ``a > 0``). Unsteered tokens keep their residual bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vllm_steer.core.layer import make_steerable, steer
from vllm_steer.core.rows import Direction, LayerRow, RowPool

HIDDEN, K = 24, 3
INF = math.inf


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """torch.testing.assert_close's rule, without its import cost (seconds on a loaded machine)."""
    got, expected = got.double(), expected.double()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    excess = (got - expected).abs() - (atol + rtol * expected.abs())
    assert (excess <= 0).all(), f"off by up to {float(excess.max()):.3g} beyond the tolerance at {torch.nonzero(excess > 0).tolist()[:5]}"


def vector(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def clamp(seed: int, target: float) -> Direction:
    d = unit(vector(seed))
    return Direction(d, d, target, target)


def ranged(seed: int, lo: float, hi: float) -> Direction:
    d = unit(vector(seed))
    return Direction(d, d, lo, hi)


def feature(seed: int, target: float, offset: float, threshold: float, only_active: bool = False) -> Direction:
    return Direction(vector(seed, 0.5), unit(vector(seed + 100)), target, target, offset, threshold, True, only_active)


# Row contents, by key: each is one request's steering at one layer.
ROWS = {
    "add": LayerRow(vector(1, 0.7)),
    "clamp": LayerRow(torch.zeros(HIDDEN), [clamp(2, 3.0)]),
    "add then two": LayerRow(vector(3, 0.4), [clamp(4, -2.0), ranged(5, -0.5, 0.5)]),
    "three directions": LayerRow(torch.zeros(HIDDEN), [ranged(6, 1.0, INF), clamp(7, 0.0), ranged(8, -INF, -1.0)]),
    "feature": LayerRow(torch.zeros(HIDDEN), [feature(9, 2.0, 0.3, 0.5)]),
    "feature only active": LayerRow(vector(10, 0.2), [feature(11, -1.0, -0.2, 0.0, only_active=True)]),
    "reads only": LayerRow(torch.zeros(HIDDEN), [Direction(torch.zeros(HIDDEN), unit(vector(12)), -INF, INF)]),
    "nothing": LayerRow(torch.zeros(HIDDEN)),
}


@pytest.fixture(scope="module")
def pool() -> RowPool:
    pool = RowPool(len(ROWS) + 2, HIDDEN, K)
    pool.rows = pool.acquire(list(ROWS), ROWS)  # key -> its row
    pool.flush()
    return pool


def row_of(pool: RowPool, key: str) -> int:
    return pool.rows[key]


def reference(hidden: torch.Tensor, residual: torch.Tensor, rows: list[LayerRow | None],
              seen: set | None = None) -> tuple[torch.Tensor, list[float]]:
    """The steered stream (float64) of each token and its first direction's reading, from
    the Direction objects themselves (not the tables). ``seen`` collects which branches ran."""
    seen = set() if seen is None else seen
    out, readings = [], []
    for h, r, row in zip(hidden.double(), residual.double(), rows):
        x = h + r
        reading = 0.0
        if row is not None:
            x = x + row.add.double()
            for k, d in enumerate(row.directions):
                s = float(x @ d.probe.double()) + d.offset
                if d.feature:
                    assert abs(s - d.threshold) > 1e-4, "test data too close to a feature's threshold"
                    seen.add("feature fires" if s > d.threshold else "feature silent")
                a = s if (not d.feature or s > d.threshold) else 0.0
                if k == 0:
                    reading = a
                if d.only_active and not a > 0:
                    seen.add("inactive token left alone")
                    continue
                moved = min(max(a, d.lo), d.hi) - a
                seen.add(("binds" if moved else "holds") + (" (range)" if d.lo != d.hi else ""))
                x = x + moved * d.edit.double()
        out.append(x)
        readings.append(reading)
    return torch.stack(out), readings


def batch(keys: list[str | None], seed: int = 0, dtype=torch.float32, scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(len(keys), HIDDEN, generator=generator)).to(dtype)
    residual = (scale * torch.randn(len(keys), HIDDEN, generator=generator)).to(dtype)
    return hidden, residual


def token_rows(pool: RowPool, keys: list[str | None], extra: int = 3) -> torch.Tensor:
    """The per-token row index, longer than the batch as the shared buffer is (its tail is stale)."""
    rows = [0 if key is None else row_of(pool, key) for key in keys]
    return torch.tensor(rows + [row_of(pool, "clamp")] * extra)


KEYS = [None, "add", "clamp", "add then two", None, "three directions", "feature", "feature only active",
        "reads only", "nothing", "clamp", "feature", "add then two", "feature only active"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_rows_in_one_call_match_the_formula(pool, seed):
    hidden, residual = batch(KEYS, seed)
    before = residual.clone()
    new = steer(hidden, residual, token_rows(pool, KEYS), pool.add, pool.dirs, pool.count)
    expected, _ = reference(hidden, residual, [None if key is None else ROWS[key] for key in KEYS])
    assert new.dtype == residual.dtype and new.shape == residual.shape
    assert_close((hidden.double() + new.double()), expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(residual, before)  # a new tensor: the input is left as it was
    for index, key in enumerate(KEYS):
        if key in (None, "nothing", "reads only"):
            assert torch.equal(new[index], residual[index]), key  # bit for bit


def test_the_data_exercises_every_branch(pool):
    """The cases above mean something: clamps bind, ranges bind on some tokens and hold on
    others, features fire on some tokens and not on others."""
    seen = set()
    for seed in (0, 1, 2):
        reference(*batch(KEYS, seed), [None if key is None else ROWS[key] for key in KEYS], seen)
    assert seen == {"feature fires", "feature silent", "inactive token left alone", "binds", "binds (range)", "holds (range)"}


def test_clamped_tokens_land_on_their_target(pool):
    keys = ["clamp"] * 5
    hidden, residual = batch(keys, 3)
    new = steer(hidden, residual, token_rows(pool, keys), pool.add, pool.dirs, pool.count)
    d = ROWS["clamp"].directions[0].probe
    assert_close((hidden + new) @ d, torch.full((5,), 3.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_zero_and_rows_that_change_nothing_keep_the_residual_bit_for_bit(pool, dtype):
    keys = [None, "nothing", "reads only", None, "three directions", "nothing"]
    hidden, residual = batch(keys, 4, dtype)
    new = steer(hidden, residual, token_rows(pool, keys), pool.add, pool.dirs, pool.count)
    assert new.dtype == dtype
    for index in (0, 1, 2, 3, 5):
        assert torch.equal(new[index].view(torch.int16 if dtype != torch.float32 else torch.int32),
                           residual[index].view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert not torch.equal(new[4], residual[4])  # the steered token did change


def test_a_range_that_holds_the_component_already_changes_nothing(pool):
    """A range changes only tokens outside it: inside, the residual is exact."""
    d = ROWS["three directions"].directions
    # A stream whose components satisfy all three: 2 >= 1 on the first, 0 on the second, -3 <= -1 on the third.
    probes = torch.stack([x.probe for x in d]).double()
    stream = probes.T @ torch.linalg.solve(probes @ probes.T, torch.tensor([2.0, 0.0, -3.0], dtype=torch.float64))
    residual = stream.float().unsqueeze(0)
    new = steer(torch.zeros(1, HIDDEN), residual, token_rows(pool, ["three directions"]), pool.add, pool.dirs, pool.count)
    assert_close(new, residual, atol=1e-6, rtol=0)


def test_directions_beyond_a_rows_count_are_not_read():
    pool = RowPool(3, HIDDEN, 2)
    pool.acquire(["one"], {"one": LayerRow(torch.zeros(HIDDEN), [clamp(2, 3.0)])})
    pool.flush()
    row = pool._row_of["one"]  # noqa: SLF001
    pool.dirs[1, row] = pool.dirs[0, row]  # a stale second direction, as if left by an old row
    pool.dirs[1, row, 2 * HIDDEN:2 * HIDDEN + 2] = 10.0  # clamp it to 10
    hidden, residual = batch(["one"] * 3, 5)
    new = steer(hidden, residual, torch.tensor([row] * 3), pool.add, pool.dirs, pool.count)
    assert_close((hidden + new) @ clamp(2, 3.0).probe, torch.full((3,), 3.0), atol=1e-5, rtol=0)


def test_without_directions_only_the_adds_apply():
    pool = RowPool(3, HIDDEN, 0)
    pool.acquire(["a"], {"a": LayerRow(vector(1, 0.7))})
    pool.flush()
    row = pool._row_of["a"]  # noqa: SLF001
    hidden, residual = batch([None, "a", "a"], 6, torch.bfloat16)
    new = steer(hidden, residual, torch.tensor([0, row, row]), pool.add, pool.dirs, pool.count)
    assert torch.equal(new[0], residual[0])
    expected = (residual[1:].float() + vector(1, 0.7)).to(torch.bfloat16)
    assert torch.equal(new[1:], expected)


def test_the_first_directions_reading_is_summed_per_slot(pool):
    keys = ["feature", "feature", "reads only", "reads only", "clamp", None, "add", "add then two", "feature"]
    slots = [1, 1, 2, 2, 3, 0, 4, 5, 6]
    hidden, residual = batch(keys, 7)
    gate_sum = torch.zeros(8)
    token_slot = torch.tensor(slots + [7, 7])  # a stale tail: not read
    steer(hidden, residual, token_rows(pool, keys), pool.add, pool.dirs, pool.count, token_slot=token_slot, gate_sum=gate_sum)
    _, readings = reference(hidden, residual, [None if key is None else ROWS[key] for key in keys])
    expected = torch.zeros(8, dtype=torch.float64)
    for slot, reading in zip(slots, readings):
        expected[slot] += reading
    assert_close(gate_sum[1:].double(), expected[1:], atol=1e-4, rtol=1e-5)
    assert gate_sum[4] == 0.0 and gate_sum[7] == 0.0  # adds only: nothing read; the stale tail: nothing
    # The reading is the stream's before the direction moves it (a clamp's is not its target).
    assert abs(readings[4] - 3.0) > 0.1
    # Readings accumulate across calls (one per prefill chunk).
    steer(hidden, residual, token_rows(pool, keys), pool.add, pool.dirs, pool.count, token_slot=token_slot, gate_sum=gate_sum)
    assert_close(gate_sum[1:].double(), 2 * expected[1:], atol=2e-4, rtol=1e-5)


def test_nothing_is_read_without_both_slot_and_sum(pool):
    keys = ["reads only"] * 2
    hidden, residual = batch(keys, 8)
    gate_sum = torch.zeros(4)
    steer(hidden, residual, token_rows(pool, keys), pool.add, pool.dirs, pool.count, gate_sum=gate_sum)
    assert not gate_sum.any()


def test_a_steerable_module_reads_the_pool_it_is_attached_to(pool):
    layer = make_steerable(nn.Module())
    assert layer.max_directions is None  # not steerable until attached
    token_row = torch.zeros(len(KEYS) + 3, dtype=torch.int64)
    token_slot = torch.zeros_like(token_row)
    gate_sum = torch.zeros(4)
    layer.attach_steering(token_row, pool, token_slot=token_slot, gate_sum=gate_sum)
    assert layer.max_directions == K
    # The runtime writes the shared buffers in place; the layer reads them at the next call.
    token_row.copy_(token_rows(pool, KEYS))
    token_slot[: len(KEYS)] = torch.tensor([1 if key == "feature" else 2 if key == "reads only" else 0 for key in KEYS])
    hidden, residual = batch(KEYS, 9)
    got = layer.steer(hidden, residual)
    expected_sum = torch.zeros(4)
    expected = steer(hidden, residual, token_row, pool.add, pool.dirs, pool.count, token_slot=token_slot, gate_sum=expected_sum)
    assert torch.equal(got, expected)
    assert torch.equal(layer.gate_sum, expected_sum) and layer.gate_sum is gate_sum and gate_sum[1:3].any()
    # The pool's tables are shared, not copied: a row the pool writes later is what the layer reads.
    assert layer.steer_add.data_ptr() == pool.add.data_ptr() and layer.steer_dirs.data_ptr() == pool.dirs.data_ptr()
    # Steering buffers are not part of the layer's weights.
    assert layer.state_dict() == {}


def test_a_module_made_steerable_twice_keeps_its_class():
    layer = make_steerable(nn.Linear(2, 2))
    cls = type(layer)
    assert make_steerable(layer) is layer and type(layer) is cls and isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}  # parameter names unchanged
