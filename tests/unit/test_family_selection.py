"""Which steered class a model gets, from its own config, and the errors for a model or a
vector that does not fit (no engine: these run in the fast tier)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm_steer.engine.families import FAMILIES, UnsupportedModel, architecture_for, family_of, steered_architecture
from vllm_steer.vectors import load_registry

# config.json of real checkpoints, as the hub has them (the fields that matter here).
CHECKPOINTS = {
    "meta-llama/Llama-3.1-8B-Instruct": ("LlamaForCausalLM", "llama"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("LlamaForCausalLM", "llama"),
    "mistralai/Mistral-7B-Instruct-v0.3": ("MistralForCausalLM", "mistral"),
    "Qwen/Qwen2.5-7B-Instruct": ("Qwen2ForCausalLM", "qwen2"),
    "Qwen/Qwen3-8B": ("Qwen3ForCausalLM", "qwen3"),
    "Qwen/Qwen3-30B-A3B": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": ("MixtralForCausalLM", "mixtral"),
    "google/gemma-2-2b-it": ("Gemma2ForCausalLM", "gemma2"),
    "google/gemma-3-1b-it": ("Gemma3ForCausalLM", "gemma3_text"),
    "google/gemma-3-4b-it": ("Gemma3ForConditionalGeneration", "gemma3"),
    "microsoft/Phi-3-mini-4k-instruct": ("Phi3ForCausalLM", "phi3"),
}


@pytest.mark.parametrize("model", CHECKPOINTS)
def test_each_family_gets_its_own_steered_class(model):
    architecture, model_type = CHECKPOINTS[model]
    assert steered_architecture({"architectures": [architecture], "model_type": model_type}) == "Steered" + architecture


def test_an_unsupported_family_gets_one_error_naming_it_and_the_supported_ones():
    with pytest.raises(UnsupportedModel) as error:
        steered_architecture({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    message = str(error.value)
    assert "model_type 'gpt2'" in message and "GPT2LMHeadModel" in message
    assert all(family.architecture in message for family in FAMILIES.values())


def test_a_checkpoint_given_another_familys_class_is_refused(tmp_path):
    """A Qwen2 checkpoint loaded as Llama drops its attention biases and generates other text."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    assert architecture_for(tmp_path) == "SteeredQwen2ForCausalLM"
    with pytest.raises(UnsupportedModel, match=r"SteeredLlamaForCausalLM steers Llama .* model_type is 'qwen2': its steered architecture is SteeredQwen2ForCausalLM"):
        architecture_for(tmp_path, {"architectures": ["SteeredLlamaForCausalLM"]})
    # Naming the right steered class directly is fine.
    assert architecture_for(tmp_path, {"architectures": ["SteeredQwen2ForCausalLM"]}) == "SteeredQwen2ForCausalLM"


def test_steered_classes_subclass_vllms_own():
    import vllm_steer.engine.families as families
    from vllm_steer.engine.steered_model import SteeredModel

    for family in FAMILIES.values():
        try:
            cls = getattr(families, family.steered)
        except ModuleNotFoundError as error:
            # vLLM's Gemma 3 multimodal module imports transformers' image processor, which
            # needs torchvision; this CPU torch has none that works (see the README).
            assert family.architecture == "Gemma3ForConditionalGeneration" and error.name == "torchvision"
            continue
        assert issubclass(cls, SteeredModel) and cls.__mro__[2].__name__ == family.architecture
        assert cls.__name__ == family.steered and cls.family is family
        assert family_of(family.steered) is family
    with pytest.raises(AttributeError):
        families.SteeredGPT2LMHeadModel  # noqa: B018


def test_vectors_and_saes_of_another_size_or_layer_are_refused_at_start(tmp_path):
    vectors = tmp_path / "v.pt"
    torch.save({"happy": {1: torch.ones(64)}}, vectors)
    assert load_registry([str(vectors)], hidden_size=64, num_layers=4).names()
    with pytest.raises(ValueError, match=r"has 64 values; this model's hidden size is 128"):
        load_registry([str(vectors)], hidden_size=128, num_layers=4)
    with pytest.raises(ValueError, match=r"is for layer 1; this model has layers 0-0"):
        load_registry([str(vectors)], hidden_size=64, num_layers=1)

    sae = tmp_path / "layer7.sae.pt"  # Qwen-Scope layout: W_dec [d_model, d_sae]
    torch.save({"W_enc": torch.zeros(32, 64), "W_dec": torch.zeros(64, 32), "b_enc": torch.zeros(32), "b_dec": torch.zeros(64)}, sae)
    assert load_registry(sae=[str(sae)], hidden_size=64, num_layers=8).feature_sources()
    with pytest.raises(ValueError, match=r"has d_model 64; this model's hidden size is 96"):
        load_registry(sae=[str(sae)], hidden_size=96, num_layers=8)
    with pytest.raises(ValueError, match=r"is for layer 7; this model has layers 0-3"):
        load_registry(sae=[str(sae)], hidden_size=64, num_layers=4)
    assert np.isfinite(load_registry(sae=[str(sae)]).feature_sources()[0].feature(0)).all()


def test_the_steered_model_refuses_another_family_and_micro_batching_before_building():
    from types import SimpleNamespace

    from torch import nn

    from vllm_steer.engine.steered_model import SteeredModel

    class Steered(SteeredModel, nn.Module):
        family = FAMILIES["LlamaForCausalLM"]

    def config(model_type: str, ubatching: bool):
        return SimpleNamespace(
            model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type)),
            parallel_config=SimpleNamespace(use_ubatching=ubatching),
        )

    with pytest.raises(UnsupportedModel, match="model_type is 'gemma2': its steered architecture is SteeredGemma2ForCausalLM"):
        Steered(vllm_config=config("gemma2", False))
    with pytest.raises(ValueError, match=r"micro-batching \(--enable-dbo / --ubatch-size > 1\)"):
        Steered(vllm_config=config("llama", True))
