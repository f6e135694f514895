"""Steered models: ``SteeredModel`` is mixed into a vLLM ``...ForCausalLM`` class of any
family whose decoder layers return ``(hidden, residual)`` with the residual stream
``hidden + residual`` (vLLM's fused add+norm convention; ``families.py`` lists the families
this holds for and builds their ``Steered<Architecture>`` classes). After vLLM builds the
model, its steerable layers become ``layer.SteeringLayer`` subclasses with slot tables.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vllm_steer.core.kernels import triton_available
from vllm_steer.core.layer import make_steerable
from vllm_steer.core.runtime import SteeringRuntime
from vllm_steer.engine import seam, writers
from vllm_steer.engine.config import SteeringConfig


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM causal LM, or of a multimodal model's language model."""
    language_model = model.get_language_model() if hasattr(model, "get_language_model") else model
    return language_model.model.layers


class SteeredModel:
    """Mixed in before a vLLM ``...ForCausalLM`` class (see families.py): after vLLM builds
    the model, its steerable layers get their tables and the workers their hooks."""

    family = None  # the families.Family this class steers, set by families.py

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        hf_config = seam.model_hf_config(vllm_config)
        # hf_overrides replaced the architecture name, never model_type: the checkpoint's own.
        self.family.check_model_type(getattr(hf_config, "model_type", None))
        if seam.uses_microbatches(vllm_config):
            # Each micro-batch is a slice of the step's tokens, but token_slot always starts at 0.
            raise ValueError("steering does not support micro-batching (--enable-dbo / --ubatch-size > 1): turn it off")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = SteeringConfig.from_hf_config(hf_config)
        if settings.kernel == "triton" and not triton_available():
            raise ValueError("steering.kernel 'triton' needs Triton and a GPU (or Triton's CPU interpreter, TRITON_INTERPRET=1)")
        shape = settings.model_shape(hf_config, seam.model_dtype(vllm_config), seam.device_memory())
        max_num_seqs, max_num_batched_tokens = seam.scheduler_limits(vllm_config)
        # Pipeline parallel: layers of other ranks are placeholders and get no tables.
        local_layers = {
            index: make_steerable(layer)
            for index, layer in enumerate(decoder_layers(self))
            if index in shape.steerable_layers and not seam.is_missing_layer(layer)
        }
        self.steering = SteeringRuntime(
            shape=shape,
            registry=settings.load_registry(hf_config),
            layers=local_layers,
            num_slots=max_num_seqs + 1,
            max_tokens=max_num_batched_tokens,
            capture=settings.capture,
            kernel=settings.kernel,
        )
        writers.install_worker_hooks()

    @classmethod
    def get_model_state_cls(cls):
        """Model Runner V2's per-model hook: our ModelState writes the steering slots."""
        return writers.steering_model_state_cls()

