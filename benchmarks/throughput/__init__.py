"""Engine throughput, steered vs unsteered, measured side by side in one process.

One engine per model (``max_num_seqs`` = the largest batch), reused by every scenario. In
each scenario, passes alternate (unsteered, steered, ..., unsteered) over the same prompts
and output lengths (``ignore_eos``, fixed ``max_tokens``, greedy); the report is each side's
median output and total tok/s, and the median of each steered pass's ratio to the unsteered
passes either side of it (common.summarize), which cancels the machine's drift. Prefix
caching is off so no pass reuses another's KV. Scenarios vary one factor at a time around
the base (largest batch, every request steered with its own vector on every layer, add): one
shared spec vs distinct configs, 1 layer vs every layer, add vs clamp, 0/25/50/100% steered,
batch size.

    python -m benchmarks.throughput --model llama-1b --batches 1 8 32 --max-tokens 64

This runs the engine parts of ``python -m benchmarks.run`` (which adds the notebook
baseline, the server and the report); every flag of ``benchmarks.run`` works here. The
command is ``__main__.py``: it drives benchmarks.run, which imports this module.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common


class Engine:
    """A vLLM engine under test: the steered architecture (SteeredLLM) or stock vLLM."""

    def __init__(self, model: str, *, steered: bool, dtype: str, max_num_seqs: int, max_model_len: int,
                 max_directions: int = 4, seed: int = 0, extra: dict[str, Any] | None = None):
        import torch  # torch and transformers: ~4.5 s; the harness's logic is tested without them
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        kwargs: dict[str, Any] = dict(dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                      enable_prefix_caching=False, seed=seed)
        if not torch.cuda.is_available():
            kwargs["kv_cache_memory_bytes"] = common.kv_cache_bytes(config, max_num_seqs, max_model_len, dtype)
        kwargs.update(extra or {})
        self.steered = steered
        self.config = config
        self.max_directions = max_directions
        started = time.perf_counter()
        if steered:
            from vllm_steer import SteeredLLM  # vLLM: ~8 s to import

            self.steered_llm = SteeredLLM(model, max_directions=max_directions, **kwargs)
            self.llm = self.steered_llm.llm
        else:
            from vllm import LLM  # vLLM: ~8 s to import

            self.steered_llm = None
            self.llm = LLM(model=model, **kwargs)
        self.start_seconds = time.perf_counter() - started
        self.kwargs = kwargs

    def scheduler_limits(self) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) of this engine."""
        from vllm_steer.engine import seam  # imports vLLM (~8 s): the harness's logic is tested without it

        return seam.scheduler_limits(seam.offline_config(self.llm))

    def table_bytes(self) -> dict[str, int]:
        pool = self.steered_llm.steering_stats()[0]["table_rows"]
        max_num_seqs, max_num_batched_tokens = self.scheduler_limits()
        return common.steering_table_bytes(
            self.config.hidden_size, self.config.num_hidden_layers, max_num_seqs,
            self.max_directions, max_num_batched_tokens, table_rows=pool["capacity"] + 1,
        )

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, specs: Sequence[dict | None] | None):
        from vllm import SamplingParams  # vLLM: ~8 s to import; the harness's logic is tested without it

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        if self.steered_llm is not None:
            return self.steered_llm.generate(inputs, params, steering=list(specs) if specs else None, use_tqdm=False)
        assert not specs or not any(specs), "stock vLLM cannot steer"
        return self.llm.generate(inputs, params, use_tqdm=False)

    def step_configs(self) -> tuple[int, int] | None:
        """(engine steps, sum of distinct steering configs over them) so far, from worker 0."""
        if self.steered_llm is None:
            return None
        stats = self.steered_llm.steering_stats()[0]["step_distinct_configs"]
        return sum(stats["counts"]), stats["sum"]

    def shutdown(self) -> None:
        if self.steered_llm is not None:
            self.steered_llm.shutdown()
        else:
            from vllm_steer.engine import seam  # imports vLLM (~8 s)

            seam.shutdown_offline(self.llm)
        self.llm = self.steered_llm = None
        gc.collect()


def timed_pass(engine: Engine, prompts, max_tokens: int, specs, kind: str, index: int,
               repeats: int = 1) -> tuple[dict[str, Any], list]:
    """One pass: the batch generated ``repeats`` times (pass_repeats); tokens and seconds are summed."""
    before = engine.step_configs()
    start = time.perf_counter()
    prompt_tokens = output_tokens = 0
    for _ in range(repeats):
        outputs = engine.generate(prompts, max_tokens, specs)
        prompt_tokens += sum(len(o.prompt_token_ids) for o in outputs)
        output_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    seconds = time.perf_counter() - start
    record = common.pass_record(kind, index, seconds, prompt_tokens, output_tokens)
    record["repeats"] = repeats
    after = engine.step_configs()
    if before is not None and after is not None and after[0] > before[0]:
        record["steps"] = after[0] - before[0]
        record["mean_distinct_configs_per_step"] = (after[1] - before[1]) / (after[0] - before[0])
    record["load_average"] = common.load_average()
    return record, [list(o.outputs[0].token_ids) for o in outputs]


def pass_repeats(engine: Engine, prompts, max_tokens: int, min_seconds: float) -> int:
    """How many generations of the batch make a pass of at least ``min_seconds`` (so a small
    model's pass is long enough to time), from one untimed unsteered generation. Fixed per
    scenario: every pass of both sides does the same work."""
    if min_seconds <= 0:
        return 1
    start = time.perf_counter()
    engine.generate(prompts, max_tokens, None)
    return max(1, math.ceil(min_seconds / (time.perf_counter() - start)))


def run_scenario(engine: Engine, scenario: common.Scenario, prompts, max_tokens: int, pairs: int,
                 log: Callable[[str], None] = print, min_seconds: float = 0.0) -> dict[str, Any]:
    """Alternating passes of one scenario; also checks that steering took effect (greedy
    tokens of steered requests differ from the same requests unsteered)."""
    config = engine.config
    specs = common.scenario_specs(scenario, config.hidden_size, config.num_hidden_layers)
    batch = prompts[: scenario.batch]
    repeats = pass_repeats(engine, batch, max_tokens, min_seconds)
    passes, unsteered_tokens, steered_tokens = [], None, None
    for index, kind in enumerate(common.alternation(pairs)):
        record, tokens = timed_pass(engine, batch, max_tokens, specs if kind == common.STEERED else None, kind, index,
                                    repeats)
        passes.append(record)
        if kind == common.UNSTEERED:
            unsteered_tokens = tokens
        else:
            steered_tokens = tokens
    rows = [i for i, spec in enumerate(specs) if spec is not None]
    changed = sum(unsteered_tokens[i] != steered_tokens[i] for i in rows)
    summary = common.summarize(passes)
    result = {
        "scenario": scenario.as_dict(),
        "passes": passes,
        "repeats": repeats,
        **summary,
        "spread": {kind: common.spread(passes, kind) for kind in (common.UNSTEERED, common.STEERED)},
        "steered_requests_changed": f"{changed}/{len(rows)}",
    }
    iqr = summary["ratio_iqr"]["output_tok_s"]
    log(f"  {scenario.label}: unsteered {summary['median'][common.UNSTEERED]['output_tok_s']:.1f} tok/s, "
        f"steered {summary['median'][common.STEERED]['output_tok_s']:.1f} tok/s, "
        f"ratio {summary['ratio']['output_tok_s']:.3f} (IQR {iqr[0]:.3f}-{iqr[1]:.3f}; changed {changed}/{len(rows)})")
    return result


def warm_up(engine: Engine, scenario: common.Scenario, prompts, max_tokens: int) -> None:
    """One unsteered and one steered pass (compilation, allocator pools); not recorded."""
    config = engine.config
    specs = common.scenario_specs(scenario, config.hidden_size, config.num_hidden_layers) if engine.steered else None
    engine.generate(prompts[: scenario.batch], min(max_tokens, 4), None)
    engine.generate(prompts[: scenario.batch], min(max_tokens, 4), specs)


def run_stock(engine: Engine, batches: Sequence[int], prompts, max_tokens: int, passes: int,
              log: Callable[[str], None] = print, min_seconds: float = 0.0) -> list[dict[str, Any]]:
    """Stock vLLM (no steerable layers at all), unsteered passes per batch size."""
    results = []
    for batch in sorted(batches):
        repeats = pass_repeats(engine, prompts[:batch], max_tokens, min_seconds)
        records = [timed_pass(engine, prompts[:batch], max_tokens, None, common.UNSTEERED, i, repeats)[0]
                   for i in range(passes)]
        summary = common.summarize(records)
        results.append({"batch": batch, "passes": records, **summary})
        log(f"  stock vLLM b{batch}: {summary['median'][common.UNSTEERED]['output_tok_s']:.1f} tok/s")
    return results
