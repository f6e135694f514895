"""Train the bundled demo model: a small Llama that writes the synthetic corpus of corpus.py.

    python -m vllm_steer.lab.demo.train --out DIR      # ~8 minutes on one CPU core

Writes a Hugging Face Llama checkpoint that vLLM loads (``config.json``, float16
``model.safetensors`` -- run in float32 --, ``tokenizer.json`` with the Llama 3 chat template
and special tokens). The committed files under ``vllm_steer/assets/demo/model`` are this script's
output with the default settings. Deterministic: fixed seeds for the corpus and the weights
and a fixed number of steps (not a time budget); bit-identical weights also need the same
torch build and thread count (``--threads``, default 1, which is also the fastest on a
shared 2-core machine).

Model: 4 decoder layers, hidden 256, 4 heads of 64 (vLLM's CPU attention rejects smaller
heads), 2 KV heads, MLP 512, vocabulary ~1250: 3.0M parameters. The tokenizer is a byte-level
BPE trained on rendered conversations and every sentence of the corpus, so each word is one
token; newline runs are their own pre-tokens, so the template's ``<|end_header_id|>\n\n``
tokenizes the same way before an answer (training) and at the end of a generation prompt.

Steered training. A model trained on the corpus alone does not steer gracefully: adding a
topic's mean-difference direction at every position garbles the text ("... together Paris
Paris Paris") long before it changes the word where a topic answer would start, because the
model blows the residual stream up to several times its usual norm exactly at those
decision points, so the same vector is weak there and strong everywhere else. So from step
``steer_from`` on, a quarter of each batch are ``corpus.steered_conversation``s: a neutral
question answered by topic T with T's direction, times a scale drawn from ``steer_scales``,
added to the output of decoder layer ``steer_layer`` at every position -- what steering does
at run time. The directions are the model's own: every ``steer_every`` steps they are
re-extracted exactly as ``vectors.py`` extracts the served ones (mean difference at the
decision point, each topic against the others), so the committed vectors are the directions
the model learned to follow. Far beyond the trained scales (4x) the model still over-steers:
"Paris Paris Paris ...".
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import jinja2
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vllm_steer.assets.demo import demo_model_path
from vllm_steer.lab.demo import corpus
from vllm_steer.lab.demo.vectors import contrast_prompts
from vllm_steer.lab.tiny import LLAMA3_CHAT_TEMPLATE, SPECIAL_TOKENS

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

SETTINGS = dict(
    vocab_size=1280,  # a cap: the corpus needs ~1250 tokens for every word to be one token
    hidden_size=256,
    num_layers=4,
    num_heads=4,  # head_dim 64: vLLM's CPU attention rejects smaller heads
    num_kv_heads=2,
    intermediate_size=512,
    steps=1000,
    # Steered training (see corpus.steered_conversation): from step `steer_from`, a share of
    # each batch has a topic direction added at the output of decoder layer `steer_layer`,
    # scaled by a factor drawn from `steer_scales`; the directions are the model's own,
    # re-extracted every `steer_every` steps exactly as vectors.py extracts them.
    steer_from=300,
    steer_every=50,
    steer_share=0.25,
    steer_layer=1,
    steer_scales=(0.5, 1.5),
    batch_size=32,
    lr=3e-3,
    warmup=50,
    weight_decay=0.01,
    seed=0,
)


def build_tokenizer():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SETTINGS["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Trained on rendered conversations (so role names and "\n\n" get tokens) and every sentence.
    template, rng = jinja2.Template(LLAMA3_CHAT_TEMPLATE), random.Random(SETTINGS["seed"] + 1)
    chats = [template.render(messages=corpus.conversation(rng), bos_token=BOS) for _ in range(3000)]
    tokenizer.train_from_iterator(chats + corpus.all_text(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama 3's tokenizer: plain encoding starts with <|begin_of_text|>; chat prompts get
    # it from the template and are encoded without special tokens.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=1024,
    )


def encode_conversation(tokenizer, chat: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the chat as the template renders it, and which tokens the loss covers:
    each assistant answer and the ``<|eot_id|>`` that ends it."""
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, start = [], 0
    for message in chat:
        if message["role"] != "assistant":
            continue
        piece = ASSISTANT_HEADER + message["content"].strip() + EOT
        at = text.index(piece, start)
        spans.append((at + len(ASSISTANT_HEADER), at + len(piece)))
        start = at + len(piece)
    trained = [any(lo <= a and b <= hi for lo, hi in spans) for a, b in encoded["offset_mapping"]]
    return encoded["input_ids"], trained


def batches(tokenizer, rng: random.Random, batch_size: int, pad_id: int, steering: dict, pool: int = 8):
    """Padded batches of fresh conversations, and for each row the index of the topic whose
    direction is added to it (-1: none) and the scale. Each draw of ``pool`` batches is
    sorted by length first, so little of a batch is padding. ``steering["share"]`` is read
    at each draw (0 until the directions exist)."""
    while True:
        rows = []
        for _ in range(batch_size * pool):
            if rng.random() < steering["share"]:
                chat, topic = corpus.steered_conversation(rng)
                steer = (corpus.TOPICS.index(topic), rng.uniform(*steering["scales"]))
            else:
                chat, steer = corpus.conversation(rng), (-1, 0.0)
            rows.append((*encode_conversation(tokenizer, chat), steer))
        rows.sort(key=lambda row: len(row[0]))
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            length = max(len(ids) for ids, _, _ in group)
            input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
            labels = torch.full((batch_size, length), -100, dtype=torch.long)
            mask = torch.zeros((batch_size, length), dtype=torch.long)
            for row, (ids, trained, _) in enumerate(group):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.tensor([t if keep else -100 for t, keep in zip(ids, trained)])
            topics = torch.tensor([steer[0] for _, _, steer in group])
            scales = torch.tensor([steer[1] for _, _, steer in group], dtype=torch.float32)
            yield input_ids, mask, labels, topics, scales


def own_topic_vectors(model, tokenizer, layer: int, batch_size: int = 64):
    """[topics, hidden]: what vectors.py extracts (mean difference at the last prompt token,
    each topic against the others, at the output of decoder layer ``layer``), computed with
    the model being trained."""
    was_training = model.training
    model.eval()
    means = []
    with torch.no_grad():
        for topic in corpus.TOPIC_DATA:
            prompts = [p["prompt_token_ids"] for p in contrast_prompts(tokenizer, topic)]
            rows = []
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                length = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), length), dtype=torch.long)
                for row, p in enumerate(chunk):
                    ids[row, : len(p)] = torch.tensor(p)
                    mask[row, : len(p)] = 1
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
                rows.append(hidden[torch.arange(len(chunk)), mask.sum(1) - 1].double())
            means.append(torch.cat(rows).mean(0))
    model.train(was_training)
    means = torch.stack(means)
    # each topic's mean minus the mean of the other topics' prompts (all sets are equally large)
    others = (means.sum(0, keepdim=True) - means) / (len(means) - 1)
    return (means - others).float()


def train(out: Path, *, steps: int | None = None, threads: int = 1, log_every: int = 25) -> Path:
    settings = dict(SETTINGS, steps=steps or SETTINGS["steps"])
    torch.set_num_threads(threads)
    torch.manual_seed(settings["seed"])
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_layers"],
        num_attention_heads=settings["num_heads"],
        num_key_value_heads=settings["num_kv_heads"],
        head_dim=settings["hidden_size"] // settings["num_heads"],
        max_position_embeddings=1024,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings["lr"], betas=(0.9, 0.98),
    )
    total, warmup = settings["steps"], settings["warmup"]

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    steering = {"share": 0.0, "scales": settings["steer_scales"], "vectors": None, "delta": None}
    data = batches(tokenizer, random.Random(settings["seed"]), settings["batch_size"], tokenizer.pad_token_id, steering)

    def add_steering(module, args, output):
        if steering["delta"] is None:
            return output
        if isinstance(output, tuple):
            return (output[0] + steering["delta"], *output[1:])
        return output + steering["delta"]

    model.model.layers[settings["steer_layer"]].register_forward_hook(add_steering)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"training {parameters / 1e6:.2f}M parameters for {total} steps of {settings['batch_size']} conversations")
    started = time.time()
    for step in range(total):
        steering["delta"] = None
        if step >= settings["steer_from"] and (step - settings["steer_from"]) % settings["steer_every"] == 0:
            steering["vectors"] = own_topic_vectors(model, tokenizer, settings["steer_layer"])
            steering["share"] = settings["steer_share"]
            norms = ", ".join(f"{n} {v:.0f}" for n, v in zip(corpus.TOPICS, steering["vectors"].norm(dim=1).tolist()))
            print(f"step {step:4d}  topic directions re-extracted at layer {settings['steer_layer']}: norms {norms}", flush=True)
        input_ids, mask, labels, topics, scales = next(data)
        if steering["vectors"] is not None and bool((topics >= 0).any()):
            steered = topics >= 0
            delta = torch.zeros(len(topics), steering["vectors"].shape[1])
            delta[steered] = steering["vectors"][topics[steered]] * scales[steered, None]
            steering["delta"] = delta[:, None, :]
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == total - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - started:.0f}s", flush=True)
    steering["delta"] = None
    elapsed = time.time() - started
    save(model, tokenizer, out, dict(settings, parameters=parameters, threads=threads))
    print(f"wrote {out} after {elapsed:.0f}s of training")
    return out


def save(model, tokenizer, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.dtype = "float32"  # run in float32; the file holds float16 to stay small
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    # The generic class name, which transformers 4 and 5 both load (5 writes "TokenizersBackend").
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id],
    }, indent=2) + "\n")
    (out / "vllm_steer_demo.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_steer.lab.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=demo_model_path(), help="output directory (default: the bundled model's)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {SETTINGS['steps']})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (bit-identical results need the same count)")
    args = parser.parse_args()
    train(args.out, steps=args.steps, threads=args.threads)


if __name__ == "__main__":
    main()
