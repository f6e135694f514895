"""Engine throughput, steered vs unsteered, measured side by side in one process.

Passes alternate (unsteered, steered, unsteered, ...) over the same prompts and output
lengths (``ignore_eos``), so the machine's drift cancels; the report is the median of each
and their ratio. Prefix caching is off so no pass reuses another's KV.

    python -m benchmarks.throughput --shape small --batch 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (256, 4, 4, 2, 512, 512),
    "small": (1024, 8, 16, 4, 4096, 32000),
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),  # Llama 3.2 1B's shape
}


def model_path(shape: str) -> Path:
    from vllm_steer.tiny import build_tiny_llama

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    return build_tiny_llama(
        REPO / ".cache" / f"bench-{shape}",
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab,
    )


def steering_specs(count: int, hidden: int, layers: list[int], mode: str, distinct: bool) -> list[dict]:
    generator = np.random.default_rng(0)
    vectors = [generator.standard_normal(hidden).tolist() for _ in range(count if distinct else 1)]
    scale = 4.0 if mode == "add" else 8.0
    return [
        {"vectors": [{"vector": vectors[i % len(vectors)], "layers": layers, "mode": mode, "scale": scale, "normalize": True}]}
        for i in range(count)
    ]


def timed_pass(llm, prompts, params, steering) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, steering=steering, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--model", default=None, help="a real model instead of a generated shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3, help="pairs of (unsteered, steered) passes")
    parser.add_argument("--layers", choices=["one", "all"], default="all")
    parser.add_argument("--mode", choices=["add", "clamp"], default="add")
    parser.add_argument("--shared", action="store_true", help="one spec for all requests (default: each its own vector)")
    parser.add_argument("--capture", action="store_true", help="start the engine with capture buffers on")
    parser.add_argument("--out", default=str(REPO / "bench_results" / "throughput.json"))
    args = parser.parse_args()

    from transformers import AutoConfig
    from vllm import SamplingParams

    from vllm_steer import SteeredLLM

    model = args.model or str(model_path(args.shape))
    config = AutoConfig.from_pretrained(model)
    layers = list(range(config.num_hidden_layers)) if args.layers == "all" else [config.num_hidden_layers // 2]
    llm = SteeredLLM(
        model, dtype=args.dtype, max_num_seqs=args.batch, max_model_len=args.prompt_len + args.max_tokens + 16,
        enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30, seed=0, capture=args.capture,
    )
    generator = np.random.default_rng(1)
    vocab = min(config.vocab_size, 500)
    prompts = [{"prompt_token_ids": generator.integers(10, vocab, args.prompt_len).tolist()} for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    steered = steering_specs(args.batch, config.hidden_size, layers, args.mode, distinct=not args.shared)

    timed_pass(llm, prompts, params, None)  # warm up both paths
    timed_pass(llm, prompts, params, steered)
    results = {"unsteered": [], "steered": []}
    for _ in range(args.passes):
        results["unsteered"].append(timed_pass(llm, prompts, params, None))
        results["steered"].append(timed_pass(llm, prompts, params, steered))
    medians = {k: statistics.median(v) for k, v in results.items()}
    ratio = medians["steered"] / medians["unsteered"]
    report = {"args": vars(args), "model": model, "steered_layers": len(layers), "passes_tok_s": results, "median_tok_s": medians, "ratio": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"| shape | batch | layers | mode | configs | unsteered tok/s | steered tok/s | ratio |")
    print(f"|---|---|---|---|---|---|---|---|")
    configs = 1 if args.shared else args.batch
    print(f"| {args.model or args.shape} | {args.batch} | {len(layers)} | {args.mode} | {configs} | "
          f"{medians['unsteered']:.1f} | {medians['steered']:.1f} | {ratio:.3f} |")
    llm.shutdown()


if __name__ == "__main__":
    main()
