"""The ``vllm.general_plugins`` entry point: vLLM calls ``register`` in every process.

It registers the steered architecture (lazily, by name) and installs the front-end hook
that resolves and salts steered requests. Worker-side hooks are installed by the model
itself when it is built. Idempotent: vLLM may call it more than once per process.
"""

from __future__ import annotations


def register() -> None:
    from vllm_steer import frontend, touchpoints
    from vllm_steer.config import ARCHITECTURE

    touchpoints.register_architecture(ARCHITECTURE, "vllm_steer.model:SteeredLlamaForCausalLM")
    touchpoints.wrap_assign_request_id(frontend.on_new_request)
