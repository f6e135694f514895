"""Tiny random-weight decoder models with their own tokenizer, built locally (no hub, no network).

``build_tiny_model(path, family)`` writes a float32 checkpoint of one of the families we steer
(``RECIPES``: Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 text, Phi3, Qwen3-MoE, Mixtral),
each with the family's own quirks switched on (Qwen2's attention biases, Qwen3's q/k norms,
Gemma2's softcapping, Gemma's sliding-window layers, experts for the MoE families), and the
same locally trained BPE tokenizer. ``build_tiny_llama`` is the Llama one. Weights are
random, biases and (for the tied-embedding Gemmas) norm weights included, so a runtime that
dropped one would diverge from transformers.

The tests and the benchmarks' random-weight shapes (``tiny``, ``small``, ``llama-1b``) use
the Llama: it exercises every mechanism (shapes vLLM accepts: head_dim 64, float32) in seconds
on a CPU. Their text is gibberish. The no-argument commands (``vllm-steer serve``, ``sweep``, ...)
use the bundled demo model instead (vllm_steer/assets/demo/), where steering reads well.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = (
    "You are a helpful assistant. Who are you? Tell me a story about the Eiffel Tower in Paris, "
    "the ocean and its waves, cooking pasta and bread, space and the stars, dogs in the park. "
    "Give me three business ideas. The quick brown fox jumps over the lazy dog. "
)


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # tokenizers, transformers: as in build_tiny_model
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


# What differs per family: the transformers config and model classes, the config keywords on
# top of the shared ones (see build_tiny_model), ``layer_pattern``, a sequence of layer types
# repeated over the layers (config ``layer_types``), and ``norm_std``, noise of that standard
# deviation added to every RMSNorm weight. Everything else is the config class's default, as
# in the family's real checkpoints.
#
# ``norm_std`` is for the families whose real checkpoints tie the LM head to the embeddings
# (Gemma; vLLM's Gemma2 always ties). With the norms at their init (identity), a random tied
# model copies its input: the residual stream keeps the input token's embedding direction and
# the tied head scores that token by its squared norm, so greedy decoding repeats one token
# whatever the prompt. Random per-channel norm scales break that alignment.
RECIPES: dict[str, dict] = {
    "llama": dict(config="LlamaConfig", model="LlamaForCausalLM", tie_word_embeddings=False),
    # Mistral 7B v0.2+ / Nemo: no sliding window (MistralConfig's default is 4096).
    "mistral": dict(config="MistralConfig", model="MistralForCausalLM", sliding_window=None),
    # Qwen2's q/k/v projections always carry biases (not a config switch).
    "qwen2": dict(config="Qwen2Config", model="Qwen2ForCausalLM"),
    # Qwen3's per-head q_norm/k_norm are always there.
    "qwen3": dict(config="Qwen3Config", model="Qwen3ForCausalLM"),
    # Softcapping as in the real Gemma2. query_pre_attn_scalar 256 != head_dim 64, so a runtime
    # that scaled by head_dim would diverge. A window of 32 makes prompts of ~40 tokens slide.
    "gemma2": dict(
        config="Gemma2Config", model="Gemma2ForCausalLM",
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        sliding_window=32, layer_pattern=("sliding_attention", "full_attention"), norm_std=2.0,
    ),
    # Gemma3 text-only; its sliding and full layers use different RoPE bases (config default).
    "gemma3": dict(
        config="Gemma3TextConfig", model="Gemma3ForCausalLM", query_pre_attn_scalar=256,
        sliding_window=32, layer_pattern=("sliding_attention", "sliding_attention", "full_attention"),
        norm_std=2.0,
    ),
    "phi3": dict(config="Phi3Config", model="Phi3ForCausalLM"),
    "qwen3_moe": dict(
        config="Qwen3MoeConfig", model="Qwen3MoeForCausalLM",
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
    ),
    # Each expert's FFN has intermediate_size.
    "mixtral": dict(config="MixtralConfig", model="MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
}


def build_tiny_model(
    path: str | Path,
    family: str = "llama",
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a float32 checkpoint of ``family`` (a key of ``RECIPES``) and the tokenizer to
    ``path``, skipped if the same family and settings are already there."""
    import torch  # torch and transformers: ~4.5 s; RECIPES and the template are read without them
    import transformers

    if family not in RECIPES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(RECIPES)}")
    spec = dict(RECIPES[family])
    config_cls = getattr(transformers, spec.pop("config"))
    model_cls = getattr(transformers, spec.pop("model"))
    pattern = spec.pop("layer_pattern", None)
    norm_std = spec.pop("norm_std", 0.0)
    if pattern is not None:
        spec["layer_types"] = [pattern[i % len(pattern)] for i in range(num_layers)]

    path = Path(path)
    settings = dict(
        family=family, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size, seed=seed,
        recipe=RECIPES[family],  # so an edited table entry rebuilds
    )
    settings = json.loads(json.dumps(settings))  # as the stamp reads back (tuples as lists)
    stamp = path / "vllm_steer_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return path
    path.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # an interrupted rebuild must not pass for the old one
    tokenizer = build_tokenizer(vocab_size)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Larger than the usual 0.02 so logits are peaked: greedy choices then have clear
        # margins, and parity checks are not decided by float rounding.
        initializer_range=0.08,
        dtype="float32",
        **spec,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # init zeroes them (Qwen2's q/k/v): random, so dropping one shows
                param.normal_(0.0, config.initializer_range)
            elif norm_std and name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * norm_std)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(json.dumps(settings))
    return path


def build_tiny_llama(path: str | Path, **settings) -> Path:
    """``build_tiny_model(path, "llama", **settings)``."""
    return build_tiny_model(path, "llama", **settings)
