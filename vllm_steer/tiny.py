"""A tiny random-weight Llama with its own tokenizer, built locally (no hub, no network).

The tests and the benchmarks' random-weight shapes (``tiny``, ``small``, ``llama-1b``) use
it: it exercises every mechanism (shapes vLLM accepts: head_dim 64, float32) in seconds on a
CPU. Its text is gibberish. The no-argument commands (``vllm-steer serve``, ``sweep``, ...)
use the bundled demo model instead (vllm_steer/demo/), where steering reads well.
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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


def build_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a float32 Llama checkpoint and tokenizer to ``path`` (skipped if already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    settings = dict(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size, seed=seed,
    )
    stamp = path / "vllm_steer_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
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
        tie_word_embeddings=False,
        # Larger than the usual 0.02 so logits are peaked: greedy choices then have clear
        # margins, and parity checks are not decided by float rounding.
        initializer_range=0.08,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(json.dumps(settings))
    return path

