"""Worker-side logic on constructed inputs: slot rows, the layer math, and both per-step
writers (V1 by request id, V2 by stable request index), without starting an engine."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vllm_steer.core.layer import make_steerable
from vllm_steer.lab.reference import layer_ops, phase_mask, steer_stream
from vllm_steer.core.plan import ModelShape, Op, ResolvedSteering, unit
from vllm_steer.core.resolve import resolve
from vllm_steer.core.rows import LayerRow, RowPool
from vllm_steer.engine.writers import V2SlotWriter, release_v1, write_v1
from vllm_steer.core.runtime import SteeringRuntime
from vllm_steer.vectors import VectorRegistry

HIDDEN, LAYERS, SLOTS = 16, 3, 5
SHAPE = ModelShape(num_layers=LAYERS, hidden_size=HIDDEN, steerable_layers=(0, 1, 2), max_directions=2)


def Layer() -> nn.Module:  # noqa: N802 - stands for the class of a steerable decoder layer
    """The steering half of a steerable layer, without vLLM's attention and MLP."""
    return make_steerable(nn.Module())


def make_registry() -> VectorRegistry:
    generator = torch.Generator().manual_seed(0)
    registry = VectorRegistry()
    for name in ("a", "b", "c"):
        registry.add(name, torch.randn(HIDDEN, generator=generator).numpy())
    return registry


# The front end's registry: requests are resolved against it, as the front end would.
FRONT_REGISTRY = make_registry()


@pytest.fixture
def runtime() -> SteeringRuntime:
    layers = {index: Layer() for index in range(LAYERS)}
    return SteeringRuntime(SHAPE, make_registry(), layers, num_slots=SLOTS, max_tokens=32, capture=True)


def params(spec=None, capture=None):
    """A request's ``extra_args`` as the front end hands them on: the resolved wire form."""
    extra = {}
    if spec is not None:
        extra["steering"] = resolve(spec, SHAPE, FRONT_REGISTRY).wire
    if capture is not None:
        extra["steering_capture"] = json.dumps(capture)
    return extra or None


def sampling(spec=None, capture=None):
    """vLLM's sampling params carrying them."""
    return SimpleNamespace(extra_args=params(spec, capture))


def reference_stream(stream: torch.Tensor, spec, registry, layer: int, positions, prompt_len: int) -> torch.Tensor:
    """The notebook's hook, op by op, on a stream of tokens of one request."""
    resolved = resolve(spec, SHAPE, registry)
    prepared = layer_ops(resolved, layer, resolved.arrays(registry), stream.dtype)
    return steer_stream(stream, prepared, phase_mask(positions, resolved.apply_to, prompt_len, stream.dtype))


SPEC_A = {"vectors": [{"name": "a", "layers": [0, 1], "scale": 3.0}, {"name": "b", "layers": [1], "mode": "clamp", "scale": 2.0}]}
SPEC_B = {"vectors": [{"name": "c", "layers": [1], "mode": "ablate"}, {"name": "a", "layers": [1], "mode": "clamp", "scale": -1.0}, {"name": "b", "layers": [1], "scale": 0.5, "normalize": True}], "apply_to": "generated"}


def test_mixed_batch_matches_reference_and_leaves_unsteered_bits(runtime):
    slot_a = runtime.admit("ra", params(SPEC_A), prompt_len=3)
    slot_b = runtime.admit("rb", params(SPEC_B), prompt_len=2)
    assert runtime.admit("plain", params(), prompt_len=4) == 0
    assert {slot_a, slot_b} == {1, 2}
    # Batch: ra (3 prompt tokens), plain (2), rb (4: 2 prompt + 2 generated)
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    runtime.fill_token_slot(torch.tensor([slot_a, 0, slot_b]), torch.tensor([3, 2, 4]), positions, 9, 12)
    assert runtime.token_slot[:12].tolist() == [slot_a] * 3 + [0, 0] + [0, 0, slot_b, slot_b] + [0, 0, 0]
    hidden, residual = torch.randn(9, HIDDEN), torch.randn(9, HIDDEN)
    for index, layer in runtime.layers.items():
        new_residual = layer.steer(hidden, residual)
        assert torch.equal(new_residual[3:5], residual[3:5])  # unsteered: bit-identical
        for rows, spec, prompt_len in ((slice(0, 3), SPEC_A, 3), (slice(5, 9), SPEC_B, 2)):
            expected = reference_stream(hidden[rows] + residual[rows], spec, runtime.registry, index, positions[rows], prompt_len)
            torch.testing.assert_close(hidden[rows] + new_residual[rows], expected, atol=1e-5, rtol=1e-5)
    clamped = runtime.layers[1].steer(hidden, residual)[:3] + hidden[:3]
    b_hat = unit(torch.from_numpy(runtime.registry.array(runtime.registry.digest_of("b")).copy()))
    torch.testing.assert_close(clamped @ b_hat, torch.full((3,), 2.0), atol=1e-5, rtol=0)


def test_identical_steering_shares_rows_and_release_returns_them(runtime):
    for i in range(SLOTS - 1):  # every slot but the zero one: no cap below max_num_seqs
        assert runtime.admit(f"r{i}", params(SPEC_A), prompt_len=1) == i + 1
    assert runtime.slots_in_use == SLOTS - 1
    # SPEC_A steers layers 0 and 1 differently: two rows, whatever the number of requests.
    assert runtime.pool.in_use == 2
    runtime.flush()  # the step's writer moves what admission changed to the device
    assert runtime.row_of_slot[:, 1:SLOTS].unique(dim=1).shape[1] == 1 and runtime.row_of_slot[:2, 1].all()
    runtime.release("r1")
    runtime.flush()
    assert not runtime.row_of_slot[:, 2].any() and runtime.pool.in_use == 2
    assert runtime.admit("late", params(SPEC_B), prompt_len=1) == 2
    assert runtime.pool.in_use == 3
    runtime.flush()
    assert runtime.row_of_slot[0, 2] == 0 and runtime.row_of_slot[1, 2] != 0  # SPEC_B steers layer 1 only
    for i in (0, 2, 3):
        runtime.release(f"r{i}")
    assert runtime.pool.in_use == 1
    runtime.release("late")
    runtime.release("never-admitted")
    assert runtime.slots_in_use == 0 and runtime.pool.in_use == 0
    runtime.flush()
    assert not runtime.row_of_slot.any()


def test_layers_steered_alike_share_one_row(runtime):
    slot = runtime.admit("r", params({"vectors": [{"name": "a", "layers": [0, 2], "scale": 3.0}]}), prompt_len=1)
    assert runtime.pool.in_use == 1
    runtime.flush()
    assert runtime.row_of_slot[0, slot] == runtime.row_of_slot[2, slot] != 0 and runtime.row_of_slot[1, slot] == 0


def test_a_request_sharing_held_rows_needs_no_vector(runtime):
    """Admission builds rows only for content the pool lacks: a second request with the
    same steering is admitted even after its vector left the worker's registry."""
    first = runtime.admit("first", params(SPEC_A), prompt_len=1)
    runtime.registry.remove("a")
    second = runtime.admit("second", params(SPEC_A), prompt_len=1)
    runtime.flush()
    assert second != 0 and torch.equal(runtime.row_of_slot[:, first], runtime.row_of_slot[:, second])
    assert runtime.stats()["unapplied_requests"] == 0


def test_a_full_pool_admits_nothing_partially():
    layers = {index: Layer() for index in range(LAYERS)}
    shape = ModelShape(**{**SHAPE.__dict__, "table_rows": 3})  # rows 1 and 2 usable
    runtime = SteeringRuntime(shape, make_registry(), layers, num_slots=SLOTS, max_tokens=32)
    assert runtime.pool.capacity == 2
    assert runtime.admit("a", params(SPEC_A), 1) != 0  # two rows
    assert runtime.admit("b", params(SPEC_B), 1) == 0  # one more row: no room
    assert runtime.pool.in_use == 2 and runtime.slots_in_use == 1
    assert runtime.stats()["unapplied_requests"] == 1
    assert runtime.stats()["table_rows"] == {"in_use": 2, "peak": 2, "capacity": 2}
    runtime.release("a")
    assert runtime.admit("b", params(SPEC_B), 1) != 0


def test_exhausted_or_unresolvable_specs_degrade_to_unsteered_and_are_counted(runtime, caplog):
    ghost = ResolvedSteering((Op(1, "add", "sha256:" + "0" * 64, 1.0, False),), "all").wire
    with caplog.at_level(logging.WARNING, logger="vllm_steer"):
        assert runtime.admit("ghost", {"steering": ghost}, 1) == 0
        assert runtime.admit("garbage", {"steering": "{not json"}, 1) == 0
        for i in range(SLOTS - 1):
            runtime.admit(f"r{i}", params(SPEC_A), 1)
        assert runtime.admit("one-too-many", params(SPEC_A), 1) == 0
    assert "ghost runs unsteered" in caplog.text and "steering slots are in use" in caplog.text
    assert runtime.stats()["unapplied_requests"] == 3
    assert runtime.slots_in_use == SLOTS - 1  # the failures took no slot


def test_a_failure_while_filling_a_slot_frees_it(runtime, monkeypatch):
    def broken_start(*args):
        raise RuntimeError("capture table write failed")

    monkeypatch.setattr(runtime.capture, "start", broken_start)
    assert runtime.admit("r", params(SPEC_A, capture={"key": "k", "layers": [1]}), 2) == 0
    assert runtime.slots_in_use == 0 and runtime.stats()["unapplied_requests"] == 1
    runtime.flush()
    assert runtime.pool.in_use == 0 and not runtime.row_of_slot.any()


def test_phase_masks_and_padding(runtime):
    prompt_only = runtime.admit("p", params({**SPEC_A, "apply_to": "prompt"}), prompt_len=2)
    generated_only = runtime.admit("g", params({**SPEC_A, "apply_to": "generated"}), prompt_len=2)
    runtime.token_slot.fill_(99)
    runtime.token_row.fill_(99)
    positions = torch.tensor([1, 2, 1, 2, 7, 7])
    runtime.fill_token_slot(torch.tensor([prompt_only, generated_only]), torch.tensor([2, 2]), positions, 4, 6)
    assert runtime.token_slot[:7].tolist() == [prompt_only, 0, 0, generated_only, 0, 0, 99]
    # Each layer's rows follow the slots (both requests share SPEC_A's rows); padding reads row 0.
    rows = runtime.row_of_slot[:, prompt_only].clone()
    assert rows[0] != 0 and rows[1] != 0 and rows[2] == 0
    expected = torch.stack([rows, 0 * rows, 0 * rows, rows, 0 * rows, 0 * rows, torch.full_like(rows, 99)], dim=1)
    assert torch.equal(runtime.token_row[:, :7], expected)
    # Beside a phase-limited request, one steering every position reads its slot everywhere;
    # once the phase-limited ones leave, so does it (and nothing of their masks stays).
    everywhere = runtime.admit("e", params(SPEC_A), prompt_len=2)
    runtime.fill_token_slot(torch.tensor([everywhere, generated_only]), torch.tensor([2, 2]), positions, 4, 4)
    assert runtime.token_slot[:4].tolist() == [everywhere, everywhere, 0, generated_only]
    runtime.release("p")
    runtime.release("g")
    runtime.fill_token_slot(torch.tensor([everywhere]), torch.tensor([2]), positions, 2, 2)
    assert runtime.token_slot[:2].tolist() == [everywhere, everywhere]
    assert torch.equal(runtime.token_row[:, :2], torch.stack([rows, rows], dim=1))


class FakeV1Runner:
    """What write_v1 reads from vLLM's V1 GPUModelRunner."""

    def __init__(self):
        self.requests = {}
        self.input_batch = SimpleNamespace(req_ids=[], num_reqs=0)
        self.query_start_loc = SimpleNamespace(np=np.zeros(9, dtype=np.int32))

    def schedule(self, batch: list[tuple[str, int]]):
        self.input_batch = SimpleNamespace(req_ids=[r for r, _ in batch] + ["stale-row"], num_reqs=len(batch))
        self.query_start_loc.np[: len(batch) + 1] = np.concatenate([[0], np.cumsum([n for _, n in batch])])


def scheduler_output(finished=(), preempted=()):
    return SimpleNamespace(finished_req_ids=set(finished), preempted_req_ids=set(preempted))


def test_v1_writer_follows_rows_by_request_id(runtime):
    runner = FakeV1Runner()
    runner.requests = {
        "a": SimpleNamespace(sampling_params=sampling(SPEC_A), num_prompt_tokens=3),
        "b": SimpleNamespace(sampling_params=sampling(SPEC_B), num_prompt_tokens=2),
        "u": SimpleNamespace(sampling_params=sampling(), num_prompt_tokens=2),
    }
    runner.schedule([("a", 3), ("u", 2)])
    write_v1(runtime, runner, torch.tensor([0, 1, 2, 0, 1, 0, 0, 0]))
    slot_a = runtime.slot_of("a")
    assert runtime.token_slot[:8].tolist() == [slot_a] * 3 + [0, 0, 0, 0, 0]
    # Next step: u finished; rows reordered (condensed), b joins, a decodes one token.
    release_v1(runtime, scheduler_output(finished=["u"]))
    runner.schedule([("b", 2), ("a", 1)])
    write_v1(runtime, runner, torch.tensor([0, 1, 3]))
    assert runtime.token_slot[:3].tolist() == [0, 0, slot_a]  # b steers generated tokens only
    assert runtime.slot_of("u") is None
    # a is preempted, b decodes; a comes back later and is admitted again.
    release_v1(runtime, scheduler_output(preempted=["a"]))
    runner.schedule([("b", 1)])
    write_v1(runtime, runner, torch.tensor([2]))
    assert runtime.slot_of("a") is None and runtime.slots_in_use == 1
    assert runtime.token_slot[0].item() == runtime.slot_of("b")
    runner.schedule([("a", 4), ("b", 1)])
    write_v1(runtime, runner, torch.tensor([0, 1, 2, 3, 3]))
    assert runtime.token_slot[:5].tolist() == [runtime.slot_of("a")] * 4 + [runtime.slot_of("b")]


def test_capture_adds_nothing_from_padded_rows_holding_nan(runtime):
    """Padded rows of a step may hold garbage: they read capture weight 0 and add an exact
    zero (NaN * 0 would be NaN), so every capture row stays finite."""
    slot = runtime.admit("c", params(capture={"key": "k", "layers": [1], "reduce": "mean"}), prompt_len=2)
    runtime.fill_token_slot(torch.tensor([slot]), torch.tensor([2]), torch.tensor([0, 1, 0, 0]), 2, 4)
    stream = torch.randn(4, HIDDEN)
    stream[2] = float("nan")
    stream[3] = float("inf")
    runtime.layers[1].capture(stream)
    assert torch.isfinite(runtime.layers[1].capture_sum).all()
    torch.testing.assert_close(runtime.layers[1].capture_sum[slot], stream[:2].mean(0))


def test_v1_request_not_scheduled_this_step_keeps_its_slot_and_capture(runtime):
    """V1 drops running requests that are merely not scheduled (token budget spent) from its
    persistent batch; they are not finished. Their slot, rows and a mean capture over
    chunked prefill must carry on, not restart."""
    runner = FakeV1Runner()
    capture = {"key": "chunked", "layers": [1], "reduce": "mean"}
    runner.requests = {
        "long": SimpleNamespace(sampling_params=sampling(SPEC_A, capture=capture), num_prompt_tokens=6),
        "other": SimpleNamespace(sampling_params=sampling(SPEC_B), num_prompt_tokens=4),
    }
    runner.schedule([("long", 3)])  # first prefill chunk
    write_v1(runtime, runner, torch.tensor([0, 1, 2]))
    slot = runtime.slot_of("long")
    rows = runtime.row_of_slot[:, slot].clone()
    runtime.layers[1].capture_sum[slot] += 1.0  # what the first chunk's forward accumulated
    release_v1(runtime, scheduler_output())
    runner.schedule([("other", 4)])  # "long" is running but not scheduled this step
    write_v1(runtime, runner, torch.tensor([0, 1, 2, 3]))
    release_v1(runtime, scheduler_output())
    runner.schedule([("long", 3), ("other", 1)])  # second chunk
    write_v1(runtime, runner, torch.tensor([3, 4, 5, 4]))
    assert runtime.slot_of("long") == slot
    assert torch.equal(runtime.row_of_slot[:, slot], rows)
    assert runtime.token_slot[:3].tolist() == [slot] * 3
    assert torch.equal(runtime.layers[1].capture_sum[slot], torch.ones(HIDDEN))  # not restarted
    release_v1(runtime, scheduler_output(finished=["long", "other"]))
    assert runtime.slots_in_use == 0
    assert runtime.collect_captures(["chunked"])["chunked"].keys() == {1}


def new_request(req_id: str, spec=None, prompt_len: int = 2):
    return SimpleNamespace(req_id=req_id, sampling_params=sampling(spec), prompt_len=prompt_len)


def v2_batch(req_ids, idx_mapping, tokens, positions, padded):
    starts = np.concatenate([[0], np.cumsum(tokens)])
    return SimpleNamespace(
        req_ids=req_ids,
        num_reqs=len(req_ids),
        idx_mapping=torch.tensor(idx_mapping),
        idx_mapping_np=np.array(idx_mapping),
        num_scheduled_tokens=np.array(tokens),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        positions=torch.tensor(positions + [0] * (padded - len(positions))),
        num_tokens=int(starts[-1]),
        num_tokens_after_padding=padded,
    )


def test_v2_writer_order_padding_dummy_and_preemption(runtime):
    writer = V2SlotWriter(runtime, max_num_reqs=4, device="cpu")
    states = SimpleNamespace(req_id_to_index={"a": 2, "u": 0, "b": 3})
    writer.add_request(2, new_request("a", SPEC_A))
    writer.add_request(0, new_request("u"))
    writer.add_request(3, new_request("b", SPEC_B, prompt_len=1))
    slot_a, slot_b = runtime.slot_of("a"), runtime.slot_of("b")
    # Batch order differs from request-index order; the tail is padding.
    writer.prepare_inputs(v2_batch(["b", "a", "u"], [3, 2, 0], [2, 1, 1], [0, 1, 5, 3], padded=8), states)
    assert runtime.token_slot[:8].tolist() == [0, slot_b, slot_a, 0, 0, 0, 0, 0]
    # Order changes next step.
    writer.prepare_inputs(v2_batch(["u", "a", "b"], [0, 2, 3], [1, 1, 1], [4, 6, 2], padded=4), states)
    assert runtime.token_slot[:4].tolist() == [0, slot_a, slot_b, 0]
    # A dummy batch (ids unknown to the runner) reads slot 0 everywhere.
    writer.prepare_inputs(v2_batch(["dummy_0", "dummy_1"], [0, 1], [2, 2], [0, 1, 0, 1], padded=4), states)
    assert not runtime.token_slot[:4].any()
    runtime.token_slot.fill_(7)
    writer.prepare_dummy_inputs(num_tokens=6)
    assert not runtime.token_slot[:6].any()
    # Preemption: V2 removes "a", later adds it again as new, possibly at another index.
    writer.remove_request("a")
    assert runtime.slot_of("a") is None and runtime.slots_in_use == 1
    writer.add_request(1, new_request("a", SPEC_A))
    states.req_id_to_index = {"a": 1, "b": 3}
    writer.prepare_inputs(v2_batch(["a", "b"], [1, 3], [3, 1], [0, 1, 2, 9], padded=4), states)
    assert runtime.token_slot[:4].tolist() == [runtime.slot_of("a")] * 3 + [slot_b]


def test_v2_writer_failure_runs_unsteered_instead_of_raising(runtime, caplog):
    writer = V2SlotWriter(runtime, max_num_reqs=4, device="cpu")
    writer.add_request(0, new_request("a", SPEC_A))
    broken = v2_batch(["a"], [0], [3], [0, 1, 2], padded=4)
    broken.num_tokens = 5  # inconsistent with query_start_loc
    runtime.token_slot.fill_(1)
    with caplog.at_level(logging.ERROR, logger="vllm_steer"):
        writer.prepare_inputs(broken, SimpleNamespace(req_id_to_index={"a": 0}))
    assert not runtime.token_slot.any()
    assert "runs unsteered" in caplog.text


def test_the_row_budget_follows_the_setting_or_the_device():
    from types import SimpleNamespace

    from vllm_steer.engine.config import SteeringConfig
    from vllm_steer.core.rows import budget_rows, row_bytes

    config = SimpleNamespace(num_hidden_layers=32, hidden_size=4096, steering={})
    row = row_bytes(4096, 4)
    # Default: 1% of the device, at most 256 MiB.
    assert SteeringConfig().model_shape(config, device_bytes=10 << 30).table_rows == (10 << 30) // 100 // row
    assert SteeringConfig().model_shape(config, device_bytes=141 << 30).table_rows == (256 << 20) // row
    assert SteeringConfig(table_budget_mib=1).model_shape(config, device_bytes=141 << 30).table_rows == (1 << 20) // row
    with pytest.raises(ValueError, match=f"holds no steering row: one row takes {row} bytes"):
        budget_rows(row, 4096, 4)


@pytest.mark.parametrize("compare", ["above", "below"])
def test_a_condition_reads_the_prompt_and_gates_the_generated_tokens(runtime, compare):
    """Two requests with the same steering and condition: the prompt tokens of each read the
    gate row at the condition's layer, the layer sums their projections per request, and
    only the request whose mean projection passes steers its generated tokens."""
    b_hat = unit(torch.from_numpy(FRONT_REGISTRY.array(FRONT_REGISTRY.digest_of("b")).copy()))
    spec = {"vectors": [{"name": "a", "layers": [0, 2], "scale": 3.0}],
            "condition": {"name": "b", "layer": 1, "threshold": 1.0, "compare": compare}}
    high, low = runtime.admit("high", params(spec), prompt_len=3), runtime.admit("low", params(spec), prompt_len=2)
    assert runtime.pool.in_use == 2  # the steering row (layers 0 and 2 alike) and one gate row, shared
    # Prompts: high's mean projection on b is 2 (above 1), low's is 0.5 (below).
    base = torch.randn(5, HIDDEN)
    base -= (base @ b_hat).unsqueeze(-1) * b_hat
    stream = base + torch.tensor([1.0, 2.0, 3.0, 0.0, 1.0]).unsqueeze(-1) * b_hat
    runtime.fill_token_slot(torch.tensor([high, low]), torch.tensor([3, 2]), torch.tensor([0, 1, 2, 0, 1]), 5, 6)
    gate_columns = [SLOTS + high] * 3 + [SLOTS + low] * 2
    assert runtime.token_slot[:6].tolist() == gate_columns + [0]
    hidden = torch.zeros(5, HIDDEN)
    for layer in runtime.layers.values():
        # The prompt is read, not steered, at every layer.
        assert torch.equal(layer.steer(hidden, stream), stream)
    torch.testing.assert_close(runtime.gate_sum[[SLOTS + high, SLOTS + low]], torch.tensor([6.0, 1.0]))

    # Next step: one generated token each.
    runtime.fill_token_slot(torch.tensor([high, low]), torch.tensor([1, 1]), torch.tensor([3, 2]), 2, 2)
    passes = high if compare == "above" else low
    assert runtime.token_slot[:2].tolist() == [high if passes == high else 0, low if passes == low else 0]
    for index in (0, 2):
        out = runtime.layers[index].steer(torch.zeros(2, HIDDEN), stream[:2])
        steered = 0 if passes == high else 1
        assert torch.equal(out[1 - steered], stream[1 - steered])
        assert not torch.equal(out[steered], stream[steered])

    runtime.release("high")
    runtime.release("low")
    runtime.flush()
    assert runtime.pool.in_use == 0 and not runtime.row_of_slot.any() and not runtime.stages.any()
    assert runtime.stats()["conditions"] == {"held": 1, "not_held": 1}


@pytest.mark.parametrize("apply_to", ["prompt", "generated"])
def test_phases_follow_a_chunked_prompt_counted_on_the_host(runtime, apply_to):
    """With the host's token counts, steps after every prompt has been read take one gather;
    until then (a one-token last chunk included) tokens still split at the prompt's end."""
    slot = runtime.admit("r", params({**SPEC_A, "apply_to": apply_to}), prompt_len=3)
    everywhere = runtime.admit("e", params(SPEC_A), prompt_len=1)
    expected = {"prompt": [slot, 0], "generated": [0, slot]}[apply_to]
    for positions, in_prompt in (([0, 1], True), ([2], True), ([3], False), ([4], False)):
        count = len(positions)
        runtime.fill_token_slot(torch.tensor([slot, everywhere]), torch.tensor([count, 1]), torch.tensor(positions + [9]),
                                count + 1, count + 1, scheduled=([slot, everywhere], [count, 1]))
        assert runtime.token_slot[:count + 1].tolist() == [expected[0 if in_prompt else 1]] * count + [everywhere]


def test_a_condition_judges_the_whole_prompt_when_its_last_chunk_is_one_token(runtime, monkeypatch):
    """Outcomes are recomputed only while a gated prompt can still change a sum (counted on
    the host from the tokens each step schedules). A prompt whose last chunk is one token
    arrives in a step shaped like decoding; the next step must still judge all of it."""
    b_hat = unit(torch.from_numpy(FRONT_REGISTRY.array(FRONT_REGISTRY.digest_of("b")).copy()))
    spec = {"vectors": [{"name": "a", "layers": [0], "scale": 3.0}], "condition": {"name": "b", "layer": 1, "threshold": 1.0}}
    slot = runtime.admit("r", params(spec), prompt_len=3)
    computed = []
    holds = runtime._holds
    monkeypatch.setattr(runtime, "_holds", lambda: computed.append(1) or holds())

    def step(positions, along_b):
        count = len(positions)
        runtime.fill_token_slot(torch.tensor([slot]), torch.tensor([count]), torch.tensor(positions), count, count,
                                scheduled=([slot], [count]))
        runtime.layers[1].steer(torch.zeros(count, HIDDEN), torch.tensor(along_b).unsqueeze(-1) * b_hat)
        return runtime.token_slot[:count].tolist()

    assert step([0, 1], [0.0, 0.0]) == [SLOTS + slot] * 2  # the prompt's first chunk: sum 0
    assert step([2], [6.0]) == [SLOTS + slot]  # its last token, alone: sum 6, mean 2 > 1
    assert step([3], [0.0]) == [slot]  # the first generated token steers
    assert step([4], [0.0]) == [slot]
    assert len(computed) == 3  # after the prompt's last token, never again
    runtime.admit("other", params(spec), prompt_len=2)  # the tables change: computed again
    runtime.fill_token_slot(torch.tensor([slot]), torch.tensor([1]), torch.tensor([5]), 1, 1, scheduled=([slot], [1]))
    assert len(computed) == 4 and runtime.token_slot[0] == slot


def test_a_condition_outcome_is_read_before_its_slot_is_taken_again(runtime):
    """Admission and release edit host tables that reach the device at the next step: a
    released request's outcome must come from its own gate, even when a new request takes
    its slot before that step."""
    b_hat = unit(torch.from_numpy(FRONT_REGISTRY.array(FRONT_REGISTRY.digest_of("b")).copy()))
    spec = {"vectors": [{"name": "a", "layers": [0], "scale": 3.0}], "condition": {"name": "b", "layer": 1, "threshold": 1.0}}
    slot = runtime.admit("first", params(spec), prompt_len=2)
    runtime.fill_token_slot(torch.tensor([slot]), torch.tensor([2]), torch.tensor([0, 1]), 2, 2)
    runtime.layers[1].steer(torch.zeros(2, HIDDEN), 3.0 * b_hat.expand(2, HIDDEN))  # mean projection 3: holds
    runtime.release("first")
    assert runtime.admit("second", params({**spec, "condition": {"name": "b", "layer": 1, "threshold": 5.0}}), prompt_len=2) == slot
    runtime.fill_token_slot(torch.tensor([slot]), torch.tensor([2]), torch.tensor([0, 1]), 2, 2)
    assert runtime.gate_sum[SLOTS + slot] == 0  # the new request reads its own prompt
    assert runtime.stats()["conditions"] == {"held": 1, "not_held": 0}
    runtime.release("second")
    # One that leaves before any step read its prompt never steered.
    runtime.admit("third", params(spec), prompt_len=2)
    runtime.release("third")
    assert runtime.stats()["conditions"] == {"held": 1, "not_held": 2}


def test_a_readmitted_request_reads_its_prompt_again(runtime):
    spec = {"vectors": [{"name": "a", "layers": [0], "scale": 3.0}], "condition": {"name": "b", "layer": 1, "threshold": 0.0}}
    slot = runtime.admit("r", params(spec), prompt_len=2)
    runtime.gate_sum[SLOTS + slot] = 123.0
    assert runtime.admit("r", params(spec), prompt_len=2) == slot  # preempted and resumed: released first
    runtime.flush()
    assert runtime.gate_sum[SLOTS + slot] == 0


def test_new_rows_are_written_at_the_next_step_with_their_newest_content():
    """Admission stages rows; the step's writer writes them all at once. A row freed and taken
    again before that step holds its newest content, never the earlier one."""
    pool = RowPool(3, HIDDEN, 1)
    row = pool.acquire(["a"], {"a": LayerRow(torch.ones(HIDDEN))})["a"]
    assert not pool.add[row].any()  # nothing written before the step
    pool.release(["a"])
    assert pool.acquire(["b"], {"b": LayerRow(torch.full((HIDDEN,), 2.0))})["b"] == row
    pool.flush()
    assert torch.equal(pool.add[row], torch.full((HIDDEN,), 2.0))
    pool.flush()  # nothing left to write
    assert torch.equal(pool.add[row], torch.full((HIDDEN,), 2.0))


def test_rows_a_failed_step_could_not_write_are_written_at_the_next(monkeypatch):
    """A step whose writer fails runs unsteered; the rows it should have written must not be
    lost, or their requests would later read zeros as their steering."""
    import vllm_steer.core.rows as rows

    pool = RowPool(3, HIDDEN, 1)
    row = pool.acquire(["a"], {"a": LayerRow(torch.ones(HIDDEN))})["a"]
    stack_rows = rows.stack_rows
    monkeypatch.setattr(rows, "stack_rows", lambda *args: (_ for _ in ()).throw(RuntimeError("device busy")))
    with pytest.raises(RuntimeError, match="device busy"):
        pool.flush()
    monkeypatch.setattr(rows, "stack_rows", stack_rows)
    pool.flush()
    assert torch.equal(pool.add[row], torch.ones(HIDDEN))


def test_condition_counts_never_wait_for_the_device(runtime, monkeypatch):
    """An outcome whose copy to the host is still in flight (a GPU step behind it) is counted
    by a later call, not waited for: counting runs in the step path and the stats call."""
    from vllm_steer.core.staging import HostCopy

    spec = {"vectors": [{"name": "a", "layers": [0], "scale": 3.0}], "condition": {"name": "b", "layer": 1, "threshold": -1.0}}
    in_flight = {"yes": True}
    monkeypatch.setattr(HostCopy, "ready", lambda self: not in_flight["yes"])
    monkeypatch.setattr(HostCopy, "numpy", lambda self: pytest.fail("waited") if in_flight["yes"] else self._host.numpy())
    slot = runtime.admit("r", params(spec), prompt_len=2)
    runtime.fill_token_slot(torch.tensor([slot]), torch.tensor([2]), torch.tensor([0, 1]), 2, 2)
    runtime.release("r")
    runtime.flush()
    assert runtime.stats()["conditions"] == {"held": 0, "not_held": 0}  # in flight: not counted yet
    in_flight["yes"] = False
    assert runtime.stats()["conditions"] == {"held": 1, "not_held": 0}


def test_tokens_past_the_scheduled_counts_read_slot_zero(runtime):
    """Counts summing to fewer tokens than the step holds (V2's adaptive speculative
    verification) must not fail the step: the tokens counted read their request's slot, the
    rest slot 0, as repeat_interleave would give where the counts add up."""
    a = runtime.admit("a", params(SPEC_A), prompt_len=3)
    b = runtime.admit("b", params(SPEC_A), prompt_len=3)
    slots, counts = torch.tensor([a, 0, b]), torch.tensor([2, 1, 2])
    runtime.fill_token_slot(slots, counts, torch.arange(5), 5, 6)
    assert runtime.token_slot[:6].tolist() == torch.repeat_interleave(slots, counts).tolist() + [0]
    runtime.fill_token_slot(slots, torch.tensor([2, 1, 1]), torch.arange(5), 5, 6)
    assert runtime.token_slot[:6].tolist() == [a, a, 0, b, 0, 0]
