"""Offline Python API: batch generation where every prompt may carry its own steering.

    llm = SteeredLLM("meta-llama/Llama-3.1-8B-Instruct", vectors=["steering_vectors.pt"])
    outs = llm.generate(prompts, SamplingParams(max_tokens=64),
                        steering=[None, {"features": [[11, 74457, 0.128]], "scale": 0.8, "clamp": True}])

It is vLLM's ``LLM`` with the steered architecture selected; every request goes through the
same front-end validation and cache isolation as the server's.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vllm import LLM, SamplingParams

from vllm_steer.core.spec import SteeringError, SteeringSpec
from vllm_steer.discovery import finder
from vllm_steer.discovery.explanations import load_explanations
from vllm_steer.engine import rpc, seam
from vllm_steer.engine.config import hf_overrides
from vllm_steer.engine.families import architecture_for
from vllm_steer.engine.frontend import SteeringFrontend, SteeringRequestError, frontend_of
from vllm_steer.vectors import absolute_source, export_vectors

SpecLike = SteeringSpec | dict[str, Any] | str | None

# The notebook's configuration, with its names and defaults.
NOTEBOOK_CFG: dict[str, Any] = {
    "features": [],
    "reduced_strengths": True,
    "max_new_tokens": 256,
    "temperature": 0.0,
    "repetition_penalty": 1.2,
    "system_prompt": "You are a helpful assistant.",
}


def _spec_key(spec: SpecLike) -> Any:
    """Equal keys are equal specs (JSON text as given; a dict by its JSON); a spec JSON cannot
    write (numpy arrays, say) is its own key."""
    if isinstance(spec, str):
        return spec
    try:
        payload = spec.model_dump(exclude_none=True) if isinstance(spec, SteeringSpec) else spec
        return json.dumps(payload, sort_keys=True)
    except (TypeError, ValueError):
        return id(spec)


class SteeredLLM:
    def __init__(
        self,
        model: str | Path,
        *,
        vectors: Sequence[str | Path] = (),
        sae: Sequence[str] = (),
        max_directions: int = 4,
        steerable_layers: Sequence[int] | None = None,
        capture: bool = False,
        table_budget_mib: float | None = None,
        cfg: dict[str, Any] | None = None,
        **llm_kwargs: Any,
    ):
        """``model``: hub id or local path (a hub id uses ``HF_TOKEN`` as huggingface-hub
        reads it). ``vectors``: files for the registry; ``sae``: SAE decoders whose features
        the ``features`` form may name; ``table_budget_mib``: device memory for steering rows
        (config.py). ``llm_kwargs`` go to ``vllm.LLM``."""
        user_overrides = llm_kwargs.pop("hf_overrides", None)
        overrides = hf_overrides(
            user_overrides,
            architecture=architecture_for(model, user_overrides, llm_kwargs.get("revision")),
            vector_files=tuple(absolute_source(p) for p in vectors),
            sae=tuple(absolute_source(p) for p in sae),
            max_directions=max_directions,
            layers=None if steerable_layers is None else tuple(steerable_layers),
            capture=capture,
            table_budget_mib=table_budget_mib,
        )
        self.llm = LLM(model=str(model), hf_overrides=overrides, **llm_kwargs)
        self.cfg = {**NOTEBOOK_CFG, **(cfg or {})}

    def shutdown(self) -> None:
        """Stop the engine's processes now (otherwise they stop when the interpreter exits)."""
        seam.shutdown_offline(self.llm)

    @property
    def frontend(self) -> SteeringFrontend:
        frontend = frontend_of(seam.offline_input_processor(self.llm))
        assert frontend is not None
        return frontend

    # ---- vectors ----------------------------------------------------------------------
    def register_vector(self, name: str, vector: Any, *, replace: bool = False, source: str = "inline") -> str:
        """Add or replace a named vector (one vector, or ``{layer: vector}``) on the front end
        and every worker; returns its digest. Requests already accepted keep what they had."""
        registration = self.frontend.registration(name, vector, replace=replace, source=source)
        rpc.send(self.llm, registration.worker_call)
        return registration.commit()

    def remove_vector(self, name: str) -> None:
        rpc.send(self.llm, self.frontend.remove_vector(name))

    def export_vectors(self, names: Sequence[str], path: str | Path, **options: Any) -> None:
        """Save registered vectors to ``.safetensors``, ``.gguf`` (llama.cpp control vector) or ``.pt``."""
        export_vectors(self.frontend.registry, list(names), path, **options)

    def steering_stats(self) -> list[dict[str, Any]]:
        """Per worker: the model runner in use, steering slots in use, vectors and arrays held,
        requests whose steering could not be applied, and the per-step config histogram."""
        return rpc.send(self.llm, rpc.stats())

    # ---- generation ---------------------------------------------------------------------
    def _params(self, sampling_params, count: int, steering: SpecLike | Sequence[SpecLike], captures=None) -> list:
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            sampling_params = [sampling_params or SamplingParams()] * count
        listed = not (steering is None or isinstance(steering, (SteeringSpec, dict, str)))
        if not listed:
            steering = [steering] * count
        if len(sampling_params) != count or len(steering) != count:
            raise ValueError(
                f"got {count} prompts, {len(sampling_params)} sampling params and {len(steering)} steering specs"
            )
        steering = self._resolve_all(steering, listed)
        out = []
        for index, (params, spec) in enumerate(zip(sampling_params, steering)):
            params = copy.copy(params)
            extra = dict(params.extra_args or {})
            if spec is not None:
                extra["steering"] = spec
            if captures is not None:
                extra["steering_capture"] = captures[index]
            params.extra_args = extra or None
            out.append(params)
        return out

    def _resolve_all(self, steering: Sequence[SpecLike], listed: bool) -> list[str | None]:
        """Every request's steering, resolved before any request is queued (a bad spec fails
        the whole call, naming its request, with nothing run) and each distinct spec once;
        handed on sealed, as the server's middleware does, so the front-end hook takes it as
        resolved. None: unsteered (no spec, or one that changes nothing)."""
        frontend = self.frontend
        sealed: dict[Any, str | None] = {}
        out = []
        for index, spec in enumerate(steering):
            if spec is None:
                out.append(None)
                continue
            key = _spec_key(spec)
            if key not in sealed:
                try:
                    resolved = frontend.resolve(spec)
                except SteeringError as exc:
                    if listed:  # which request: steering[3].vectors[0].scale
                        exc = SteeringError(exc.reason, f"steering[{index}]{exc.field.removeprefix('steering')}")
                    raise SteeringRequestError(exc) from None
                sealed[key] = None if resolved is None else frontend.seal(resolved)
            out.append(sealed[key])
        return out

    def generate(self, prompts, sampling_params=None, *, steering: SpecLike | Sequence[SpecLike] = None, use_tqdm=True):
        """vLLM's ``generate``; ``steering`` is one spec for all prompts or one per prompt."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = self._params(sampling_params, len(prompts), steering)
        return self.llm.generate(prompts, params, use_tqdm=use_tqdm)

    def chat(self, conversations, sampling_params=None, *, steering: SpecLike | Sequence[SpecLike] = None, use_tqdm=True, **chat_kwargs):
        """vLLM's ``chat`` over many conversations, each with its own steering or none."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        params = self._params(sampling_params, len(conversations), steering)
        return self.llm.chat(conversations, params, use_tqdm=use_tqdm, **chat_kwargs)

    def capture(
        self,
        prompts,
        layers: Sequence[int],
        *,
        reduce: str = "last",
        steering: SpecLike | Sequence[SpecLike] = None,
        use_tqdm: bool = True,
    ) -> list[dict[int, np.ndarray]]:
        """The residual stream after each of ``layers`` for each prompt: the last prompt
        token's (``reduce="last"``) or the mean over prompt tokens (``"mean"``), float32,
        computed by this engine alongside whatever else it runs. Needs ``capture=True``."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        keys = [uuid.uuid4().hex for _ in prompts]
        captures = [{"key": key, "layers": list(layers), "reduce": reduce} for key in keys]
        params = self._params(SamplingParams(max_tokens=1, temperature=0.0), len(prompts), steering, captures)
        self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        return rpc.merge_captures(rpc.send(self.llm, rpc.collect_captures(keys)), keys, list(layers))

    def top_features(
        self,
        prompts,
        *,
        sae: Any = None,
        k: int = 20,
        over: str = "last",
        explanations: Any = None,
        include_bos: bool = False,
        use_tqdm: bool = False,
    ) -> list:
        """The ``k`` most active features of an SAE on each prompt (features.encode): over its
        last token, the mean over its tokens, or per token (``over`` "last", "mean",
        "token"), with activations, and labels when ``explanations`` (a Neuronpedia export's
        path, or features.Explanations) is given. A prompt is text, token ids or a
        conversation (list of messages, rendered with the chat template). ``sae``: a loaded
        SAE's layer or source, another SAE source or a loaded ``vectors.load_sae`` object (its
        layer is captured); None when one SAE is loaded. Needs ``capture=True``."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        prompts = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in prompts]
        given = {"layer": sae} if isinstance(sae, int) else {"sae": sae} if isinstance(sae, str) else {}
        query = finder.FeatureQuery.parse({"prompts": prompts, "k": k, "over": over, "include_bos": include_bos, **given})
        if sae is None or isinstance(sae, (int, str)):
            source = finder.choose_sae(self.frontend.registry, query, load=True)
        else:
            source = sae
        finder.check_sae(self.frontend, source, query)
        tokenizer = finder.optional_tokenizer(self.llm.get_tokenizer)
        plan = finder.plan(tokenizer, query, self.frontend.bos_token_id)
        rows = self.capture([{"prompt_token_ids": p} for p in plan.prefixes()], [source.layer], use_tqdm=use_tqdm)
        if isinstance(explanations, (str, Path)):
            explanations = load_explanations(explanations)
        return finder.results(source, plan, plan.streams([r[source.layer] for r in rows]), query, tokenizer, explanations)

    # ---- the notebook's shape -------------------------------------------------------------
    def notebook_spec(self, scale: float = 1.0, clamp_intensity: bool = False) -> dict[str, Any]:
        return {
            "features": [list(f) for f in self.cfg["features"]],
            "reduced_strengths": self.cfg["reduced_strengths"],
            "scale": scale,
            "clamp": clamp_intensity,
        }

    def generate_chat(
        self,
        chat: list[dict[str, str]],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        steer: bool = False,
        scale: float = 1.0,
        clamp_intensity: bool = False,
    ) -> str:
        """The notebook's ``generate_chat``: missing values come from ``cfg``; the system
        prompt is prepended when the chat has none; the answer is decoded and stripped."""
        if chat and chat[0].get("role") != "system" and self.cfg.get("system_prompt"):
            chat = [{"role": "system", "content": self.cfg["system_prompt"]}, *chat]
        params = SamplingParams(
            max_tokens=max_new_tokens or self.cfg["max_new_tokens"],
            temperature=self.cfg["temperature"] if temperature is None else temperature,
            repetition_penalty=repetition_penalty or self.cfg["repetition_penalty"],
            skip_special_tokens=True,
        )
        spec = self.notebook_spec(scale, clamp_intensity) if steer else None
        output = self.chat([chat], params, steering=spec, use_tqdm=False)[0]
        return output.outputs[0].text.strip()
