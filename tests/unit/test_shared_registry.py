"""Replicas sharing one registry directory, without an engine: what one front end registers
another resolves by name at once, carrying the content its workers lack; the workers catch
up through ``worker_updates``; the directory keeps only what some name points at."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_steer.core.plan import ResolvedSteering
from vllm_steer.core.registry import VectorRegistry
from vllm_steer.core.spec import SteeringError, vector_digest
from vllm_steer.engine.families import FAMILIES
from vllm_steer.engine.frontend import SteeringFrontend, prepare_request, steering_salt
from vllm_steer.vectors.store import RegistryStore

ARCHITECTURE = FAMILIES["LlamaForCausalLM"].steered
SPEC = {"vectors": [{"name": "x", "layers": [1], "scale": 2.0}]}


def replica(registry_dir) -> SteeringFrontend:
    config = SimpleNamespace(num_hidden_layers=4, hidden_size=8, architectures=[ARCHITECTURE], steering={"registry_dir": str(registry_dir)})
    return SteeringFrontend(config)


def register(frontend: SteeringFrontend, name: str, vector, replace: bool = False) -> str:
    """A registration as the server runs it (the push to the workers is not simulated)."""
    return frontend.registration(name, vector, replace=replace, source="test").commit()


def wire_of(frontend: SteeringFrontend, spec: dict, prompt_len: int = 3):
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"steering": spec}), cache_salt=None,
                              prompt_token_ids=list(range(prompt_len)))
    prepare_request(frontend, request)
    return ResolvedSteering.from_wire(request.sampling_params.extra_args["steering"]), request.cache_salt


def objects(registry_dir) -> set[str]:
    return {path.stem for path in (registry_dir / "objects").glob("*.f32")}


def test_a_name_registered_on_one_replica_steers_on_another_at_once(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    vector = np.arange(1, 9, dtype=np.float32)
    register(a, "x", vector)
    on_a, salt_a = wire_of(a, SPEC)
    on_b, salt_b = wire_of(b, SPEC)  # b's workers were never given x
    digest = vector_digest(vector)
    assert on_a.inline == {}  # a pushed it: its workers hold it, the request names it by digest
    assert set(on_b.inline) == {digest} and on_b.inline[digest].tobytes() == vector.tobytes()
    # The same steering, so the same fingerprint and cache salt on every replica.
    assert on_a == on_b and on_a.fingerprint == on_b.fingerprint and salt_a == salt_b == steering_salt(on_a.fingerprint, None)


def test_the_workers_catch_up_and_then_requests_name_the_digest(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    register(a, "x", np.ones(8, np.float32))
    updates = b.worker_updates()
    assert [call.op for call, _ in updates] == ["add_vector"] and updates[0][0].args[0] == "x"
    updates[0][1]()  # the workers ran it
    assert b.worker_updates() == [] and wire_of(b, SPEC)[0].inline == {}
    # A replacement elsewhere: carried again until pushed; a deletion: removed, and refused.
    register(a, "x", np.full(8, 2.0, np.float32), replace=True)
    assert set(wire_of(b, SPEC)[0].inline) == {vector_digest(np.full(8, 2.0, np.float32))}
    for _, done in b.worker_updates():
        done()
    a.remove_vector("x")
    assert [(call.op, call.args) for call, _ in b.worker_updates()] == [("remove_vector", ("x",))]
    with pytest.raises(SteeringError, match="unknown vector 'x'"):
        b.resolve(SPEC)


def test_content_some_other_name_holds_is_not_carried(tmp_path):
    """The workers hold content by digest: another pushed name with the same vector suffices."""
    a, b = replica(tmp_path), replica(tmp_path)
    register(b, "y", np.ones(8, np.float32))
    register(a, "x", np.ones(8, np.float32))
    assert wire_of(b, SPEC)[0].inline == {}


def test_the_directory_keeps_only_what_a_name_points_at(tmp_path):
    a = replica(tmp_path)
    first, second, kept = (np.full(8, value, np.float32) for value in (1.0, 2.0, 3.0))
    register(a, "x", first)
    register(a, "kept", kept)
    register(a, "x", second, replace=True)
    assert objects(tmp_path) == {vector_digest(v).removeprefix("sha256:") for v in (second, kept)}
    a.remove_vector("x")
    assert objects(tmp_path) == {vector_digest(kept).removeprefix("sha256:")}
    # A restart finds what is left, by the same digest.
    assert replica(tmp_path).registry.entry_digest("kept") == a.registry.entry_digest("kept")


def test_a_reader_of_an_older_names_file_reads_it_again(tmp_path, monkeypatch):
    """Another process pruned the object the names file this one read pointed at."""
    a = replica(tmp_path)
    register(a, "x", np.ones(8, np.float32))
    stale = RegistryStore(tmp_path)._read_names()
    register(a, "x", np.full(8, 2.0, np.float32), replace=True)  # prunes ones(8)
    store, registry = RegistryStore(tmp_path), VectorRegistry()
    reads = iter([stale])
    real = store._read_names
    monkeypatch.setattr(store, "_read_names", lambda: next(reads, None) or real())
    store.refresh(registry)
    assert registry.vector("x").tobytes() == np.full(8, 2.0, np.float32).tobytes()
