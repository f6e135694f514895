"""Shared fixtures: a tiny local Llama, a notebook-style vector file, and engines that
live for the whole session (an engine takes ~30 s to start on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support.engines import API_KEY, CACHE, FEATURES, GENERATION_LENGTH, scoped_environ, start_engine


V2_FLAG = "VLLM_STEER_TEST_V2_ON_CPU"


def pytest_addoption(parser):
    parser.addoption(
        "--runner",
        choices=["v1", "v2"],
        default="v2" if os.environ.get(V2_FLAG) == "1" else "v1",
        help="model runner of the engine-level tests; v2 runs on CPU through Triton's interpreter and "
        f"needs the test hook active from process start: PYTHONPATH=tests/v2_on_cpu {V2_FLAG}=1 "
        "(see the Makefile). Default: v2 when the hook is active, else v1.",
    )


def pytest_configure(config):
    runner = config.getoption("--runner")
    hook_active = os.environ.get(V2_FLAG) == "1"
    if (runner == "v2") != hook_active:
        raise pytest.UsageError(
            f"--runner {runner} needs {V2_FLAG}={'1' if runner == 'v2' else 'unset'} from process start "
            f"(with PYTHONPATH=tests/v2_on_cpu for v2): the Triton hook must run before vLLM is imported"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"


def pytest_collection_modifyitems(config, items):
    """Tests by cost (markers registered in pyproject.toml): ``runner`` on every test using the
    runner fixture; ``server`` on every test using the server fixture or in a module that
    imports the launcher (it starts servers of its own); ``engine`` on both."""
    from vllm_steer.lab import launcher

    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "runner" in fixtures:
            item.add_marker(pytest.mark.runner)
        if "server" in fixtures or getattr(getattr(item, "module", None), "start_server", None) is launcher.start_server:
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("runner") or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.engine)


def pytest_terminal_summary(terminalreporter, config):
    terminalreporter.write_line(f"engine-level tests ran on Model Runner {config.getoption('--runner').upper()}")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from vllm_steer.lab.tiny import build_tiny_llama

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
    from support.helpers import PROMPTS

    return [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]


# ---- engines ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def runner(pytestconfig) -> str:
    """The model runner this session's engines use ("v1" or "v2")."""
    return pytestconfig.getoption("--runner")


@pytest.fixture(autouse=True)
def keep_the_environment():
    """Each test's changes to os.environ end with it. Commands set process defaults
    (VLLM_CPU_KVCACHE_SPACE=4, VLLM_PLUGINS): leaked, every engine a later test starts would
    take a 4 GiB KV cache (the machine runs out of memory; a cramped engine never preempts)."""
    with scoped_environ({}):
        yield


@pytest.fixture(scope="session")
def engines(tiny_model, feature_file, runner):
    """engines(env=None, **overrides) -> a SteeredLLM, started once per configuration."""
    started: dict = {}

    def get(env: dict[str, str] | None = None, **overrides):
        key = (tuple(sorted((env or {}).items())), tuple(sorted(overrides.items())))
        if key not in started:
            started[key] = start_engine(tiny_model, feature_file, env=env, **overrides)
        return started[key]

    yield get
    for llm in started.values():
        llm.shutdown()
    started.clear()


@pytest.fixture
def llm(engines):
    return engines()


@pytest.fixture(scope="session")
def tp2(engines):
    """Tensor parallel 2 on the two cores, compiled, with capture on."""
    return engines(tensor_parallel_size=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, capture=True)


@pytest.fixture(scope="session")
def gen_len(runner) -> int:
    return GENERATION_LENGTH[runner]


# ---- the server ------------------------------------------------------------------------

@dataclass
class Server:
    url: str
    model: str
    registry_dir: Path
    vector_dir: Path
    log: Path
    pid: int

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def server(tiny_model, feature_file, tmp_path_factory, runner):
    """``vllm-steer serve`` on a free local port, with an API key, a registry directory and a
    directory the registry API may read vector files from."""
    from vllm_steer.lab.launcher import start_server, stop_server

    root = tmp_path_factory.mktemp("server")
    (root / "vectors").mkdir()
    process, url = start_server([
        "--model", str(tiny_model), "--vectors", str(feature_file),
        "--registry-dir", str(root / "registry"), "--vector-dir", str(root / "vectors"),
        "--max-body-bytes", str(4 << 20), "--max-registry-vectors", "16", "--api-key", API_KEY,
        "--max-model-len", "1024", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(1 << 27), "--seed", "0",
    ], root / "server.log", timeout=300)
    yield Server(url, str(tiny_model), root / "registry", root / "vectors", root / "server.log", process.pid)
    stop_server(process, timeout=30)
