"""The original notebook's method: plain transformers with forward hooks.

A post-hook on decoder layer ``L`` (``model.model.layers[L]``; a multimodal model's
language model's) edits that layer's output (the residual stream),
one operation after another: the adds, then each clamp/ablate/range/feature_clamp in the order given. It is
the oracle the engine is tested against and the baseline the benchmarks beat. It applies
each op on its own (no pre-summed rows), so it does not share the engine's table logic.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from vllm_steer.core.plan import ResolvedSteering, unit

NEVER = torch.iinfo(torch.int64).max


def phase_bounds(apply_to: str, prompt_len: int) -> tuple[int, int]:
    """Positions [lo, hi) a spec steers: prompt tokens, generated tokens, or all."""
    return {"all": (0, NEVER), "prompt": (0, prompt_len), "generated": (prompt_len, NEVER)}[apply_to]


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each chosen token under the raw logits


def layer_ops(steering: ResolvedSteering, layer: int, vectors: dict[str, np.ndarray], dtype: torch.dtype):
    """The ops of one layer in application order (adds, then clamps/ablates/ranges as given),
    each with its vector (unit when the op normalizes)."""
    ops = [op for op in steering.ops if op.layer == layer]
    ordered = [op for op in ops if op.mode == "add"] + [op for op in ops if op.mode != "add"]
    prepared = []
    for op in ordered:
        vector = torch.from_numpy(vectors[op.digest].copy())
        encoder = None if op.probe is None else torch.from_numpy(vectors[op.probe[0]].copy()).to(dtype)
        prepared.append((op, (unit(vector) if op.normalize else vector).to(dtype), encoder))
    return prepared


def steer_stream(hidden: torch.Tensor, prepared, inside: torch.Tensor) -> torch.Tensor:
    """Apply ops one after another to the residual stream; ``inside`` (0/1 per token) masks
    tokens outside the steered phase."""
    for op, vector, encoder in prepared:
        if op.mode == "add":
            change = op.coeff * vector
        elif op.mode == "feature_clamp":
            # The SAE's activation of the feature becomes coeff: h += (t - a(h)) d.
            _, offset, threshold = op.probe
            pre = (hidden * encoder).sum(-1, keepdim=True) + offset
            active = torch.where(pre > threshold, pre, torch.zeros_like(pre))
            change = (op.coeff - active) * vector
            if op.only_active:
                change = change * (active > 0)
        else:
            along = (hidden * vector).sum(-1, keepdim=True)
            if op.mode == "range":
                lo, hi = op.bounds
                change = (along.clamp(min=lo, max=hi) - along) * vector
            else:
                change = ((op.coeff if op.mode == "clamp" else 0.0) - along) * vector
        hidden = hidden + inside * change
    return hidden


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (or of a multimodal model's language model)."""
    return model.get_decoder().layers


@contextmanager
def edit_layer_outputs(model, edits: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Inside the block, decoder layer ``L``'s output stream ``h`` becomes
    ``edits[L](h, position_ids)`` (a forward hook, as the notebook did); removed even on error."""
    handles = []
    for layer, edit in edits.items():

        def hook(module, args, kwargs, output, edit=edit):
            hidden = edit(output[0] if isinstance(output, tuple) else output, kwargs["position_ids"])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(decoder_layers(model)[layer].register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def phase_mask(positions: torch.Tensor, apply_to: str, prompt_len: int, dtype: torch.dtype) -> torch.Tensor:
    lo, hi = phase_bounds(apply_to, prompt_len)
    return ((positions >= lo) & (positions < hi)).unsqueeze(-1).to(dtype)


class ReferenceSteerer:
    def __init__(self, model, vectors: dict[str, np.ndarray]):
        """``model``: a transformers causal LM; ``vectors``: digest -> float32 array."""
        self.model = model
        self.vectors = vectors

    @contextmanager
    def hooks(self, steering: ResolvedSteering | None, prompt_len: int) -> Iterator[None]:
        """Steer every forward pass inside the block; hooks are removed even on error."""
        if steering is None:
            yield
            return
        edits = {}
        for layer in sorted({op.layer for op in steering.ops}):
            prepared = layer_ops(steering, layer, self.vectors, self.model.dtype)

            def edit(hidden, positions, prepared=prepared):
                return steer_stream(hidden, prepared, phase_mask(positions, steering.apply_to, prompt_len, hidden.dtype))

            edits[layer] = edit
        with edit_layer_outputs(self.model, edits):
            yield

    @torch.inference_mode()
    def generate(
        self,
        prompt_token_ids: list[int],
        steering: ResolvedSteering | None,
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
    ) -> ReferenceOutput:
        """Greedy decoding of one prompt, as the notebook does (no EOS stop)."""
        from transformers import DynamicCache  # transformers: ~2 s beyond torch; only generate needs it (the tests' oracle math does not)

        ids = torch.tensor([prompt_token_ids])
        seen = set(prompt_token_ids)
        tokens, logprobs = [], []
        with self.hooks(steering, len(prompt_token_ids)):
            cache = DynamicCache()
            logits = self.model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
            for _ in range(max_new_tokens):
                raw = torch.log_softmax(logits.float(), dim=-1)
                scores = logits.float().clone()
                if repetition_penalty != 1.0 and seen:
                    index = torch.tensor(sorted(seen))
                    picked = scores[index]
                    scores[index] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
                token = int(torch.argmax(scores))
                tokens.append(token)
                logprobs.append(float(raw[token]))
                seen.add(token)
                logits = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
        return ReferenceOutput(tokens, logprobs)
