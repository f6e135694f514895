"""What the scheduler does to running requests must not disturb their steering: requests
arriving and finishing at different steps (the batch order changes), preemption and
resumption, and slots returning to the pool. These are the paths where the V1 writer (rows
keyed by request id) and the V2 writer (stable request index, preempted requests re-added
as new ones) differ."""

from __future__ import annotations

import numpy as np
import pytest

from support.engines import start_engine
from support.helpers import assert_same_tokens_close_logprobs, generations, greedy, reference, run, slots_in_use
from vllm_steer.core.rows import row_bytes


def specs_for(count: int, seed: int) -> list:
    generator = np.random.default_rng(seed)
    specs = []
    for index in range(count):
        if index % 3 == 2:
            specs.append(None)
        else:
            mode = "clamp" if index % 2 else "add"
            scale = 20.0 if mode == "clamp" else 2.5
            specs.append({"vectors": [{"vector": generator.standard_normal(256).tolist(), "layers": [1 + index % 3], "mode": mode, "scale": scale}]})
    return specs


def test_the_engine_uses_the_selected_runner(llm, runner):
    run(llm, [[1, 2, 3]], [{"features": [[1, 7, 1.0]]}], 2)
    assert {stats["runner"] for stats in llm.steering_stats()} == {runner}


def test_arrivals_and_departures_reorder_the_batch(llm, prompt_ids, hf_model, gen_len):
    """Requests join between steps and finish at different lengths; each equals the reference."""
    specs = specs_for(5, seed=31)
    lengths = [gen_len + 3, 2, gen_len, gen_len + 1, 3]
    engine = llm.llm.llm_engine
    finished = {}
    for index, (spec, length) in enumerate(zip(specs, lengths)):
        params = greedy(length, extra_args=None if spec is None else {"steering": spec})
        engine.add_request(f"req{index}", {"prompt_token_ids": prompt_ids[index % 4]}, params)
        for output in engine.step():  # one step between arrivals: the batch keeps changing
            if output.finished:
                finished[output.request_id] = output
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    for index, (spec, length) in enumerate(zip(specs, lengths)):
        (got,) = generations([finished[f"req{index}"]])
        assert_same_tokens_close_logprobs(got, reference(hf_model, llm, prompt_ids[index % 4], spec, length))
    assert slots_in_use(llm) == [0]


@pytest.fixture(scope="module")
def cramped(tiny_model, feature_file, runner):
    """An engine whose KV cache holds only a few requests: running more forces preemption
    (in-process and eager: starts in seconds)."""
    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, max_model_len=256,
                       kv_cache_memory_bytes=5 * 128 * 4096, disable_log_stats=False, enforce_eager=True)
    yield llm
    llm.shutdown()


def preemptions(llm) -> float:
    return sum(m.value for m in llm.llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_steered_requests_resume_with_their_steering(cramped, tokenizer):
    story = tokenizer.encode("Tell me a story about the Eiffel Tower in Paris. " * 8, add_special_tokens=False)[:120]
    specs = specs_for(6, seed=41)
    length = 40
    before = preemptions(cramped)
    together = run(cramped, [story] * len(specs), specs, length)
    assert preemptions(cramped) > before, "the test needs the scheduler to preempt"
    for spec, got in zip(specs, together):
        assert_same_tokens_close_logprobs(got, run(cramped, [story], [spec], length)[0], tolerance=1e-5)
    assert slots_in_use(cramped) == [0]


# ---- the steering row budget (rows.py, scheduler.py) --------------------------------------------
ROW_BYTES = row_bytes(256, 4)  # hidden 256, max_directions 4


@pytest.fixture(scope="module")
def budgeted(tiny_model, feature_file, runner):
    """Rows for three distinct steerings: the rest wait (in-process and eager: starts in
    seconds), for this module only."""
    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                       table_budget_mib=4 * ROW_BYTES / 2**20, enforce_eager=True)
    yield llm
    llm.shutdown()


def test_requests_beyond_the_row_budget_wait_and_then_run_steered(budgeted, prompt_ids, hf_model, gen_len):
    generator = np.random.default_rng(5)

    def distinct():
        return {"vectors": [{"vector": generator.standard_normal(256).tolist(), "layers": [1], "scale": 3.0}]}

    first = distinct()
    # Rows: a, b, c fill the pool; a's twin shares a's row; d and e must wait; unsteered never waits.
    specs = {"a": first, "b": distinct(), "c": distinct(), "a-twin": first, "d": distinct(), "e": distinct(), "plain": None}
    engine = budgeted.llm.llm_engine
    for index, (name, spec) in enumerate(specs.items()):
        params = greedy(gen_len, extra_args=None if spec is None else {"steering": spec})
        engine.add_request(name, {"prompt_token_ids": prompt_ids[index % 4]}, params)
    finished = {output.request_id: output for output in engine.step() if output.finished}
    (stats,) = budgeted.steering_stats()
    assert stats["slots_in_use"] == 4 and stats["table_rows"]["in_use"] == 3  # a, b, c, a-twin
    while engine.has_unfinished_requests():
        finished.update((output.request_id, output) for output in engine.step() if output.finished)
    for index, (name, spec) in enumerate(specs.items()):
        (got,) = generations([finished[name]])
        assert_same_tokens_close_logprobs(got, reference(hf_model, budgeted, prompt_ids[index % 4], spec, gen_len))
    (stats,) = budgeted.steering_stats()
    assert stats["unapplied_requests"] == 0 and stats["table_rows"]["peak"] == stats["table_rows"]["capacity"] == 3


def test_a_request_needing_more_rows_than_the_budget_is_refused(budgeted, prompt_ids):
    from vllm_steer.core.spec import SteeringError

    generator = np.random.default_rng(6)
    spec = {"vectors": [{"vector": generator.standard_normal(256).tolist(), "layers": [layer], "scale": 1.0} for layer in range(4)]}
    with pytest.raises(SteeringError, match="needs 4 table rows.*budget holds 3"):
        run(budgeted, [prompt_ids[0]], [spec], 2)
