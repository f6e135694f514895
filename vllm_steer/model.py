"""Steerable decoder layers and steered models, for any vLLM decoder family whose layers
return ``(hidden, residual)`` with the residual stream ``hidden + residual`` (vLLM's fused
add+norm convention; ``families.py`` lists the families this holds for, and builds their
``Steered<Architecture>`` classes from ``SteeredModel``).

Each steerable layer owns persistent tables with one row per slot (row 0 stays zero: no
steering) and reads the shared per-token ``token_slot`` index the step writer fills. The
math has no data-dependent branch, so it runs unchanged eagerly, under torch.compile and
inside CUDA graphs, and costs the same however many distinct configs share a batch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from vllm_steer import touchpoints
from vllm_steer.config import SteeringConfig
from vllm_steer.slots import SteeringRuntime


class SteeringLayer:
    """Mixed in before a vLLM decoder layer class: its output stream may be steered per
    token, and recorded (capture)."""

    max_directions: int | None = None  # None: not steerable (set by attach_steering)
    captures = False  # set by attach_capture

    def attach_steering(self, token_slot: torch.Tensor, num_slots: int, max_directions: int, hidden: int) -> None:
        # Non-persistent: the weight loader skips them. Allocated once, written in place.
        self.register_buffer("token_slot", token_slot, persistent=False)
        self.register_buffer("steer_add", torch.zeros(num_slots, hidden), persistent=False)
        self.register_buffer("steer_dirs", torch.zeros(max_directions, num_slots, hidden), persistent=False)
        self.register_buffer("steer_target", torch.zeros(max_directions, num_slots, 1), persistent=False)
        self.max_directions = max_directions

    def attach_capture(self, token_slot: torch.Tensor, token_weight: torch.Tensor, num_slots: int, hidden: int) -> None:
        self.register_buffer("capture_slot", token_slot, persistent=False)
        self.register_buffer("capture_weight", token_weight, persistent=False)
        self.register_buffer("capture_sum", torch.zeros(num_slots, hidden, dtype=torch.float32), persistent=False)
        self.captures = True

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(*args, **kwargs)
        if self.max_directions is not None:
            residual = self.steer(hidden_states, residual)
        if self.captures:
            self.capture(hidden_states + residual)
        return hidden_states, residual

    def capture(self, stream: torch.Tensor) -> None:
        """Add each token's stream, weighted, into its request's capture row."""
        count = stream.shape[0]
        weighted = stream.float() * self.capture_weight[:count].unsqueeze(-1)
        self.capture_sum.index_add_(0, self.capture_slot[:count], weighted)

    def steer(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The stream after this layer is ``hidden + residual``; return the new residual.

        Adds first, then each clamp/ablate direction projects the current stream in order:
        ``x <- x + (target - <x, d>) d``. Rows of slot 0 and unused directions are zero, so
        the delta is exactly 0 and unsteered tokens keep ``residual`` bit for bit.
        """
        slot = self.token_slot[: hidden.shape[0]]
        delta = self.steer_add[slot]
        if self.max_directions:
            stream = hidden + residual
            for k in range(self.max_directions):
                direction = self.steer_dirs[k][slot]
                along = ((stream + delta) * direction).sum(dim=-1, keepdim=True)
                delta = delta + (self.steer_target[k][slot] - along) * direction
        # A new tensor: the next layer's fused add+norm may write its inputs in place.
        return residual + delta


@functools.cache
def steerable_class(layer_class: type[nn.Module]) -> type[nn.Module]:
    return type(f"Steerable{layer_class.__name__}", (SteeringLayer, layer_class), {"__module__": __name__})


def make_steerable(layer: nn.Module) -> nn.Module:
    """Turn a built vLLM decoder layer into its steerable subclass, in place. Swapping the
    class (rather than wrapping the module) keeps every parameter name, so vLLM's weight
    loader, quantization and compilation see the layer they expect."""
    if not isinstance(layer, SteeringLayer):
        layer.__class__ = steerable_class(type(layer))
    return layer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM causal LM, or of a multimodal model's language model."""
    language_model = model.get_language_model() if hasattr(model, "get_language_model") else model
    return language_model.model.layers


class SteeredModel:
    """Mixed in before a vLLM ``...ForCausalLM`` class (see families.py): after vLLM builds
    the model, its steerable layers get their tables and the workers their hooks."""

    family = None  # the families.Family this class steers, set by families.py

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_config
        # hf_overrides replaced the architecture name, never model_type: the checkpoint's own.
        self.family.check_model_type(getattr(hf_config, "model_type", None))
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = SteeringConfig.from_hf_config(hf_config)
        shape = settings.model_shape(hf_config)
        scheduler = vllm_config.scheduler_config
        # Pipeline parallel: layers of other ranks are placeholders and get no tables.
        local_layers = {
            index: make_steerable(layer)
            for index, layer in enumerate(decoder_layers(self))
            if index in shape.steerable_layers and not touchpoints.is_missing_layer(layer)
        }
        self.steering = SteeringRuntime(
            shape=shape,
            registry=settings.load_registry(hf_config),
            layers=local_layers,
            num_slots=scheduler.max_num_seqs + 1,
            max_tokens=scheduler.max_num_batched_tokens,
            capture=settings.capture,
        )

        from vllm_steer import runners

        runners.install_worker_hooks()

    @classmethod
    def get_model_state_cls(cls):
        """Model Runner V2's per-model hook: our ModelState writes the steering slots."""
        from vllm_steer.runners import steering_model_state_cls

        return steering_model_state_cls()

