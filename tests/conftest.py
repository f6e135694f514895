"""Shared fixtures: a tiny local Llama, a notebook-style vector file, and engines that
live for the whole session (an engine takes ~30 s to start on CPU)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"

# Features of the notebook-style vector file: (layer, feature_id).
FEATURES = [(1, 7), (2, 42), (3, 5)]


def pytest_addoption(parser):
    parser.addoption(
        "--runner",
        choices=["v1", "v2", "both"],
        default="both",
        help="model runner(s) for the engine-level tests (v2 runs on CPU through Triton's interpreter)",
    )


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from vllm_steer.tiny import build_tiny_llama

    # A stable path, so vLLM's compile cache is reused between runs.
    return build_tiny_llama(CACHE / "tiny-llama")


@pytest.fixture(scope="session")
def feature_file(tiny_model) -> Path:
    """A ``steering_vectors.pt`` in the notebook's layout: {(layer, feature_id): tensor}."""
    path = CACHE / "test-vectors" / "steering_vectors.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    torch.save({key: torch.randn(256, generator=generator) for key in FEATURES}, path)
    return path


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    from helpers import PROMPTS

    return [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]


# ---- engines ---------------------------------------------------------------------------
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=8, kv_cache_memory_bytes=1 << 28, seed=0)
V2_HOOK = REPO / "tests" / "v2_on_cpu"
# Model Runner V2 runs on CPU through Triton's interpreter: ~40x slower per decode step.
GENERATION_LENGTH = {"v1": 12, "v2": 5}


def selected_runners(config) -> list[str]:
    choice = config.getoption("--runner")
    return ["v1", "v2"] if choice == "both" else [choice]


def pytest_generate_tests(metafunc):
    if "runner" in metafunc.fixturenames:
        metafunc.parametrize("runner", selected_runners(metafunc.config), scope="session")


def v2_env() -> dict[str, str]:
    """Environment under which new engine processes use Model Runner V2 (test-only hook)."""
    import os

    return {
        "VLLM_STEER_TEST_V2_ON_CPU": "1",
        "VLLM_USE_V2_MODEL_RUNNER": "1",
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(V2_HOOK), os.environ.get("PYTHONPATH")])),
    }


@contextmanager
def scoped_environ(values: dict[str, str]):
    import os

    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_engine(runner: str, model: Path, vector_file: Path, env: dict[str, str] | None = None, **overrides):
    from vllm_steer import SteeredLLM

    with scoped_environ({**(v2_env() if runner == "v2" else {}), **(env or {})}):
        return SteeredLLM(model, vectors=[vector_file], **{**ENGINE_ARGS, **overrides})


@pytest.fixture(scope="session")
def engines(tiny_model, feature_file):
    """engines(runner, **overrides) -> a SteeredLLM, started once per configuration."""
    started: dict = {}

    def get(runner: str = "v1", env: dict[str, str] | None = None, **overrides):
        key = (runner, tuple(sorted((env or {}).items())), tuple(sorted(overrides.items())))
        if key not in started:
            started[key] = start_engine(runner, tiny_model, feature_file, env=env, **overrides)
        return started[key]

    yield get
    for llm in started.values():
        llm.shutdown()
    started.clear()


@pytest.fixture
def llm(engines, runner):
    return engines(runner)


@pytest.fixture
def gen_len(runner) -> int:
    return GENERATION_LENGTH[runner]
