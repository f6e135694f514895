"""The original notebook's method: plain transformers with forward hooks.

A post-hook on ``model.model.layers[L]`` edits that layer's output (the residual stream),
one operation after another: the adds, then each clamp/ablate in the order given. It is
the oracle the engine is tested against and the baseline the benchmarks beat. It applies
each op on its own (no pre-summed rows), so it does not share the engine's table logic.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from vllm_steer.resolve import ResolvedSteering, unit
from vllm_steer.slots import phase_bounds


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each chosen token under the raw logits


class ReferenceSteerer:
    def __init__(self, model, vectors: dict[str, np.ndarray]):
        """``model``: a transformers Llama; ``vectors``: digest -> float32 array."""
        self.model = model
        self.vectors = vectors

    def _vector(self, digest: str, normalize: bool) -> torch.Tensor:
        vector = torch.from_numpy(self.vectors[digest].copy())
        if normalize:
            vector = unit(vector)
        return vector.to(self.model.dtype)

    @contextmanager
    def hooks(self, steering: ResolvedSteering | None, prompt_len: int) -> Iterator[None]:
        """Steer every forward pass inside the block; hooks are removed even on error."""
        if steering is None:
            yield
            return
        by_layer = defaultdict(list)
        for op in steering.ops:
            by_layer[op.layer].append(op)
        lo, hi = phase_bounds(steering.apply_to, prompt_len)
        handles = []
        for layer, ops in by_layer.items():
            ops = [op for op in ops if op.mode == "add"] + [op for op in ops if op.mode != "add"]
            prepared = [(op, self._vector(op.digest, op.normalize)) for op in ops]
            handles.append(
                self.model.model.layers[layer].register_forward_hook(self._hook(prepared, lo, hi), with_kwargs=True)
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(prepared, lo: int, hi: int):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            positions = kwargs["position_ids"]
            inside = ((positions >= lo) & (positions < hi)).unsqueeze(-1).to(hidden.dtype)
            for op, vector in prepared:
                if op.mode == "add":
                    change = op.coeff * vector
                else:
                    target = op.coeff if op.mode == "clamp" else 0.0
                    change = (target - (hidden * vector).sum(-1, keepdim=True)) * vector
                hidden = hidden + inside * change
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    @torch.inference_mode()
    def generate(
        self,
        prompt_token_ids: list[int],
        steering: ResolvedSteering | None,
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
    ) -> ReferenceOutput:
        """Greedy decoding of one prompt, as the notebook does (no EOS stop)."""
        from transformers import DynamicCache

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
