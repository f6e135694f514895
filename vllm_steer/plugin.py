"""The ``vllm.general_plugins`` entry point: vLLM calls ``register`` in every process.

It registers the steered architecture (lazily, by name) and installs the front-end hook
that validates and salts steered requests. Worker-side hooks are installed by the model
itself when it is built. Idempotent: vLLM may call it more than once per process.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from vllm_steer import frontend
    from vllm_steer.config import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_steer.model:SteeredLlamaForCausalLM")
    frontend.install()
