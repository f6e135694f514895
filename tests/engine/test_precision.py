"""Steering in half precision: float32 tables and math, one cast back, and magnitudes checked
against the served dtype's range. The layer math runs here in bfloat16 against a float64
reference; the engine runs in bfloat16 where this CPU supports it (AVX-512 BF16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from support.engines import ENGINE_ARGS, scoped_environ
from vllm_steer.core.layer import steer
from vllm_steer.core.plan import ModelShape
from vllm_steer.core.resolve import resolve
from vllm_steer.core.rows import Direction, LayerRow, RowPool
from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import VectorRegistry

HIDDEN, TOKENS = 512, 6


def steered_layer(directions: list[tuple[torch.Tensor, float]], add: torch.Tensor | None = None, row: int = 1):
    """One layer's steering, row 1 steered with ``add`` then each (unit direction, target);
    every token reads ``row``: ``(hidden, residual) -> new residual``."""
    pool = RowPool(2, HIDDEN, len(directions))
    clamps = [Direction(direction, direction, target, target) for direction, target in directions]
    pool.acquire(["row"], {"row": LayerRow(torch.zeros(HIDDEN) if add is None else add, clamps)})
    pool.flush()
    token_row = torch.full((TOKENS,), row, dtype=torch.int64)
    return lambda hidden, residual: steer(hidden, residual, token_row, pool.add, pool.dirs, pool.count)


def exact(stream: torch.Tensor, directions, add=None) -> torch.Tensor:
    """The same operations in float64, op by op."""
    x = stream.double() + (0 if add is None else add.double())
    for direction, target in directions:
        d = direction.double()
        x = x + (target - (x * d).sum(-1, keepdim=True)) * d
    return x


def unit(generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    return (v / v.norm()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clamp_and_ablate_in_half_precision_are_one_rounding_from_exact(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(TOKENS, HIDDEN, generator=generator) * 8).to(dtype)
    residual = (torch.randn(TOKENS, HIDDEN, generator=generator) * 30).to(dtype)
    directions = [(unit(generator), 25.0), (unit(generator), 0.0), (unit(generator), -7.5)]
    add = unit(generator) * 40
    new_residual = steered_layer(directions, add)(hidden, residual)
    assert new_residual.dtype == dtype
    expected = exact(hidden.float() + residual.float(), directions, add) - hidden.double()
    # The only error left is the one cast of the new residual to the model's dtype.
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((new_residual.double() - expected).abs() <= ulp).all()


def test_unsteered_tokens_keep_every_bfloat16_bit():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator).to(torch.bfloat16)
    residual = (torch.randn(TOKENS, HIDDEN, generator=generator) * 100).to(torch.bfloat16)
    layer = steered_layer([(unit(generator), 3.0)], unit(generator), row=0)  # every token reads row 0
    assert torch.equal(layer(hidden, residual), residual)


def test_magnitudes_are_checked_against_the_served_dtype():
    registry = VectorRegistry()
    registry.add("v", np.full(HIDDEN, 0.5, np.float32))
    spec = {"vectors": [{"name": "v", "layers": [0], "scale": 2e5}]}
    shape = ModelShape(num_layers=2, hidden_size=HIDDEN, steerable_layers=(0, 1), max_directions=2, dtype="float16")
    with pytest.raises(SteeringError, match="would overflow float16") as error:
        resolve(spec, shape, registry)
    assert error.value.field == "steering.vectors[0].scale"
    assert resolve(spec, ModelShape(2, HIDDEN, (0, 1), 2, dtype="bfloat16"), registry) is not None
    # Each add fits, their sum at one layer does not.
    summed = {"vectors": [{"name": "v", "layers": [1], "scale": 8e4}] * 2}
    with pytest.raises(SteeringError, match="the adds at layer 1 together reach 8e\\+04: the steering would overflow float16"):
        resolve(summed, shape, registry)


@pytest.fixture(scope="module")
def bf16_engines(tiny_model: Path, feature_file: Path):
    """The steered and the stock engine in bfloat16 (eager, in the test process)."""
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512 BF16: vLLM's CPU build runs bfloat16 only with it (the layer math is tested above)")
    from vllm import LLM

    from vllm_steer import SteeredLLM

    args = {**ENGINE_ARGS, "dtype": "bfloat16", "enforce_eager": True, "capture": True}
    with scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        steered = SteeredLLM(tiny_model, vectors=[feature_file], **args)
        args.pop("capture")
        stock = LLM(model=str(tiny_model), **args)
    yield steered, stock
    steered.shutdown()
    stock.llm_engine.engine_core.shutdown()


def test_bfloat16_engine_clamps_to_the_target_and_leaves_unsteered_bits(bf16_engines, prompt_ids, runner, gen_len):
    from support.helpers import generations, greedy, run

    steered, stock = bf16_engines
    direction = np.random.default_rng(4).standard_normal(256)
    direction = (direction / np.linalg.norm(direction)).astype(np.float32)
    target = 12.5
    spec = {"vectors": [{"vector": direction.tolist(), "layers": [1], "mode": "clamp", "scale": target}]}
    stream = steered.capture([{"prompt_token_ids": prompt_ids[2]}], [1], reduce="mean", steering=spec, use_tqdm=False)[0][1]
    # Every prompt token was clamped to the target, so their mean is too, up to the one
    # bfloat16 rounding of the residual (2^-8 relative, spread over the direction).
    assert abs(float(stream @ direction) - target) < 0.05
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    mine = run(steered, prompt_ids, [None] * len(prompt_ids), gen_len)
    theirs = generations(stock.generate(prompts, greedy(gen_len), use_tqdm=False))
    for a, b in zip(mine, theirs):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
