"""The model families vllm-steer steers, and how a model's own config picks its steered class.

Every family here builds decoder layers that return ``(hidden, residual)`` whose sum is the
residual stream: what a forward hook on the HF model's ``model.layers[L]`` sees as output,
the stream SAEs and Neuronpedia features are trained on (Gemma's extra norms sit inside the
layer, before the residual add, so this holds for Gemma too). A family with that convention
is one entry in ``FAMILIES``.

A steered class is ``Steered<Architecture>``: vLLM's class with ``steered_model.SteeredModel`` mixed
in, built on first use as ``vllm_steer.engine.families:Steered<Architecture>`` (the plugin registers
every one by name). An engine selects it with
``hf_overrides={"architectures": ["Steered<Architecture>"]}``; ``SteeredLLM`` and the
``vllm-steer`` commands read the architecture from the model's own ``config.json``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEERED = "Steered"


class UnsupportedModel(ValueError):
    """A model of a family vllm-steer cannot steer, or a checkpoint given the wrong family."""


@dataclass(frozen=True)
class Family:
    architecture: str  # the HF/vLLM architecture name in config.json
    label: str  # what people call the family
    model_types: tuple[str, ...]  # config.json ``model_type`` of its checkpoints
    vllm_class: str  # "module:Class" of vLLM's implementation

    @property
    def steered(self) -> str:
        return STEERED + self.architecture

    def check_model_type(self, model_type: str | None) -> None:
        """Refuse a checkpoint of another family: its weights would load into the wrong
        layers (or not load), and it would generate something other than the model."""
        if model_type not in self.model_types:
            raise UnsupportedModel(
                f"{self.steered} steers {self.label} checkpoints (model_type {' or '.join(self.model_types)}), "
                f"but this checkpoint's model_type is {model_type!r}: {_suggestion(model_type)}"
            )


FAMILIES: dict[str, Family] = {
    family.architecture: family
    for family in (
        Family("LlamaForCausalLM", "Llama (Llama 3.x, SmolLM)", ("llama",), "vllm.model_executor.models.llama:LlamaForCausalLM"),
        Family("MistralForCausalLM", "Mistral", ("mistral",), "vllm.model_executor.models.mistral:MistralForCausalLM"),
        Family("Qwen2ForCausalLM", "Qwen2 / Qwen2.5", ("qwen2",), "vllm.model_executor.models.qwen2:Qwen2ForCausalLM"),
        Family("Qwen3ForCausalLM", "Qwen3", ("qwen3",), "vllm.model_executor.models.qwen3:Qwen3ForCausalLM"),
        Family("Qwen3MoeForCausalLM", "Qwen3-MoE", ("qwen3_moe",), "vllm.model_executor.models.qwen3_moe:Qwen3MoeForCausalLM"),
        Family("MixtralForCausalLM", "Mixtral", ("mixtral",), "vllm.model_executor.models.mixtral:MixtralForCausalLM"),
        Family("Gemma2ForCausalLM", "Gemma 2", ("gemma2",), "vllm.model_executor.models.gemma2:Gemma2ForCausalLM"),
        Family("Gemma3ForCausalLM", "Gemma 3 (text, 270M/1B)", ("gemma3_text",), "vllm.model_executor.models.gemma3:Gemma3ForCausalLM"),
        Family(
            "Gemma3ForConditionalGeneration", "Gemma 3 (4B and up: its language model's layers)", ("gemma3",),
            "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration",
        ),
        Family("Phi3ForCausalLM", "Phi-3", ("phi3",), "vllm.model_executor.models.phi3:Phi3ForCausalLM"),
    )
}


def supported() -> str:
    return "; ".join(f"{family.label}: {family.architecture}" for family in FAMILIES.values())


def family_of(architecture: str) -> Family | None:
    """The family of an architecture name, steered or not."""
    return FAMILIES.get(architecture.removeprefix(STEERED))


def is_steered(architectures: list[str] | None) -> bool:
    return any(name.startswith(STEERED) and family_of(name) is not None for name in architectures or ())


def steered_architecture(config: Mapping[str, Any]) -> str:
    """The steered architecture of a checkpoint, from its ``config.json`` contents."""
    architectures = list(config.get("architectures") or [])
    for name in architectures:
        family = family_of(name)
        if family is not None:
            family.check_model_type(config.get("model_type"))
            return family.steered
    model_type = config.get("model_type")
    found = f"architectures {architectures}" if architectures else "no architectures"
    raise UnsupportedModel(
        f"this model (model_type {model_type!r}, {found}) is not of a family vllm-steer can steer. "
        f"Supported: {supported()}"
    )


def model_config(model: str | Path, revision: str | None = None) -> dict[str, Any]:
    """A model's ``config.json`` contents, from a local folder or the hub (with the
    user's own token, as huggingface-hub reads it)."""
    # ~2 s to import; the CLI reads a config before anything else
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(str(model), revision=revision)
    return config


def architecture_for(model: str | Path, user_overrides: Mapping[str, Any] | None = None, revision: str | None = None) -> str:
    """The steered architecture to serve ``model`` with: its own config's, as the caller's
    ``hf_overrides`` may change it (naming a steered architecture directly is allowed, and
    still checked against the checkpoint)."""
    config = model_config(model, revision)
    named = {key: user_overrides[key] for key in ("architectures", "model_type") if key in (user_overrides or {})}
    return steered_architecture({**config, **named})


def steered_class(family: Family) -> type:
    # imports vLLM: only when vLLM builds the class
    from vllm_steer.engine.steered_model import SteeredModel

    module, name = family.vllm_class.split(":")
    base = getattr(importlib.import_module(module), name)
    return type(family.steered, (SteeredModel, base), {"__module__": __name__, "__qualname__": family.steered, "family": family})


def __getattr__(name: str) -> type:
    """``vllm_steer.engine.families.Steered<Architecture>``, built once on first use (so importing
    this module imports no vLLM model code)."""
    family = family_of(name) if name.startswith(STEERED) else None
    if family is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = steered_class(family)
    return cls


def _suggestion(model_type: str | None) -> str:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return f'its steered architecture is {family.steered} (hf_overrides {{"architectures": ["{family.steered}"]}})'
    return f"no family vllm-steer can steer uses it. Supported: {supported()}"
