"""vllm-steer: per-request activation steering for stock vLLM."""

from vllm_steer.engine.config import SteeringConfig, hf_overrides
from vllm_steer.engine.families import FAMILIES, UnsupportedModel, architecture_for
from vllm_steer.core.spec import SteeringError, SteeringSpec, VectorEntry, parse_spec

__all__ = [
    "FAMILIES",
    "SteeredLLM",
    "SteeringConfig",
    "SteeringError",
    "SteeringSpec",
    "UnsupportedModel",
    "VectorEntry",
    "architecture_for",
    "hf_overrides",
    "parse_spec",
]


def __getattr__(name: str):
    # Lazy: importing the package must not import vLLM (the plugin entry point imports it).
    if name == "SteeredLLM":
        from vllm_steer.engine.offline import SteeredLLM

        return SteeredLLM
    raise AttributeError(name)
