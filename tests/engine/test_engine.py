"""Steering inside the engine, checked against the notebook's method and for isolation.

Every test here runs on the session's model runner (``--runner v1`` or ``v2``; ``make test`` runs both).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from support.engines import start_engine
from support.helpers import assert_same_tokens_close_logprobs, generations, greedy, reference, run
from vllm_steer.core.spec import encode_b64, vector_digest


@pytest.fixture(scope="session")
def directions(hf_model, prompt_ids) -> dict[str, list[float]]:
    """Random directions, plus the mean stream after the last layer (a direction that matters)."""
    generator = np.random.default_rng(7)
    found = {f"random{i}": generator.standard_normal(256).astype(np.float32).tolist() for i in range(3)}
    with torch.no_grad():
        states = hf_model(torch.tensor([prompt_ids[0]]), output_hidden_states=True).hidden_states
    found["mean_last"] = states[4][0].mean(0).tolist()
    return found


def parity_cases(d) -> dict[str, dict]:
    return {
        "add first layer": {"vectors": [{"vector": d["random0"], "layers": [0], "scale": 3.0}]},
        "clamp middle layer": {"vectors": [{"vector": d["random1"], "layers": [2], "mode": "clamp", "scale": 40.0}]},
        "ablate last layer": {"vectors": [{"vector": d["mean_last"], "layers": [3], "mode": "ablate"}]},
        "several entries": {
            "vectors": [
                {"name": "L1/F7", "layers": [1], "scale": 20.0, "normalize": True},
                {"vector": d["random1"], "layers": [1, 3], "mode": "clamp", "scale": -10.0},
                {"vector_b64": encode_b64(np.asarray(d["mean_last"], np.float32)), "layers": [3], "mode": "ablate"},
                {"vector": d["random2"], "layers": [3], "scale": 2.0},
            ]
        },
        "prompt tokens only": {"vectors": [{"vector": d["random0"], "layers": [1], "scale": 4.0}], "apply_to": "prompt"},
        "generated tokens only": {"vectors": [{"vector": d["random0"], "layers": [1], "scale": 4.0}], "apply_to": "generated"},
        "negative scale": {"vectors": [{"name": "L2/F42", "layers": [2], "scale": 30.0, "normalize": True}], "scale": -1.5},
        "notebook features, clamp": {"features": [[1, 7, 10.0], [2, 42, 5.0]], "scale": 0.8, "clamp": True},
        # Ranges that bind: a floor above the component, a cap below it, both around it.
        "range min only": {"vectors": [{"vector": d["random1"], "layers": [2], "mode": "range", "min": 40.0}]},
        "range max only": {"vectors": [{"vector": d["random2"], "layers": [1], "mode": "range", "max": -30.0}]},
        "range min and max": {"vectors": [
            {"vector": d["mean_last"], "layers": [3], "mode": "range", "min": -2.0, "max": 2.0},
            {"vector": d["random0"], "layers": [3], "mode": "range", "min": 25.0, "max": 30.0},
        ]},
    }


CASES = list(parity_cases({k: [0.0] for k in ("random0", "random1", "random2", "mean_last")}))


@pytest.fixture(scope="session")
def parity_batch(engines, gen_len, prompt_ids, directions):
    """Every case and an unsteered request, all in one batch."""
    cases = parity_cases(directions)
    prompt = prompt_ids[0]
    specs = [None, *cases.values()]
    outputs = run(engines(), [prompt] * len(specs), specs, gen_len)
    return prompt, gen_len, dict(zip(["unsteered", *cases], zip(specs, outputs)))


@pytest.mark.parametrize("case", ["unsteered", *CASES])
def test_parity_with_notebook_method(case, parity_batch, hf_model, llm):
    prompt, length, results = parity_batch
    spec, got = results[case]
    expected = reference(hf_model, llm, prompt, spec, length)
    assert_same_tokens_close_logprobs(got, expected)
    if case != "unsteered":
        assert got.token_ids != results["unsteered"][1].token_ids, "this steering should change the output"


def test_mixed_batch_gives_each_request_what_it_gets_alone(llm, prompt_ids, directions, gen_len):
    specs = [
        None,
        {"vectors": [{"vector": directions["random0"], "layers": [1], "scale": 3.0}]},
        None,
        {"vectors": [{"vector": directions["random1"], "layers": [2], "mode": "clamp", "scale": 30.0}], "apply_to": "generated"},
        {"features": [[3, 5, 4.0]]},
        None,
    ]
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(len(specs))]
    together = run(llm, prompts, specs, gen_len)
    alone = [run(llm, [p], [s], gen_len)[0] for p, s in zip(prompts, specs)]
    for mixed, single in zip(together, alone):
        assert_same_tokens_close_logprobs(mixed, single, tolerance=1e-5)
    # Unsteered requests are bit-identical to the same batch with no steering at all.
    plain = run(llm, prompts, [None] * len(specs), gen_len)
    for index, spec in enumerate(specs):
        if spec is None:
            assert together[index].token_ids == plain[index].token_ids
            assert together[index].logprobs == plain[index].logprobs


def test_as_many_distinct_configs_as_running_requests(llm, prompt_ids, gen_len):
    """max_num_seqs (8) requests, each with its own vector, in one batch."""
    generator = np.random.default_rng(3)
    specs = [{"vectors": [{"vector": generator.standard_normal(256).tolist(), "layers": [1, 2], "scale": 2.0}]} for _ in range(8)]
    prompts = [prompt_ids[1]] * 8
    together = run(llm, prompts, specs, gen_len)
    assert len({tuple(g.token_ids) for g in together}) > 1
    for spec, got in zip(specs[:3], together[:3]):
        assert_same_tokens_close_logprobs(got, run(llm, [prompt_ids[1]], [spec], gen_len)[0], tolerance=1e-5)


def test_scale_zero_equals_unsteered(llm, prompt_ids, directions, gen_len):
    spec = {"vectors": [{"vector": directions["random0"], "layers": [0, 1, 2, 3], "scale": 5.0}], "scale": 0.0}
    zero, plain = run(llm, [prompt_ids[2]] * 2, [spec, None], gen_len)
    assert zero.token_ids == plain.token_ids and zero.logprobs == plain.logprobs


def test_bad_specs_get_clear_errors_and_the_engine_keeps_serving(llm, prompt_ids, gen_len):
    bad = {
        "unknown vector 'tower'": {"vectors": [{"name": "tower", "layers": [1]}]},
        "has 3 values; this model's hidden size is 256": {"vectors": [{"vector": [1.0, 2.0, 3.0], "layers": [1]}]},
        "layer 4 is out of range: this model has layers 0-3": {"vectors": [{"name": "L1/F7", "layers": [4]}]},
        "NaN or inf": {"vectors": [{"vector": [float("nan")] * 256, "layers": [1]}]},
        "at most 4 per layer": {"vectors": [{"name": "L1/F7", "layers": [1], "mode": "clamp"}] * 5},
        "empty steering spec": {},
        "no feature vector for (layer 1, feature 8)": {"features": [[1, 8, 1.0]]},
    }
    before = run(llm, [prompt_ids[1]], [None], gen_len)[0]
    for message, spec in bad.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            # The bad one is in the middle of a batch: nothing of the batch is queued.
            run(llm, [prompt_ids[0], prompt_ids[1], prompt_ids[2]], [None, spec, None], gen_len)
    after = run(llm, [prompt_ids[1]], [None], gen_len)[0]
    assert after.token_ids == before.token_ids


@pytest.fixture(scope="module")
def in_process(tiny_model, feature_file, runner):
    """An engine whose workers run in the test process, so the test reads their log
    (in-process and eager: starts in seconds), for this module only."""
    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, enforce_eager=True)
    yield llm
    llm.shutdown()


def unapplied(llm) -> int:
    """Requests whose steering the workers could not apply (steering_stats; the server's
    /metrics vllm_steer_unapplied_requests_total)."""
    return sum(stats["unapplied_requests"] for stats in llm.steering_stats())


def test_a_vector_the_workers_lack_travels_with_the_request(llm, prompt_ids, gen_len):
    """A name only the front end knows (another replica registered it in the shared registry
    directory; these workers were never given it) steers exactly as the same vector sent
    inline: the request carries its content, and nothing runs unsteered."""
    vector = np.random.default_rng(155).standard_normal(256).astype(np.float32)
    before = unapplied(llm)
    llm.frontend.registry.add("front-end-only", vector, replace=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": prompt_ids[0]}] * 3, greedy(gen_len), use_tqdm=False, steering=[
            {"vectors": [{"name": "front-end-only", "layers": [1], "scale": 8.0}]},
            {"vectors": [{"vector": vector.tolist(), "layers": [1], "scale": 8.0}]},
            None,
        ])
    finally:
        llm.frontend.registry.remove("front-end-only")
    named, inline, plain = generations(outputs)
    assert named.token_ids == inline.token_ids != plain.token_ids
    assert unapplied(llm) == before


@pytest.mark.parametrize("engine", ["llm", "in_process"], ids=["engine process", "test process"])
def test_worker_side_failure_degrades_to_unsteered(engine, request, prompt_ids, gen_len, caplog):
    """A vector the front end wrongly believes its workers hold runs unsteered, logged
    (naming the request and the vector) and counted once: the engine never dies of it."""
    llm = request.getfixturevalue(engine)
    missing = vector_digest(np.ones(256, np.float32))
    before = unapplied(llm)
    llm.frontend.registry.add("front-end-only", np.ones(256, np.float32), replace=True)
    llm.frontend.mark_pushed("front-end-only")  # but it was not
    try:
        with caplog.at_level(logging.WARNING, logger="vllm_steer"):
            outputs = llm.generate([{"prompt_token_ids": prompt_ids[0]}] * 2, greedy(gen_len), use_tqdm=False,
                                   steering=[{"vectors": [{"name": "front-end-only", "layers": [1], "scale": 50.0}]}, None])
    finally:
        llm.frontend.registry.remove("front-end-only")
        llm.frontend.workers.drop("front-end-only")
    ghost, plain = generations(outputs)
    assert ghost.token_ids == plain.token_ids
    assert run(llm, [prompt_ids[0]], [None], gen_len)[0].token_ids == plain.token_ids
    # Counted once (not once per step it ran unsteered), and only the request that asked.
    assert unapplied(llm) - before == 1
    if engine == "in_process":  # the other engine's workers log in their own process
        lines = [record for record in caplog.records if "runs unsteered" in record.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING, [r.getMessage() for r in lines]
        message = lines[0].getMessage()
        # vLLM's internal request id is the caller's plus a random suffix.
        named = re.match(r"request (\S+) runs unsteered: its steering could not be applied: (.*)", message)
        assert named, message
        assert named[1] == outputs[0].request_id or named[1].startswith(f"{outputs[0].request_id}-"), message
        assert outputs[1].request_id not in (named[1], named[1].rsplit("-", 1)[0])
        assert missing in named[2], message  # which vector the worker lacks
