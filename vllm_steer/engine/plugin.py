"""The ``vllm.general_plugins`` entry point: vLLM calls ``register`` in every process.

It registers the steered architecture of every family (lazily, by name), installs the front-end hook
that resolves and salts steered requests, and gives the engine core's scheduler the row
budget (a request whose steering rows do not fit waits). Worker-side hooks are installed by the model
itself when it is built. Idempotent: vLLM may call it more than once per process.
"""

from __future__ import annotations


def register() -> None:
    # vLLM resolves this entry point in every process, early; what register installs imports
    # vLLM's engine modules, so it is imported when vLLM calls it.
    from vllm_steer.engine import frontend, scheduler, seam
    from vllm_steer.engine.families import FAMILIES

    for family in FAMILIES.values():
        seam.register_architecture(family.steered, f"vllm_steer.engine.families:{family.steered}")
    seam.wrap_assign_request_id(frontend.on_new_request)
    seam.wrap_scheduler_cls(scheduler.row_budget)
