"""The control plane: named operations that every worker runs, over vLLM's ``collective_rpc``.

A front end (the offline ``SteeredLLM``, each API server) builds a ``WorkerCall`` with the
functions below and sends it with its engine's ``collective_rpc`` (``send`` for ``LLM``,
``send_async`` for ``AsyncLLM``); each worker's ``SteeringRuntime`` runs the method of the
same name. ``Registration`` is the one register flow both share: check at the front end,
push to every worker, then commit, so a name is never visible before the workers hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_steer.core.registry import Vector, vector_to_wire
from vllm_steer.engine import seam

# The worker method (added to vLLM's WorkerBase, see seam.py); it runs core/runtime.py's WORKER_OPS.
RPC_METHOD = "steering_rpc"


@dataclass(frozen=True)
class WorkerCall:
    op: str
    args: tuple = ()

    @property
    def rpc_args(self) -> tuple:
        return (self.op, *self.args)


def add_vector(name: str, vector: Vector, source: str) -> WorkerCall:
    return WorkerCall("add_vector", (name, vector_to_wire(vector), source))


def remove_vector(name: str) -> WorkerCall:
    return WorkerCall("remove_vector", (name,))


def stats() -> WorkerCall:
    return WorkerCall("stats")


def collect_captures(keys: list[str]) -> WorkerCall:
    return WorkerCall("collect_captures", (list(keys),))


def merge_captures(worker_results: list, keys: list[str], layers: list[int]) -> list[dict]:
    """Each key's captured rows ``{layer: float32 array}`` from every worker's
    ``collect_captures`` answer (tensor-parallel ranks hold the same rows; pipeline ranks
    their own layers); RuntimeError when one did not come back whole."""
    merged: dict[str, dict] = {key: {} for key in keys}
    for worker in worker_results:
        for key, rows in worker.items():
            for layer, raw in rows.items():
                merged[key].setdefault(int(layer), np.frombuffer(raw, dtype="<f4").copy())
    missing = [key for key in keys if set(merged[key]) != set(layers)]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(keys)} captures did not come back complete")
    return [merged[key] for key in keys]


def send(llm: Any, call: WorkerCall) -> list:
    """Run ``call`` on every worker of a ``vllm.LLM``; one result per worker."""
    return llm.collective_rpc(RPC_METHOD, args=call.rpc_args)


async def send_async(engine_client: Any, call: WorkerCall) -> list:
    """Run ``call`` on every worker of an ``AsyncLLM`` (the server's engine client), of every
    data-parallel engine it drives; one result per worker."""
    return await seam.collective_rpc_all(engine_client, RPC_METHOD, call.rpc_args)


@dataclass
class Registration:
    """A checked registry change: send ``worker_call`` to the workers, then ``commit()``."""

    frontend: Any  # SteeringFrontend
    name: str
    vector: Vector
    replace: bool
    source: str

    @property
    def worker_call(self) -> WorkerCall:
        return add_vector(self.name, self.vector, self.source)

    def commit(self) -> str:
        """Make the name visible at the front end (and in the shared store); its digest."""
        return self.frontend.commit_vector(self.name, self.vector, source=self.source, replace=self.replace)
