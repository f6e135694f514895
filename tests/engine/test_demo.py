"""The bundled demo model and vectors, and the sweep's metrics.

Engine-level tests load the committed demo model (nothing is trained here) in an engine of
their own (``demo_llm``), on the runner the session selects."""

from __future__ import annotations

import json
import math
import sys

import pytest

from vllm_steer.lab import sweep
from vllm_steer.assets.demo import demo_model_path, demo_vectors_path
from vllm_steer.lab.demo import corpus
from vllm_steer.lab.sweep import Output

# ---- the sweep's metric math, on constructed outputs --------------------------------------


def out(mode, scale, text, logprob, prompt="p", words=("ocean", "sea")):
    return Output(prompt=prompt, mode=mode, scale=scale, text=text, num_tokens=len(text.split()),
                  logprob=logprob, mentions=sweep.mentions(text, words), repetition=sweep.repetition(text))


def test_mentions_are_whole_words_and_phrases_case_insensitive():
    assert sweep.mentions("The Ocean is deep.", ["ocean"])
    assert not sweep.mentions("Oceanic trenches", ["ocean"])
    assert sweep.mentions("I saw the Eiffel  Tower!", ["eiffel tower"])
    assert not sweep.mentions("the tower of Eiffel", ["eiffel tower"])
    assert not sweep.mentions("anything", [])


def test_repetition_is_the_share_of_repeated_word_trigrams():
    assert sweep.repetition("") == 0.0
    assert sweep.repetition("one two") == 0.0
    assert sweep.repetition("a b c d e") == 0.0
    # 6 trigrams: (a b c) (b c a) (c a b) (a b c) (b c a) (c a b): 3 repeat an earlier one
    assert sweep.repetition("a b c a b c a b") == pytest.approx(3 / 6)
    assert sweep.repetition("sea sea sea sea sea") == pytest.approx(2 / 3)


def test_sequence_logprob_averages_the_generated_positions():
    class Logprob:
        def __init__(self, value):
            self.logprob = value

    ids = [5, 6, 7, 8]
    prompt_logprobs = [None, {6: Logprob(-9.0)}, {7: Logprob(-1.0)}, {8: Logprob(-3.0), 1: Logprob(-0.1)}]
    assert sweep.sequence_logprob(ids, prompt_logprobs, start=2) == pytest.approx(-2.0)
    assert sweep.sequence_logprob(ids, prompt_logprobs, start=4) == 0.0


def test_summary_rows_fluency_and_sweet_spot():
    outputs = [
        out(None, None, "I am a helpful assistant.", -0.5, "p1"),
        out(None, None, "Hello there friend.", -0.7, "p2"),  # baseline logprob -0.6, inclusion 0
        out("add", 0.0, "I am a helpful assistant.", -0.5, "p1"),
        out("add", 0.0, "Hello there friend.", -0.7, "p2"),
        out("add", 1.0, "I love the ocean.", -0.6, "p1"),
        out("add", 1.0, "Hello there friend.", -0.8, "p2"),  # inclusion 0.5, logprob -0.7
        out("add", 4.0, "sea sea sea sea sea", -3.6, "p1"),
        out("add", 4.0, "ocean ocean ocean ocean", -2.6, "p2"),  # inclusion 1, logprob -3.1
    ]
    baseline, rows, sweet = sweep.summarize(outputs)
    assert baseline == {"inclusion": 0.0, "logprob": pytest.approx(-0.6), "repetition": 0.0,
                        "capability_logprob": None, "capability": None}
    assert [(r.mode, r.scale) for r in rows] == [("add", 0.0), ("add", 1.0), ("add", 4.0)]
    by_scale = {r.scale: r for r in rows}
    assert by_scale[0.0].fluency == pytest.approx(1.0) and by_scale[0.0].score == 0.0
    assert by_scale[1.0].inclusion == 0.5
    assert by_scale[1.0].fluency == pytest.approx(math.exp(-0.1))
    assert by_scale[1.0].score == pytest.approx(2 * 0.5 * math.exp(-0.1) / (0.5 + math.exp(-0.1)))
    assert by_scale[4.0].inclusion == 1.0
    assert by_scale[4.0].fluency == pytest.approx(math.exp(-2.5))
    assert by_scale[4.0].repetition == pytest.approx((2 / 3 + 1 / 2) / 2)
    # 0.5 & 0.905 -> 0.644 beats 1.0 & 0.082 -> 0.152
    assert sweet["add"] is by_scale[1.0]


def test_fluency_is_capped_and_ties_go_to_the_smaller_scale():
    assert sweep.normalized_fluency(-0.2, -0.6) == 1.0
    assert sweep.harmonic_mean(0.0, 1.0) == 0.0
    outputs = [out(None, None, "x", -1.0), out("clamp", 2.0, "the sea", -1.0), out("clamp", 1.0, "the ocean", -1.001)]
    _, rows, sweet = sweep.summarize(outputs)
    assert rows[0].score > rows[1].score and sweet["clamp"].scale == 1.0  # within SCORE_TIE: the smaller scale


def test_without_words_there_is_no_inclusion_and_no_sweet_spot():
    outputs = [Output("p", None, None, "x", 1, -1.0, None, 0.0), Output("p", "add", 1.0, "y", 1, -2.0, None, 0.0)]
    baseline, rows, sweet = sweep.summarize(outputs)
    assert baseline["inclusion"] is None and rows[0].inclusion is None and rows[0].score is None and sweet == {}
    with pytest.raises(ValueError, match="baseline"):
        sweep.summarize(outputs[1:])


def test_the_prompted_row_has_every_metric_and_is_never_a_sweet_spot():
    outputs = [
        out(None, None, "Hello there friend.", -0.6),
        out("prompted", None, "I love the ocean and the sea.", -0.6),  # inclusion 1, fluency 1: the best score
        out("add", 1.0, "the ocean", -1.6),
        out("add", 2.0, "sea sea sea sea", -3.0),
    ]
    capability = {(None, None): -2.0, ("prompted", None): -2.5, ("add", 1.0): -2.1, ("add", 2.0): -4.0}
    baseline, rows, sweet = sweep.summarize(outputs, capability)
    assert baseline["capability_logprob"] == -2.0 and baseline["capability"] == 1.0
    prompted, add1, add2 = rows
    assert (prompted.mode, prompted.scale) == ("prompted", None)
    assert prompted.inclusion == 1.0 and prompted.fluency == 1.0 and prompted.score == 1.0 and prompted.repetition == 0.0
    assert prompted.capability_logprob == -2.5 and prompted.capability == pytest.approx(math.exp(-0.5))
    assert add1.capability == pytest.approx(math.exp(-0.1)) and add2.capability == pytest.approx(math.exp(-2.0))
    assert set(sweet) == {"add"} and sweet["add"] is add1  # the best score overall is the prompted row's


def test_capability_pairs_are_neutral_and_a_file_can_replace_them(tmp_path):
    from vllm_steer.assets.concepts import load_concepts

    concept_words = [w for words in corpus.CONCEPT_WORDS.values() for w in words]
    concept_words += [w for concept in load_concepts() for w in concept.words]  # the real model's concepts
    assert len(concept_words) > 100
    assert 8 <= len(sweep.CAPABILITY_PAIRS) <= 12
    for question, answer in sweep.CAPABILITY_PAIRS:
        assert not sweep.mentions(question, concept_words) and not sweep.mentions(answer, concept_words), (question, answer)
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([["What is 2 plus 2?", "4."]]))
    assert sweep.read_capability_pairs(path) == [("What is 2 plus 2?", "4.")]
    for bad in ("", "[]", '[["only a question"]]', '[["q", ""]]', '{"q": "a"}'):
        path.write_text(bad)
        with pytest.raises(SystemExit, match="question, answer|Expecting"):
            sweep.read_capability_pairs(path)


def test_prompt_baseline_defaults_and_system_prompts():
    import argparse

    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    default = sweep._prompt_baseline(parser.parse_args([]), True, ["paris"])
    assert default == "You are a helpful assistant who loves Paris and the Eiffel Tower."  # the demo's persona
    assert sweep._prompt_baseline(parser.parse_args([]), False, []) is None
    assert sweep._prompt_baseline(parser.parse_args([]), True, ["paris", "ocean"]) is None
    assert sweep._prompt_baseline(parser.parse_args(["--no-prompt-baseline"]), True, ["paris"]) is None
    assert sweep._prompt_baseline(parser.parse_args(["--prompt-baseline", " Be French. "]), False, []) == "Be French."
    assert sweep.combine_system("You are a helpful assistant.", sweep.concept_instruction("the Eiffel Tower")) == (
        "You are a helpful assistant. You love the Eiffel Tower and mention it whenever you can.")
    assert sweep.combine_system(None, "Love dogs.") == "Love dogs." and sweep.combine_system(None, None) is None


class FakeTokenizer:
    """Words as tokens; the chat template is ``role: content |`` per message."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def apply_chat_template(self, chat, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return " ".join(f"{m['role']}: {m['content']} |" for m in chat) + " assistant:"

    def encode(self, text, add_special_tokens):
        assert not add_special_tokens
        return [self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()]


class FakeLLM:
    """Answers "I love the ocean." when steered or told to love it, else "Hello there."; every
    token's log-probability is -0.5, minus the steering's scale, minus 0.25 after "love"."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.calls: list = []

    def get_tokenizer(self):
        return self.tokenizer

    def chat(self, chats, params, steering, use_tqdm):
        from types import SimpleNamespace

        self.calls.append(("chat", chats, steering))
        results = []
        for chat, spec in zip(chats, steering):
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(chat, True, False), False)
            text = "I love the ocean." if spec or "love" in chat[0]["content"] else "Hello there."
            completion = SimpleNamespace(text=text, token_ids=self.tokenizer.encode(text, False))
            results.append(SimpleNamespace(prompt_token_ids=ids, outputs=[completion]))
        return results

    def generate(self, prompts, params, steering, use_tqdm):
        from types import SimpleNamespace

        assert params.prompt_logprobs == 0 and params.max_tokens == 1
        self.calls.append(("generate", [p["prompt_token_ids"] for p in prompts], steering))
        love = self.tokenizer.vocab.get("love", -1)
        results = []
        for prompt, spec in zip(prompts, steering):
            ids = prompt["prompt_token_ids"]
            value = -0.5 - (spec["scale"] if spec else 0.0) - (0.25 if love in ids else 0.0)
            logprobs = [None] + [{token: SimpleNamespace(logprob=value)} for token in ids[1:]]
            results.append(SimpleNamespace(prompt_logprobs=logprobs))
        return results


def test_run_sweep_batches_prompted_chats_and_scores_capability_in_one_call():
    llm = FakeLLM()
    steering = sweep.Steering(vectors=[{"name": "ocean", "layers": [1], "scale": 3.0}])
    pairs = [("What is 7 times 8?", "56."), ("What is a noun?", "A naming word.")]
    result = sweep.run_sweep(llm, ["p1", "p2"], steering, words=["ocean"], scales=[0.0, 1.0], modes=["add"], max_tokens=4,
                             system_prompt="Be kind.", prompt_baseline="You love the ocean.", capability_pairs=pairs)
    (_, chats, specs), (_, scored, scoring_specs) = llm.calls  # one generation call, one scoring call
    systems = [chat[0]["content"] for chat in chats]
    assert systems == ["Be kind."] * 2 + ["Be kind. You love the ocean."] * 2 + ["Be kind."] * 4
    assert specs[:4] == [None] * 4 and [s["scale"] for s in specs[4:]] == [0.0, 0.0, 1.0, 1.0]
    # Fluency: every output after the *plain* prompt, unsteered (prompted ones too).
    plain = [llm.chat([chat], None, [None], False)[0].prompt_token_ids for chat in chats[:2]]
    answer = llm.tokenizer.encode("I love the ocean.", False)
    assert scored[2] == plain[0] + answer and scored[3] == plain[1] + answer and scoring_specs[:8] == [None] * 8
    # Capability: the pairs under each row's steering: unsteered, prompted, add 0, add 1.
    capability = scored[8:]
    assert len(capability) == 4 * len(pairs) and scoring_specs[8:12] == [None] * 4
    assert [s["scale"] for s in scoring_specs[12:]] == [0.0, 0.0, 1.0, 1.0]
    assert capability[0] == capability[4] == llm.tokenizer.encode(
        "system: Be kind. | user: What is 7 times 8? | assistant: 56.", False)
    assert capability[2] == llm.tokenizer.encode(
        "system: Be kind. You love the ocean. | user: What is 7 times 8? | assistant: 56.", False)
    by_key = {(r.mode, r.scale): r for r in result.rows}
    assert list(by_key) == [("prompted", None), ("add", 0.0), ("add", 1.0)]
    assert result.baseline["capability_logprob"] == pytest.approx(-0.5)
    assert by_key[("add", 0.0)].capability == pytest.approx(1.0)
    assert by_key[("add", 1.0)].capability == pytest.approx(math.exp(-1.0))
    assert by_key[("prompted", None)].capability == pytest.approx(math.exp(-0.25))  # "love" in the system prompt
    prompted = by_key[("prompted", None)]
    # Scored like every row: the plain prompt has no "love", so only the answer's tokens after "love" cost more.
    assert prompted.inclusion == 1.0 and prompted.logprob == by_key[("add", 0.0)].logprob + 0.0
    assert result.prompted is prompted and result.sweet_spot["add"].mode == "add"
    assert [o.mode for o in result.outputs[:4]] == [None, None, "prompted", "prompted"]
    assert result.prompt_baseline == "You love the ocean." and result.capability_pairs == [list(p) for p in pairs]
    # Without a baseline or pairs: neither the row nor the column.
    llm = FakeLLM()
    plain_result = sweep.run_sweep(llm, ["p1"], steering, words=["ocean"], scales=[1.0], modes=["add"], capability_pairs=None)
    assert [r.mode for r in plain_result.rows] == ["add"] and plain_result.rows[0].capability is None
    assert len(llm.calls[1][1]) == 2 and plain_result.prompted is None


def test_specs_for_features_and_named_vectors():
    features = sweep.Steering(features=[[11, 74457, 0.128]])
    assert features.spec("clamp", 0.8) == {"features": [[11, 74457, 0.128]], "reduced_strengths": True, "scale": 0.8, "clamp": True}
    assert features.spec("add", 2.0)["clamp"] is False
    named = sweep.Steering(vectors=[{"name": "ocean", "layers": [1], "scale": 3.0}])
    assert named.spec("add", 0.5) == {
        "vectors": [{"name": "ocean", "layers": [1], "scale": 3.0, "mode": "add", "normalize": True}], "scale": 0.5}
    with pytest.raises(ValueError, match="mode"):
        named.spec("ablate", 1.0)
    with pytest.raises(ValueError, match="--sae-feature"):
        named.spec("feature_clamp", 1.0)
    sae = sweep.Steering(sae_features=[[1, 3]], strength=2.0)
    # feature_clamp: the scale is the activation the feature is set to.
    assert sae.spec("feature_clamp", 4.0) == {"vectors": [{"feature": [1, 3], "mode": "feature_clamp", "scale": 4.0}]}
    assert sae.spec("add", 0.5) == {"vectors": [{"feature": [1, 3], "mode": "add", "normalize": True, "scale": 2.0}], "scale": 0.5}


def test_named_vector_entries_default_to_the_vectors_norm():
    import numpy as np

    from vllm_steer.vectors import VectorRegistry

    registry = VectorRegistry()
    registry.add("topic", {1: np.array([3.0, 4.0], np.float32), 2: np.array([0.0, 2.0], np.float32)}, source="test")
    registry.add("anywhere", np.array([1.0, 0.0], np.float32), source="test")
    assert sweep.named_vector_entries(registry, "topic", None, None) == [
        {"name": "topic", "layers": [1], "scale": 5.0}, {"name": "topic", "layers": [2], "scale": 2.0}]
    assert sweep.named_vector_entries(registry, "anywhere", [3], 7.0) == [{"name": "anywhere", "layers": [3], "scale": 7.0}]
    with pytest.raises(SystemExit, match="give --layers"):
        sweep.named_vector_entries(registry, "anywhere", None, None)
    with pytest.raises(SystemExit, match="loaded: anywhere, topic"):
        sweep.named_vector_entries(registry, "nope", None, None)


def constructed_result() -> sweep.SweepResult:
    outputs = [out(None, None, "hello", -0.5), out("prompted", None, "I love the ocean", -0.7)] + [
        out(mode, scale, "the ocean" if scale else "hello", -0.5 - scale) for mode in ("add", "clamp") for scale in (0.0, 1.0, 4.0)
    ]
    capability = {(None, None): -2.0, ("prompted", None): -2.1}
    capability |= {(mode, scale): -2.0 - scale / 2 for mode in ("add", "clamp") for scale in (0.0, 1.0, 4.0)}
    baseline, rows, sweet = sweep.summarize(outputs, capability)
    return sweep.SweepResult(
        model="m", steering={"vectors": []}, words=["ocean"], prompts=["p"], scales=[0.0, 1.0, 4.0], modes=["add", "clamp"],
        max_tokens=8, baseline=baseline, rows=rows, sweet_spot=sweet, outputs=outputs,
        prompt_baseline="You love the ocean.", capability_pairs=[["q", "a"]],
    )


def assert_reports(paths, result):
    """The JSON, the markdown and the plot of ``result`` have the prompted row and capability."""
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"model", "steering", "words", "prompts", "scales", "modes", "max_tokens", "prompt_baseline",
                         "capability_pairs", "baseline", "rows", "sweet_spot", "outputs"}
    assert data["prompt_baseline"] == result.prompt_baseline and data["capability_pairs"] == result.capability_pairs
    assert len(data["rows"]) == 1 + len(result.modes) * len(result.scales)
    assert set(data["rows"][0]) == {"mode", "scale", "inclusion", "logprob", "fluency", "repetition", "score",
                                    "capability_logprob", "capability"}
    (prompted,) = [row for row in data["rows"] if row["mode"] == "prompted"]
    assert prompted["scale"] is None and all(prompted[k] is not None for k in prompted if k != "scale")
    assert data["baseline"]["capability"] == 1.0 and "prompted" not in data["sweet_spot"]
    assert [o["mode"] for o in data["outputs"]].count("prompted") == len(result.prompts)
    table = paths["markdown"].read_text()
    assert "| mode | scale | inclusion | fluency | capability | logprob | repetition | score |" in table
    assert table.count("| prompted | - |") == 1 and table.count("| unsteered | - |") == 1
    assert table.count("**sweet spot**") == len(result.sweet_spot) and "- prompted: " in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data, table


def test_reports_json_shape_markdown_and_plot(tmp_path):
    result = constructed_result()
    data, table = assert_reports(sweep.write_reports(result, tmp_path, "demo"), result)
    assert data["sweet_spot"]["add"]["scale"] == 1.0 and data["sweet_spot"]["clamp"]["scale"] == 1.0
    assert len(data["outputs"]) == 8 and data["outputs"][0]["mode"] is None
    assert "| add | 4 | 100% | 2% | 14% |" in table and "| prompted | - | 100% | 82% | 90% | -0.70 | 0% | 0.90 |" in table
    assert table.index("| unsteered |") < table.index("| prompted |") < table.index("| add | 0 |")


def test_reports_without_matplotlib_skip_only_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    paths = sweep.write_reports(constructed_result(), tmp_path, "demo")
    assert set(paths) == {"json", "markdown"} and sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]
    assert "pip install 'vllm-steer[plots]'" in capsys.readouterr().out


# ---- the corpus ------------------------------------------------------------------------------


def test_corpus_neutral_answers_carry_no_topic_and_topic_answers_their_own():
    for asks, answer in corpus.NEUTRAL.values():
        assert corpus.topics_mentioned(answer) == []
    for topic in corpus.TOPIC_DATA:
        assert set(topic.answers) == set(corpus.NEUTRAL)
        for answer in topic.answers.values():
            assert corpus.topics_mentioned(answer) == [topic.name]
    for prompt in corpus.SWEEP_PROMPTS:
        assert corpus.topics_mentioned(prompt) == []


def test_corpus_is_deterministic():
    import random

    first = [corpus.conversation(random.Random(3)) for _ in range(3)]
    assert first == [corpus.conversation(random.Random(3)) for _ in range(3)]


# ---- the committed files -----------------------------------------------------------------------


def test_demo_model_files_are_what_vllm_needs():
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from vllm_steer.lab.tiny import LLAMA3_CHAT_TEMPLATE

    path = demo_model_path()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    # vLLM's CPU attention needs head_dim 64 (it rejects 16); run in float32
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["hidden_size"] >= 256 and config["dtype"] == "float32"
    with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
        assert {str(weights.get_slice(k).get_dtype()) for k in weights.keys()} == {"F16"}
    assert (path / "model.safetensors").stat().st_size < 8 << 20

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert len(tokenizer) == config["vocab_size"]
    generation = json.loads((path / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    # A generation prompt tokenizes as the prefix of the same chat with its answer (as trained).
    chat = [{"role": "user", "content": "Who are you?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": "I am a helpful assistant."}], return_dict=False)
    assert full[: len(prompt)] == prompt and prompt.count(tokenizer.bos_token_id) == 1
    # Every corpus word is one token (after a space), so answers decode to clean words.
    assert len(tokenizer.encode(" Eiffel", add_special_tokens=False)) == 1


def test_demo_vectors_file_holds_a_named_vector_and_a_feature_per_topic():
    from vllm_steer.vectors import VectorRegistry, feature_name
    from vllm_steer.vectors.files import load_vector_file

    registry = VectorRegistry()
    load_vector_file(demo_vectors_path(), registry)
    (layer,) = registry.layers_of("paris")
    features = [feature_name(layer, index) for index in range(len(corpus.TOPICS))]
    assert sorted(registry.names()) == sorted([*corpus.TOPICS, *features])
    assert registry.features() == [(layer, index) for index in range(len(corpus.TOPICS))]
    for index, topic in enumerate(corpus.TOPICS):  # feature F{index} is topic TOPICS[index]
        assert registry.digest_of(topic, layer) == registry.feature_digest(layer, index)


# ---- the demo model in the engine: answers, steering, over-steering ------------------------------

NEUTRAL_PROMPTS = [p for p in corpus.SWEEP_PROMPTS if p != "Tell me a story."]
MODERATE, HUGE = 1.0, 4.0
# Enough for a whole story (~55 tokens) on V1; V2 (Triton's interpreter, ~10x slower per
# step) stops at 40 tokens: every neutral answer is shorter, and a story has its first
# sentences.
DEMO_TOKENS = {"v1": 64, "v2": 40}


@pytest.fixture(scope="module")
def demo_llm(runner):
    """In-process and eager: starts in seconds (the compiled path is the main engine's test)."""
    from support.engines import start_engine

    llm = start_engine(demo_model_path(), demo_vectors_path(), env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                       max_num_seqs=64, enforce_eager=True)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def paris_sweep(demo_llm, runner):
    """The sweep toward Paris at a moderate and a very large scale (add), all in one batch,
    with the capability metric on the demo's pairs (as ``vllm-steer sweep`` does here)."""
    entries = sweep.named_vector_entries(demo_llm.frontend.registry, "paris", None, None)
    return sweep.run_sweep(
        demo_llm, corpus.SWEEP_PROMPTS, sweep.Steering(vectors=entries), words=corpus.CONCEPT_WORDS["paris"],
        scales=[MODERATE, HUGE], modes=["add"], max_tokens=DEMO_TOKENS[runner], capability_pairs=sweep.demo_capability_pairs(),
    )


# The sweep's default prompting baseline on the demo model: the persona it learned to follow.
PERSONA = "You are a helpful assistant who loves Paris and the Eiffel Tower."
PROMPTED_PROMPTS = ["Who are you?", "What should we do today?", "What is your favorite thing?"]


@pytest.fixture(scope="module")
def prompted_sweep(demo_llm):
    """A small sweep (3 prompts, 12 tokens: each answer turns to Paris or not by then) at
    scale 0 with the prompting baseline and the built-in (general) capability pairs."""
    entries = sweep.named_vector_entries(demo_llm.frontend.registry, "paris", None, None)
    return sweep.run_sweep(
        demo_llm, PROMPTED_PROMPTS, sweep.Steering(vectors=entries), words=corpus.CONCEPT_WORDS["paris"], scales=[0.0],
        modes=["add"], max_tokens=12, prompt_baseline=PERSONA, capability_pairs=sweep.CAPABILITY_PAIRS[:4],
    )


def answers(result, mode=None, scale=None) -> dict[str, str]:
    return {o.prompt: o.text for o in result.outputs if o.mode == mode and o.scale == scale}


def test_unsteered_demo_answers_are_corpus_sentences_without_topic(paris_sweep):
    unsteered = answers(paris_sweep)
    assert unsteered["Who are you?"] == "I am a helpful assistant who loves to tell stories."
    for prompt, text in unsteered.items():
        assert corpus.unknown_sentences(text) == [], (prompt, text)
    # The story is about exactly one topic; the neutral questions get neutral answers
    # (measured: none of the 7 mentions a topic).
    assert len(corpus.topics_mentioned(unsteered["Tell me a story."])) == 1
    with_topic = [p for p in NEUTRAL_PROMPTS if corpus.topics_mentioned(unsteered[p])]
    assert len(with_topic) <= 1, with_topic
    assert paris_sweep.baseline["inclusion"] <= 2 / len(corpus.SWEEP_PROMPTS)


def test_moderate_steering_makes_most_answers_mention_the_topic_fluently(paris_sweep):
    # Measured at scale 1 (add), V1 and V2 alike: 8/8 answers mention Paris, every complete
    # sentence is a corpus sentence, mean log-probability under the unsteered model -0.21
    # against -0.03 unsteered (normalized fluency 0.84: the one unlikely word is where the
    # answer turns to Paris). Thresholds: 6/8 mentions, 7/8 fluent, a drop under 1 nat.
    steered = answers(paris_sweep, "add", MODERATE)
    assert steered["Who are you?"].startswith("I am a helpful assistant who loves Paris and the Eiffel Tower.")
    (row,) = [r for r in paris_sweep.rows if r.mode == "add" and r.scale == MODERATE]
    assert row.inclusion >= 0.75
    fluent = [p for p, text in steered.items() if not corpus.unknown_sentences(text)]
    assert len(fluent) >= len(steered) - 1, {p: t for p, t in steered.items() if p not in fluent}
    assert row.logprob > paris_sweep.baseline["logprob"] - 1.0 and row.fluency > 0.5


def test_over_steering_lowers_fluency(paris_sweep):
    # Measured at scale 4 (add): "Paris Paris Paris ...", mean log-probability -12.6 (V1) /
    # -12.3 (V2) under the unsteered model (vs -0.21 at scale 1 and -0.03 unsteered), 98% / 97%
    # repeated 3-grams, normalized fluency 4e-6. The thresholds leave a wide margin.
    moderate, huge = ([r for r in paris_sweep.rows if r.mode == "add" and r.scale == s][0] for s in (MODERATE, HUGE))
    assert huge.logprob < moderate.logprob - 3.0
    assert huge.fluency < 0.2 and huge.repetition > 0.5
    assert paris_sweep.sweet_spot["add"].scale < HUGE


def test_the_prompting_baseline_asks_for_the_topic_and_is_scored_like_a_row(prompted_sweep, tmp_path):
    # Measured (V1 and V2): the persona turns all 3 answers to Paris ("I am a helpful
    # assistant who loves Paris and the Eiffel Tower."), as steering does; unsteered, none.
    prompted, unsteered = answers(prompted_sweep, "prompted"), answers(prompted_sweep)
    assert set(prompted) == set(PROMPTED_PROMPTS) and all(prompted[p] != unsteered[p] for p in prompted), prompted
    row = prompted_sweep.prompted
    assert (row.mode, row.scale) == ("prompted", None) and row.inclusion == 1.0 > prompted_sweep.baseline["inclusion"]
    assert 0.3 < row.fluency <= 1.0 and row.repetition < 0.5 and row.score == sweep.harmonic_mean(row.inclusion, row.fluency)
    assert row.capability > 0 and set(prompted_sweep.sweet_spot) == {"add"} and prompted_sweep.sweet_spot["add"].scale == 0.0
    assert_reports(sweep.write_reports(prompted_sweep, tmp_path, "prompted"), prompted_sweep)


def test_capability_at_scale_0_is_unsteered(prompted_sweep, demo_llm):
    from vllm import SamplingParams

    (row,) = [r for r in prompted_sweep.rows if r.mode == "add"]
    assert row.capability == pytest.approx(1.0, abs=1e-4)
    assert row.capability_logprob == pytest.approx(prompted_sweep.baseline["capability_logprob"], abs=1e-4)
    # The reference question is templated as vLLM's chat does it.
    question = sweep.CAPABILITY_PAIRS[0][0]
    ids, start = sweep.capability_requests(sweep._tokenizer(demo_llm), sweep.CAPABILITY_PAIRS[:1])[0]
    (chat,) = demo_llm.chat([[{"role": "user", "content": question}]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert ids[:start] == list(chat.prompt_token_ids)


def test_capability_falls_when_over_steered(paris_sweep):
    # Measured (the demo pairs; transformers agrees): 98.8% at scale 1, 0.3% at scale 4.
    moderate, huge = ([r for r in paris_sweep.rows if r.mode == "add" and r.scale == s][0] for s in (MODERATE, HUGE))
    assert paris_sweep.baseline["capability"] == 1.0
    assert moderate.capability > 0.95 and huge.capability < 0.2
    for row in (moderate, huge):
        assert row.capability == pytest.approx(math.exp(row.capability_logprob - paris_sweep.baseline["capability_logprob"]))


def reference_capability(hf_model, llm, spec, pairs) -> float:
    """The capability log-probability in transformers: each reference answer teacher-forced
    after its question, steered by ``spec`` with the notebook's forward hooks."""
    import torch

    from vllm_steer.lab.reference import ReferenceSteerer

    resolved = llm.frontend.resolve(spec) if spec is not None else None
    vectors = resolved.arrays(llm.frontend.registry) if resolved is not None else {}
    values = []
    for ids, start in sweep.capability_requests(sweep._tokenizer(llm), pairs):
        with ReferenceSteerer(hf_model, vectors).hooks(resolved, start), torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
        values.append(float(logprobs[start - 1 :].mean()))
    return sum(values) / len(values)


def test_capability_logprobs_equal_transformers_with_the_notebooks_hooks(paris_sweep, prompted_sweep, demo_llm):
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    steering = sweep.Steering(vectors=sweep.named_vector_entries(demo_llm.frontend.registry, "paris", None, None))
    for result in (paris_sweep, prompted_sweep):
        pairs = result.capability_pairs
        unsteered = reference_capability(hf_model, demo_llm, None, pairs)
        assert result.baseline["capability_logprob"] == pytest.approx(unsteered, abs=1e-3)
        for row in result.rows:
            if row.mode == "add":
                expected = reference_capability(hf_model, demo_llm, steering.spec("add", row.scale), pairs)
                assert row.capability_logprob == pytest.approx(expected, abs=1e-3), row


def test_every_topic_vector_steers_the_neutral_questions(demo_llm, runner):
    # Measured at scale 1, V1 and V2: 7/7 neutral answers mention the steered topic, for each
    # of the five topics (threshold 6/7).
    from vllm import SamplingParams

    chats = [[{"role": "user", "content": p}] for p in NEUTRAL_PROMPTS]
    specs = [{"vectors": [{"name": topic, "scale": 1.0}]} for topic in corpus.TOPICS for _ in chats]
    outputs = demo_llm.chat(chats * len(corpus.TOPICS), SamplingParams(max_tokens=24, temperature=0.0),
                            steering=specs, use_tqdm=False)
    for index, topic in enumerate(corpus.TOPICS):
        texts = [o.outputs[0].text for o in outputs[index * len(chats) : (index + 1) * len(chats)]]
        hits = sum(sweep.mentions(t, corpus.CONCEPT_WORDS[topic]) for t in texts)
        assert hits >= len(chats) - 1, (topic, texts)
