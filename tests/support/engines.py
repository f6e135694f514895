"""Where the tests' files live, and how they start engines."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
API_KEY = "test-key"  # the session server's (and other test servers')

# Features of the notebook-style vector file: (layer, feature_id).
FEATURES = [(1, 7), (2, 42), (3, 5)]
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=8, kv_cache_memory_bytes=1 << 26, seed=0)
# Model Runner V2 runs on CPU through Triton's interpreter: ~40x slower per decode step.
GENERATION_LENGTH = {"v1": 12, "v2": 5}


@contextmanager
def scoped_environ(values: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_engine(model: Path, vector_file: Path, env: dict[str, str] | None = None, **overrides):
    from vllm_steer import SteeredLLM

    with scoped_environ(env or {}):
        return SteeredLLM(model, vectors=[vector_file], **{**ENGINE_ARGS, **overrides})


def serve(tiny_model, feature_file, registry_dir, *extra: str):
    """Start another server on ``registry_dir`` (a restart, a replica); returns (process, url, log path)."""
    from vllm_steer.lab.launcher import start_server

    log = registry_dir.parent / f"another-server{''.join(extra).replace('--', '-')}.log"
    process, url = start_server(["--model", str(tiny_model), "--vectors", str(feature_file), "--registry-dir", str(registry_dir),
                                 "--api-key", API_KEY, "--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 27),
                                 "--enforce-eager", *extra],  # restarts and the registry are tested, not compilation
                                log, timeout=300)
    return process, url, log
