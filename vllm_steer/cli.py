"""vllm-steer command line (``pip install vllm-steer`` puts it on PATH; ``python launch.py ...``
does the same from a checkout).

    vllm-steer serve                      # the demo model and vectors, OpenAI API on :8000
    vllm-steer serve --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors.pt \\
        --tensor-parallel-size 2 --api-key KEY  # any other vLLM server flag passes through
    vllm-steer generate --prompt "Who are you?" --steering '{"vectors": [{"name": "paris", "scale": 0.8}]}'
    vllm-steer extract --positive happy.txt --negative sad.txt --layers 10 12 --out happy.gguf
    vllm-steer sweep                      # inclusion/fluency vs scale on the demo model (see vllm_steer/lab/sweep.py)
    vllm-steer sweep --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors.pt \\
        --features '[[11, 74457, 0.128]]' --words eiffel,tower,paris
    vllm-steer bench --quick              # steered vs unsteered throughput (see benchmarks/run.py)
    vllm-steer model smollm2              # fetch + convert SmolLM2-135M-Instruct once, print its folder
                                          # (--model smollm2 / --model demo work in every command)
    vllm-steer concepts                   # concept vectors for it (paris, ocean, ..., pirate, sad), cached
    vllm-steer features --model M --sae SAE --prompt "The Eiffel Tower" --explanations np.json --top 20
    vllm-steer features --query eiffel --explanations np.json   # search labels (no engine)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from vllm_steer.assets import concepts as concept_assets
from vllm_steer.assets import models
from vllm_steer.assets.demo import demo_model_path, demo_vectors_path
from vllm_steer.assets.models import ModelUnavailable, is_alias, resolve_model
from vllm_steer.core.spec import SteeringError
from vllm_steer.discovery import load_explanations, search_features
from vllm_steer.discovery.table import features_table, matches_table
from vllm_steer.engine.config import hf_overrides
from vllm_steer.engine.families import UnsupportedModel, architecture_for
from vllm_steer.lab import concepts as concept_lab
from vllm_steer.lab import sweep as sweeps


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped) or a JSON list of strings
    (``vllm_steer.vectors.extract.read_prompts``)."""
    from vllm_steer.vectors.extract import read_prompts  # torch (vllm_steer.vectors): ~2.5 s; --help must not pay it

    return read_prompts(path)


def _steering_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id, local path, or a named model: demo, smollm2 (default: the bundled demo model)")
    parser.add_argument("--vectors", action="append", default=None, metavar="FILE",
                        help="vector file loaded at start: .pt, .safetensors, .gguf, or hf://...; repeatable")
    parser.add_argument("--sae", action="append", default=[], metavar="SOURCE",
                        help="SAE decoder whose features the 'features' form may name; repeatable")
    parser.add_argument("--max-directions", type=int, default=4, help="clamp/ablate/range directions per layer per request")
    parser.add_argument("--steerable-layers", type=int, nargs="+", default=None, help="layers that can be steered (default: all)")
    parser.add_argument("--table-budget-mib", type=float, default=None,
                        help="device memory for steering rows (default: min(256 MiB, 1%% of device memory)); "
                             "requests whose rows do not fit wait")


def _model_and_vectors(args) -> tuple[str, list[str]]:
    """The user's model and vectors, or the bundled demo model and its topic vectors
    (committed under vllm_steer/assets/demo/; ``--vectors`` replaces the demo vectors). A named
    model (``vllm_steer.assets.models``) becomes its local folder; ``--model demo`` is the default.
    ``--model smollm2`` comes with its concept vectors (vllm_steer/assets/concepts: paris, ocean,
    ..., each at its measured layer and scale) unless ``--vectors`` is given."""
    from vllm_steer.vectors import absolute_source  # torch (vllm_steer.vectors): ~2.5 s; --help must not pay it

    if args.model == "demo":  # the same as no --model (its vectors, its short context, its name)
        args.model = None
    if args.model == "smollm2" and args.vectors is None:
        return resolve_model(args.model), [str(concept_assets.concept_files("smollm2")["default"])]
    if args.model is not None:
        return resolve_model(args.model), [absolute_source(v) for v in args.vectors or []]
    return str(demo_model_path()), [absolute_source(v) for v in args.vectors or [demo_vectors_path()]]


def _steered_llm(args, model: str, vectors: list[str], **kwargs):
    """A SteeredLLM with the steering flags (``_steering_args``); the demo's short context
    when no --model is given."""
    from vllm_steer import SteeredLLM  # vLLM: ~8 s to import; only the engine commands need it

    return SteeredLLM(model, vectors=vectors, sae=args.sae, max_directions=args.max_directions,
                      steerable_layers=args.steerable_layers, table_budget_mib=args.table_budget_mib,
                      max_model_len=1024 if args.model is None else None, **kwargs)


def _cpu_defaults(extra: list[str]) -> list[str]:
    """On CPU, vLLM's default memory fraction does not fit small machines: reserve a KV cache
    of a few GiB instead, unless the user chose (vLLM lets VLLM_CPU_KVCACHE_SPACE override
    ``--kv-cache-memory-bytes``, so it is set only without that flag)."""
    import torch  # torch: ~2.5 s; only the engine commands need it

    if torch.cuda.is_available():
        return []
    if not any(a.split("=")[0] in ("--kv-cache-memory-bytes", "--kv_cache_memory_bytes") for a in extra):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    return [] if any(a.startswith("--dtype") for a in extra) else ["--dtype", "float32"]


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm-steer serve", description="vLLM's OpenAI server with steering.")
    _steering_args(parser)
    parser.add_argument("--capture", action="store_true", help="allow capture requests (extraction); costs a little per step")
    parser.add_argument("--registry-dir", default=None,
                        help="directory for run-time registry changes, shared by API server processes and kept "
                             "across restarts (default: a fresh temporary directory)")
    parser.add_argument("--vector-dir", action="append", default=[], metavar="DIR",
                        help="a directory whose files POST /v1/steering/vectors may read; repeatable")
    parser.add_argument("--max-registry-vectors", type=int, default=1024)
    parser.add_argument("--max-body-bytes", type=int, default=16 << 20)
    # vLLM's own flags, read here too: the steered architecture depends on them.
    parser.add_argument("--revision", default=None, help="(vLLM) the model revision")
    parser.add_argument("--hf-overrides", type=json.loads, default=None, help="(vLLM) JSON; merged with the steering settings")
    args, passthrough = parser.parse_known_args(argv)
    model, vectors = _model_and_vectors(args)
    from vllm_steer.vectors import absolute_source  # torch (vllm_steer.vectors): ~2.5 s; --help must not pay it

    registry_dir = args.registry_dir or tempfile.mkdtemp(prefix="vllm-steer-registry-")
    overrides = hf_overrides(
        args.hf_overrides,
        architecture=architecture_for(model, args.hf_overrides, args.revision),
        vector_files=tuple(vectors),
        sae=tuple(absolute_source(s) for s in args.sae),
        max_directions=args.max_directions,
        layers=None if args.steerable_layers is None else tuple(args.steerable_layers),
        table_budget_mib=args.table_budget_mib,
        capture=args.capture,
        registry_dir=str(Path(registry_dir).resolve()),
        file_dirs=tuple(str(Path(d).resolve()) for d in args.vector_dir),
        max_registry_vectors=args.max_registry_vectors,
        max_body_bytes=args.max_body_bytes,
    )
    extra = _cpu_defaults(passthrough)
    if args.model is None:  # the demo: a short context, and a name clients can type
        extra += [] if any(a.startswith("--max-model-len") for a in passthrough) else ["--max-model-len", "1024"]
    if (args.model is None or is_alias(args.model)) and not any(a.startswith("--served-model-name") for a in passthrough):
        extra += ["--served-model-name", args.model or "demo"]
    _allow_endpoint_plugin()
    from vllm_steer.engine.seam import run_vllm_serve  # vLLM: ~8 s to import; only serve needs it

    revision = ["--revision", args.revision] if args.revision else []
    run_vllm_serve([model, "--hf-overrides", json.dumps(overrides), *revision, *extra, *passthrough], prog="vllm-steer serve")


def _allow_endpoint_plugin() -> None:
    """vLLM loads a plugin that adds routes only when VLLM_PLUGINS names it; VLLM_PLUGINS is
    also an allow-list for general plugins, so keep every installed general plugin in it."""
    allowed = os.environ.get("VLLM_PLUGINS")
    names = allowed.split(",") if allowed is not None else [ep.name for ep in entry_points(group="vllm.general_plugins")]
    if "vllm_steer" not in names:
        names.append("vllm_steer")
    os.environ["VLLM_PLUGINS"] = ",".join(names)


def generate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm-steer generate", description="Unsteered and steered answers side by side.")
    _steering_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a user message; repeatable")
    parser.add_argument("--steering", required=True, help="a steering spec (JSON)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    model, vectors = _model_and_vectors(args)
    _cpu_defaults([])
    from vllm import SamplingParams  # vLLM: ~8 s to import; only generate needs it

    llm = _steered_llm(args, model, vectors)
    spec = json.loads(args.steering)
    chats = [[{"role": "user", "content": p}] for p in args.prompt]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    outputs = llm.chat(chats * 2, params, steering=[None] * len(chats) + [spec] * len(chats))
    for index, prompt in enumerate(args.prompt):
        print(f"\n### {prompt}\n- unsteered: {outputs[index].outputs[0].text.strip()!r}")
        print(f"- steered:   {outputs[len(chats) + index].outputs[0].text.strip()!r}")
    llm.shutdown()


def extract(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vllm-steer extract",
        description="A concept vector from contrast prompts, captured with the serving engine's own forward pass.",
    )
    _steering_args(parser)
    parser.add_argument("--positive", required=True, help="prompts with the concept: a text file (one per line) or a JSON list")
    parser.add_argument("--negative", required=True, help="prompts without it, same format (paired line by line for pca)")
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--method", choices=["mean", "pca"], default="mean", help="mean difference (CAA) or repeng's PCA-diff")
    parser.add_argument("--reduce", choices=["last", "mean"], default="last", help="last prompt token, or mean over the prompt")
    parser.add_argument("--name", default=None, help="vector name in the file (default: the output file's stem)")
    parser.add_argument("--out", required=True, help="output file: .safetensors, .gguf or .pt")
    args = parser.parse_args(argv)
    model, vectors = _model_and_vectors(args)
    _cpu_defaults([])
    from vllm_steer.vectors import VectorRegistry, export_vectors  # torch (vllm_steer.vectors): ~2.5 s; only extract needs it
    from vllm_steer.vectors.extract import extract as extract_vectors

    llm = _steered_llm(args, model, vectors, capture=True)
    found = extract_vectors(llm, read_prompts(args.positive), read_prompts(args.negative), args.layers,
                            method=args.method, reduce=args.reduce)
    llm.shutdown()
    name = args.name or Path(args.out).stem
    registry = VectorRegistry()
    registry.add(name, found, source=f"extract:{args.method}")
    export_vectors(registry, [name], args.out)
    norms = ", ".join(f"L{layer}: {float(np.linalg.norm(v)):.3f}" for layer, v in found.items())
    print(f"wrote {args.out}: {name!r}, layers {list(found)} (norms {norms})")


def sweep(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vllm-steer sweep",
        description="Concept inclusion and fluency against steering scale, every (prompt, scale, mode) in one batch.",
    )
    _steering_args(parser)
    sweeps.add_arguments(parser)
    args = parser.parse_args(argv)
    model, vectors = _model_and_vectors(args)
    _cpu_defaults([])
    import torch  # torch: ~2.5 s; only the engine commands need it

    engine = {} if torch.cuda.is_available() else {"dtype": "float32"}
    if args.model is None:
        engine["max_model_len"] = 1024
    sweeps.main(args, model, vectors, demo=args.model in (None, "demo"), sae=args.sae, max_directions=args.max_directions,
                 steerable_layers=args.steerable_layers, table_budget_mib=args.table_budget_mib, **engine)


def bench(argv: list[str]) -> None:
    """Steered vs unsteered throughput, the notebook's method, the server: a thin entry to the
    harness in a checkout's ``benchmarks/`` (``python -m benchmarks.run``; ``vllm-steer bench
    --quick`` finishes in < 5 min on 2 CPU cores; ``--help`` lists the rest). The harness is not
    part of the installed package: the checkout is the one this package was installed from
    (editable) or the working directory."""
    package_parent = Path(__file__).resolve().parent.parent
    checkout = next((folder for folder in (package_parent, Path.cwd()) if (folder / "benchmarks" / "run.py").is_file()), None)
    if checkout is None:
        sys.exit("vllm-steer bench: the benchmark harness lives in the repository's benchmarks/ folder; "
                 "run this from a checkout (or python -m benchmarks.run there)")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    # Looked up at run time: the harness is the checkout's, not a dependency of the package.
    importlib.import_module("benchmarks.run").main(argv, program="vllm-steer bench")


def features(argv: list[str]) -> None:
    """``vllm-steer features``: an SAE's most active features on prompts (a table per prompt),
    or, with ``--query``, features found by their labels in an explanations export."""
    parser = argparse.ArgumentParser(prog="vllm-steer features", description="Find SAE features to steer.")
    _steering_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a user message (chat template applied); repeatable")
    parser.add_argument("--raw", action="store_true", help="prompts are plain text, not chat messages")
    parser.add_argument("--top", type=int, default=20, help="features per prompt (or per token, or search results)")
    parser.add_argument("--over", choices=["last", "mean", "token"], default="last",
                        help="the last prompt token, the mean activation over the prompt's tokens, or each token")
    parser.add_argument("--explanations", default=None, metavar="FILE",
                        help="a Neuronpedia explanations export (JSON, JSONL, .gz, or a folder of them): labels")
    parser.add_argument("--source", default=None, help="the export's SAE (Neuronpedia layer id), when it holds several")
    parser.add_argument("--query", default=None, help="search the explanations' labels instead (no engine)")
    args = parser.parse_args(argv)
    explanations = load_explanations(args.explanations, args.source) if args.explanations else None
    if args.query is not None:
        if explanations is None:
            parser.error("--query searches labels: give --explanations FILE")
        print(matches_table(args.query, search_features(args.query, explanations, limit=args.top)))
        return
    if not args.prompt or len(args.sae) != 1:
        parser.error("give --prompt (repeatable) and one --sae, or --query with --explanations")
    model, vectors = _model_and_vectors(args)
    _cpu_defaults([])
    llm = _steered_llm(args, model, vectors, capture=True)
    prompts = args.prompt if args.raw else [[{"role": "user", "content": p}] for p in args.prompt]
    try:
        results = llm.top_features(prompts, sae=args.sae[0], k=args.top, over=args.over, explanations=explanations)
    except SteeringError as error:  # the user's choice (k, the SAE): no traceback
        sys.exit(f"vllm-steer features: {error}")
    finally:
        llm.shutdown()
    for prompt, result in zip(args.prompt, results):
        print("\n" + features_table(prompt, result))


def model(argv: list[str]) -> None:
    """``vllm-steer model NAME``: fetch and convert a named model once, print its folder."""
    models.main(argv)


def concepts(argv: list[str]) -> None:
    """``vllm-steer concepts``: concept vectors for SmolLM2 (vllm_steer/assets/concepts), cached next to it;
    ``--measure`` chooses their layers and scales again (vllm_steer/lab/concepts.py)."""
    concept_lab.main(argv)


COMMANDS = {"serve": serve, "generate": generate, "extract": extract, "sweep": sweep, "bench": bench, "model": model,
            "concepts": concepts, "features": features}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        sys.exit(2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except UnsupportedModel as error:  # a user's choice of model, not a bug: no traceback
        print(f"vllm-steer {argv[0]}: {error}", file=sys.stderr)
        sys.exit(2)
    except ModelUnavailable as error:  # a named model that could not be fetched (no index reachable)
        print(f"vllm-steer {argv[0]}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
