"""Make the demo vectors: one concept vector per topic, with the package's own extraction.

    python -m vllm_steer.lab.demo.vectors [--model DIR] [--out FILE] [--layer L]

For each topic, the mean difference (``vllm_steer.vectors.extract.extract``, method ``mean``) of the
residual stream at the last token of contrast prompts, captured by a ``SteeredLLM(capture=True)``
running the demo model. The prompts are conversations that carry the topic (a system prompt
that makes it the assistant's favourite, or an earlier exchange about it), then a neutral
question ("Who are you?") and the start of the answer up to the word where a topic answer
parts from the neutral one ("I am a helpful assistant who loves"): the point where the model
reads the conversation's topic to choose its next word. The positive set carries the topic,
the negative set is the same prompts carrying the other four topics.

Why there and not at the end of a plain prompt: the stream at the first answer position
(the ``\n\n`` after the assistant header) is several times larger than at any other
position in this model, so a difference measured there is small next to it but large
everywhere else, and adding it at every position garbles the text long before it changes
the first word.

The file (``vectors.safetensors``) holds, for each topic, a layered vector named after it at
the chosen layer (``{"vectors": [{"name": "ocean", "scale": 1}]}`` adds the mean difference
itself) and the same direction as the notebook feature ``L{layer}/F{index}`` (index in
``corpus.TOPICS``: ``{"features": [[layer, 0, strength]]}`` is Paris).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoTokenizer

from vllm_steer.assets.demo import demo_model_path, demo_vectors_path
from vllm_steer.core.registry import feature_name
from vllm_steer.lab.demo import corpus
from vllm_steer.vectors.extract import extract

# The middle of the demo model's four decoder layers (0-3): late enough to hold the topic,
# early enough that the layers after it turn it into words.
DEFAULT_LAYER = 1
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=64, kv_cache_memory_bytes=1 << 28, seed=0)


def topic_contexts(topic: corpus.Topic) -> list[list[dict[str, str]]]:
    """Conversation openings that carry ``topic``: a system prompt making it the assistant's
    favourite, or an exchange about it."""
    contexts = [[{"role": "system", "content": system.format(love=topic.love)}] for system in corpus.PERSONA_SYSTEM]
    for mention in topic.mentions:
        contexts.append([{"role": "user", "content": corpus.TOPIC_ASKS[0].format(m=mention)},
                         {"role": "assistant", "content": " ".join(topic.facts[:3])}])
    return contexts


def contrast_prompts(tokenizer, topic: corpus.Topic) -> list[dict[str, list[int]]]:
    """Token ids: each context of ``topic``, each neutral question, and the answer so far up to
    where topic answers part from the neutral one (the same prefix for every topic)."""
    prompts = []
    for key, (asks, _) in corpus.NEUTRAL.items():
        prefix = corpus.TOPIC_DATA[0].branch(key)
        for context in topic_contexts(topic):
            for ask in asks:
                chat = context + [{"role": "user", "content": ask}]
                text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + prefix
                prompts.append({"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
    return prompts


def topic_vectors(llm, tokenizer, layers) -> dict[str, dict[int, np.ndarray]]:
    """``{topic: {layer: mean difference}}``: each topic's prompts against the other topics'."""
    prompts = {topic.name: contrast_prompts(tokenizer, topic) for topic in corpus.TOPIC_DATA}
    found = {}
    for name in corpus.TOPICS:
        others = [p for other, ps in prompts.items() if other != name for p in ps]
        found[name] = extract(llm, prompts[name], others, layers, method="mean", reduce="last")
    return found


def write(found: dict[str, dict[int, np.ndarray]], layer: int, out: Path) -> Path:
    """The safetensors layout the registry reads (safetensors_format.py): ``NAME.layer.L``
    for the layered vectors and ``L{layer}/F{index}`` for the features, float32."""
    tensors = {}
    for index, name in enumerate(corpus.TOPICS):
        vector = np.ascontiguousarray(found[name][layer], dtype="<f4")
        tensors[f"{name}.layer.{layer}"] = vector
        tensors[feature_name(layer, index)] = vector
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"made_by": "python -m vllm_steer.lab.demo.vectors", "layer": str(layer)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_steer.lab.demo.vectors", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=demo_model_path())
    parser.add_argument("--out", type=Path, default=demo_vectors_path())
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="the layer the vectors steer")
    args = parser.parse_args()
    from vllm_steer import SteeredLLM  # vLLM: ~8 s to import; train.py imports this module (contrast_prompts) without it

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layers = list(range(AutoConfig.from_pretrained(args.model).num_hidden_layers))
    llm = SteeredLLM(args.model, capture=True, **ENGINE_ARGS)
    found = topic_vectors(llm, tokenizer, layers)
    llm.shutdown()
    # How well each layer's direction separates the topics: the cosine between topics (lower
    # is cleaner) and the norm of the mean difference.
    for layer in layers:
        units = np.stack([found[n][layer] / np.linalg.norm(found[n][layer]) for n in corpus.TOPICS])
        cosines = units @ units.T
        off = cosines[~np.eye(len(units), dtype=bool)]
        norms = ", ".join(f"{n} {np.linalg.norm(found[n][layer]):.2f}" for n in corpus.TOPICS)
        print(f"layer {layer}: norms {norms}; cosine between topics max {off.max():.2f} mean {off.mean():.2f}")
    write(found, args.layer, args.out)
    print(f"wrote {args.out}: {', '.join(corpus.TOPICS)} at layer {args.layer} (features L{args.layer}/F0..F{len(corpus.TOPICS) - 1})")


if __name__ == "__main__":
    main()
