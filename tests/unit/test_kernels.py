"""The fused Triton kernel (vllm_steer/core/kernels.py) against the layer's eager math
(SteeringLayer.steer), on CPU through Triton's interpreter.

The interpreter is chosen when a kernel is decorated, from ``TRITON_INTERPRET`` (and it
rewrites kernels through their module's globals), so the kernel runs in one subprocess with
the variable set; inputs and outputs travel as a torch.save file and the comparisons run
here, one test per case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks.gpu_check import one_rounding_gap, random_tables, steer_eager

from support import engines

REPO = str(engines.REPO)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
ROWS = 5
# Row 0 (no steering) and row 4 (all zeros) mixed with steered rows 1-3, of which row 2 uses
# only its first direction; token_row is longer than the batch, as the shared buffer is.
TOKEN_ROWS = [0, 1, 2, 3, 0, 2, 1, 4, 1]
UNSTEERED = torch.tensor([row in (0, ROWS - 1) for row in TOKEN_ROWS])
# (directions, hidden, max_block, dtype). Hidden 72 fits one 128-wide block (the row stays in
# registers) and is no multiple of 32 (with max_block 32 the row is swept in 3 blocks, the
# last one masked). The swept path is slow in the interpreter: float32 there, plus one half.
CASES = [(k, 72, 16384, dtype) for k in (0, 1, 4) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
CASES += [(k, 72, 32, torch.float32) for k in (0, 1, 4)] + [(4, 72, 32, torch.bfloat16)]
CASES += [(8, 72, 16384, torch.float32), (8, 72, 32, torch.float32)]  # every kind of direction, only_active too


def case_id(case) -> str:
    k, hidden, block, dtype = case
    return f"K{k}-H{hidden}-block{block}-{str(dtype).removeprefix('torch.')}"


def make_args(case, seed: int) -> list[torch.Tensor]:
    """(hidden, residual, token_row, add, dirs, count) of one case (clamps,
    ranges, some open-ended, and SAE feature clamps: random_tables)."""
    directions, hidden, _, dtype = case
    add, dirs, count = tables = random_tables(ROWS, directions, hidden, "cpu", seed=seed)
    add[ROWS - 1], dirs[:, ROWS - 1], count[ROWS - 1] = 0, 0, 0
    dirs[1:, 2], count[2] = 0, min(directions, 1)  # the pool zeroes the directions a row does not use
    token_row = torch.tensor(TOKEN_ROWS + [3, 3, 3])
    generator = torch.Generator().manual_seed(seed + 1000)
    streams = [(4 * torch.randn(len(TOKEN_ROWS), hidden, generator=generator)).to(dtype) for _ in range(2)]
    return [*streams, token_row, *tables]


# Runs with TRITON_INTERPRET=1: every case, then the op under torch.compile (Dynamo traces
# it whole; aot_eager keeps the test fast, Inductor is exercised by the GPU check).
KERNEL_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from vllm_steer.core.kernels import steer_op, steer_triton, triton_available

    assert triton_available()
    cases = torch.load(sys.argv[1])
    outputs = [steer_triton(*args, max_block=block) for args, block in cases]
    steer_op()  # registered outside the compiled region, as the layer would
    args, block = cases[-1]
    compiled = torch.compile(lambda *args: steer_triton(*args, max_block=block)[0] * 1, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled_outputs = [compiled(args[0][:n], args[1][:n], *args[2:]) for n in (len(args[0]), 3)]
    torch.save({"outputs": outputs, "compiled": compiled_outputs}, sys.argv[2])
""")


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    """Every case through the kernel in one interpreted subprocess."""
    folder = tmp_path_factory.mktemp("kernels")
    inputs = [make_args(case, seed) for seed, case in enumerate(CASES)]
    torch.save([(args, case[2]) for args, case in zip(inputs, CASES)], folder / "in.pt")
    done = subprocess.run(
        [sys.executable, "-c", KERNEL_SCRIPT, str(folder / "in.pt"), str(folder / "out.pt")],
        env={**ENV, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return inputs, torch.load(folder / "out.pt")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(case) for case in CASES])
def test_kernel_matches_layer_math(kernel_run, index):
    inputs, results = kernel_run
    args, (out, reading), (_, _, _, dtype) = inputs[index], results["outputs"][index], CASES[index]
    residual = args[1]
    expected, expected_reading = steer_eager(*args, reading=True)
    # The first direction's reading (a condition's): the same float32 math, summed in another order.
    torch.testing.assert_close(reading, expected_reading, rtol=1e-5, atol=1e-4)
    assert torch.equal(reading[UNSTEERED], torch.zeros(int(UNSTEERED.sum())))
    assert out.dtype == dtype and out.shape == expected.shape
    # Row 0 and all-zero rows hand the residual back bit for bit, in every dtype.
    assert torch.equal(out[UNSTEERED], residual[UNSTEERED])
    if dtype == torch.float32:
        # Equal up to the order of the additions inside the dot products.
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    else:
        # Within one rounding of the output dtype (Triton's interpreter truncates where the
        # GPU and torch round to nearest).
        assert one_rounding_gap(out, expected) <= 1
    assert not torch.equal(out[~UNSTEERED], residual[~UNSTEERED])  # steering did something


def test_compiled_op_matches_eager_kernel(kernel_run):
    """The op traces whole under torch.compile (fullgraph, dynamic token count)."""
    _, results = kernel_run
    full = results["outputs"][-1][0]
    first, fewer = results["compiled"]
    assert torch.equal(first, full)
    assert torch.equal(fewer, full[:3])


def test_import_needs_no_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import vllm_steer.core.kernels as k\n"
        "assert not k.triton_available()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_engine_with_the_triton_kernel_matches_the_notebooks_method(runner, tiny_model, feature_file, hf_model, prompt_ids, gen_len):
    """``steering.kernel: "triton"`` end to end (Triton runs on this CPU only through its
    interpreter, which the V2 test hook turns on)."""
    from support.engines import ENGINE_ARGS, scoped_environ
    from support.helpers import assert_same_tokens_close_logprobs, reference, run
    from vllm_steer import SteeredLLM

    if runner != "v2":
        pytest.skip("Triton runs on a CPU only through its interpreter, which the V2 test hook turns on")
    with scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        llm = SteeredLLM(tiny_model, vectors=[feature_file], hf_overrides={"steering": {"kernel": "triton"}},
                         **{**ENGINE_ARGS, "enforce_eager": True})
    try:
        vector = [((i * 37) % 11 - 5) / 5.0 for i in range(256)]
        specs = [None, {"vectors": [{"vector": vector, "layers": [0, 2], "scale": 6.0},
                                    {"vector": vector[::-1], "layers": [2], "mode": "clamp", "scale": -4.0}]}]
        got = run(llm, [prompt_ids[0]] * 2, specs, gen_len)
        for spec, generation in zip(specs, got):
            assert_same_tokens_close_logprobs(generation, reference(hf_model, llm, prompt_ids[0], spec, gen_len))
        assert got[0].token_ids != got[1].token_ids
    finally:
        llm.shutdown()
