"""SteeredLlamaForCausalLM: vLLM's Llama with steerable decoder layers.

Each steerable layer owns persistent tables with one row per slot (row 0 stays zero: no
steering) and reads the shared per-token ``token_slot`` index the step writer fills. The
math has no data-dependent branch, so it runs unchanged eagerly, under torch.compile and
inside CUDA graphs, and costs the same however many distinct configs share a batch.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from vllm_steer.config import SteeringConfig
from vllm_steer.slots import SteeringRuntime


class SteeredLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama layer whose output residual stream may be steered per token."""

    max_directions: int | None = None  # None: not steerable (set by attach_steering)

    def attach_steering(self, token_slot: torch.Tensor, num_slots: int, max_directions: int) -> None:
        hidden = self.hidden_size
        # Non-persistent: the weight loader skips them. Allocated once, written in place.
        self.register_buffer("token_slot", token_slot, persistent=False)
        self.register_buffer("steer_add", torch.zeros(num_slots, hidden), persistent=False)
        self.register_buffer("steer_dirs", torch.zeros(max_directions, num_slots, hidden), persistent=False)
        self.register_buffer("steer_target", torch.zeros(max_directions, num_slots, 1), persistent=False)
        self.max_directions = max_directions

    captures = False  # set by attach_capture

    def attach_capture(self, token_slot: torch.Tensor, token_weight: torch.Tensor, num_slots: int) -> None:
        self.register_buffer("capture_slot", token_slot, persistent=False)
        self.register_buffer("capture_weight", token_weight, persistent=False)
        self.register_buffer("capture_sum", torch.zeros(num_slots, self.hidden_size, dtype=torch.float32), persistent=False)
        self.captures = True

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(positions, hidden_states, residual)
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


class SteeredLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SteeredLlamaDecoderLayer)
        hf_config = vllm_config.model_config.hf_config
        settings = SteeringConfig.from_hf_config(hf_config)
        shape = settings.model_shape(hf_config)
        scheduler = vllm_config.scheduler_config
        # Pipeline parallel: layers of other ranks are PPMissingLayer and get no tables.
        local_layers = {
            index: layer
            for index, layer in enumerate(self.model.layers)
            if index in shape.steerable_layers and isinstance(layer, SteeredLlamaDecoderLayer)
        }
        self.steering = SteeringRuntime(
            shape=shape,
            registry=settings.load_registry(),
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
