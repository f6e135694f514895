"""Finding features without an engine: the SAE's full encoder, read a chunk at a time, against
a dense numpy encoding written here from the formulas (each encoder kind, each ``over``),
feature labels from Neuronpedia's explanation exports, and search by label."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest
import torch
from support.helpers import memory_growth
from support.discovery import assert_same, oracle
from support.sae_files import write_gemma_scope, write_saelens

from vllm_steer.discovery import load_explanations, search_features, top_features_of_streams
from vllm_steer.discovery.explanations import attach_labels
from vllm_steer.discovery.finder import CapturePlan, FeatureQuery
from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import load_sae

D_MODEL, D_SAE = 16, 64


def random_sae(seed):
    rng = np.random.default_rng(seed)
    encoder = (rng.standard_normal((D_SAE, D_MODEL)) / np.sqrt(D_MODEL)).astype(np.float32)
    b_enc = (0.3 * rng.standard_normal(D_SAE)).astype(np.float32)
    b_dec = (0.2 * rng.standard_normal(D_MODEL)).astype(np.float32)
    decoder = rng.standard_normal((D_SAE, D_MODEL)).astype(np.float32)
    return encoder, b_enc, b_dec, decoder


def write_sae(kind, folder, seed=0):
    """(source text, encoder [d_sae, d_model], b_enc, b_dec, threshold, TopK k) in a suite's
    layout; ``b_dec`` as the suite's reference encoder subtracts it (Gemma Scope: not at all,
    though its file holds one; dictionary_learning: always)."""
    encoder, b_enc, b_dec, decoder = random_sae(seed)
    zeros = np.zeros(D_SAE, np.float32)
    if kind == "jumprelu":  # Gemma Scope params.npz: W_enc [d_model, d_sae], the encoder read by columns
        threshold = np.abs(0.3 * np.random.default_rng(seed + 1).standard_normal(D_SAE)).astype(np.float32)
        path = folder / "layer_2" / "params.npz"
        path.parent.mkdir(parents=True)
        np.savez(path, W_enc=encoder.T.copy(), W_dec=decoder, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
        return str(path), encoder, b_enc, np.zeros_like(b_dec), threshold, None
    state = {"encoder.weight": torch.from_numpy(encoder), "encoder.bias": torch.from_numpy(b_enc),
             "decoder.weight": torch.from_numpy(decoder.T.copy()), "b_dec": torch.from_numpy(b_dec)}
    path = folder / "resid_post_layer_2" / "ae.pt"
    path.parent.mkdir(parents=True)
    if kind == "batchtopk":  # dictionary_learning BatchTopKSAE: its inference threshold wins over k
        torch.save(state | {"threshold": torch.tensor(0.25), "k": torch.tensor(5)}, path)
        return str(path), encoder, b_enc, b_dec, np.full(D_SAE, 0.25, np.float32), None
    if kind == "topk":  # dictionary_learning AutoEncoderTopK: k, and a threshold never learned (-1)
        torch.save(state | {"threshold": torch.tensor(-1.0), "k": torch.tensor(6)}, path)
        return str(path), encoder, b_enc, b_dec, zeros, 6
    torch.save(state, path)  # AutoEncoder: ReLU
    return str(path), encoder, b_enc, b_dec, zeros, None


def streams(seed=5, lengths=(1, 4, 7)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, D_MODEL)).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "batchtopk", "topk"])
@pytest.mark.parametrize("over", ["last", "mean", "token"])
def test_top_features_equal_a_dense_encoding(tmp_path, kind, over):
    source, encoder, b_enc, b_dec, threshold, sae_k = write_sae(kind, tmp_path)
    sae = load_sae(source)
    assert sae.encoding.kind == {"batchtopk": "jumprelu"}.get(kind, kind)
    given = streams()
    expected = oracle(given, encoder, b_enc, b_dec, threshold, sae_k, over, k=4)
    # 7 features a chunk: uneven chunks, and features of one prompt's top k in different chunks.
    assert_same(top_features_of_streams(given, sae, 4, over, features_per_chunk=7), expected)
    assert_same(top_features_of_streams(given, sae, 4, over), expected)


def test_token_results_carry_positions_and_tokens(tmp_path):
    sae = load_sae(write_sae("relu", tmp_path)[0])
    (result,) = top_features_of_streams(streams(lengths=(3,)), sae, 2, "token", positions=[[1, 2, 3]], tokens=[["a", "b", "c"]])
    assert [(t.position, t.token, len(t.features)) for t in result.tokens] == [(1, "a", 2), (2, "b", 2), (3, "c", 2)]


def test_a_topk_sae_without_k_is_refused_until_k_is_given(tmp_path):
    """A Qwen-Scope file outside its repo folder (no -L0_{k} in the path) says nothing of k."""
    encoder, b_enc, b_dec, decoder = random_sae(3)
    path = tmp_path / "layer4.sae.pt"
    torch.save({"W_enc": torch.from_numpy(encoder), "W_dec": torch.from_numpy(decoder.T.copy()),
                "b_enc": torch.from_numpy(b_enc), "b_dec": torch.from_numpy(b_dec)}, path)
    with pytest.raises(ValueError, match=r"no threshold array and no k.*add #k=N to the source"):
        top_features_of_streams(streams(), load_sae(str(path)), 3)
    given = streams()
    expected = oracle(given, encoder, b_enc, np.zeros_like(b_dec), None, 8, "mean", 3)  # Qwen-Scope reads h itself
    assert_same(top_features_of_streams(given, load_sae(f"{path}#k=8"), 3, "mean"), expected)
    named = tmp_path / "SAE-Res-Qwen3-1.7B-Base-W32K-L0_8" / "layer4.sae.pt"
    named.parent.mkdir()
    path.rename(named)
    assert load_sae(str(named)).encoding.k == 8  # the repo name's L0 is the model card's Top-K


def test_saelens_configs_say_how_the_sae_encodes(tmp_path):
    rows = random_sae(4)[3]
    topk = load_sae(str(write_saelens(tmp_path / "a", rows, {"hook_name": "blocks.2.hook_resid_post", "architecture": "topk", "k": 7})))
    older = {"hook_name": "blocks.2.hook_resid_post", "architecture": "standard", "activation_fn_str": "topk",
             "activation_fn_kwargs": {"k": 9}, "apply_b_dec_to_input": False}
    old_topk = load_sae(str(write_saelens(tmp_path / "b", rows, older)))
    assert (topk.encoding.kind, topk.encoding.k) == ("topk", 7)
    assert (old_topk.encoding.kind, old_topk.encoding.k) == ("topk", 9)
    assert not old_topk.encoding.b_dec.any()  # apply_b_dec_to_input false: the encoder reads h itself


def test_streams_of_another_size_are_refused(tmp_path):
    sae = load_sae(write_sae("relu", tmp_path)[0])
    with pytest.raises(ValueError, match=f"must have {D_MODEL} values per token"):
        top_features_of_streams([np.zeros((2, D_MODEL + 1))], sae, 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_features_of_streams(streams(), sae, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_encoder_is_read_a_chunk_at_a_time(tmp_path):
    """A 64 MiB encoder (dictionary_learning's, memory-mapped) encoded in 0.5 MiB chunks must
    not come into the process's memory whole (the allocator keeps a few chunks' worth)."""
    d_model, d_sae = 128, 131072
    encoder = torch.zeros(d_sae, d_model)
    encoder[77] = 1.0
    path = tmp_path / "ae.pt"
    torch.save({"encoder.weight": encoder, "decoder.weight": torch.zeros(d_model, d_sae)}, path)
    del encoder
    grew, found = memory_growth(f"""
        import numpy as np
        from vllm_steer.discovery import top_features_of_streams
        from vllm_steer.vectors import load_sae

        def run():
            sae = load_sae({f"{path}#layer=1"!r})
            (result,) = top_features_of_streams([np.ones((1, {d_model}))], sae, 1, features_per_chunk=1024)
            return [[f.feature, f.activation] for f in result.features]
        """)
    assert found == [[77, 128.0]]
    assert grew < 16 * 2**20, f"resident memory grew by {grew / 2**20:.1f} MiB encoding with a 64 MiB encoder"


def test_a_compressed_archive_encoder_asks_for_a_stored_one(tmp_path):
    path = write_gemma_scope(tmp_path / "layer_3", random_sae(6)[3], compressed=True)
    with pytest.raises(ValueError, match="columns are not contiguous.*re-save the archive with np.savez"):
        top_features_of_streams(streams(), load_sae(f"{path}#layer=3"), 3)


# ---- labels ------------------------------------------------------------------------------------
def explanation(index, description, layer="2-res-test"):
    return {"modelId": "tiny", "layer": layer, "index": str(index), "description": description,
            "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"}


EXPLANATIONS = [
    explanation(3, " the Eiffel Tower and Paris landmarks"),
    explanation(9, "eiffel"),
    explanation(12, "Eiffelturm, in German texts"),
    explanation(3, "a second explanation of feature 3"),
    explanation(5, " ocean waves"),
    explanation(40, ""),  # no description: no label
]


@pytest.mark.parametrize("form", ["json", "jsonl.gz", "folder"])
def test_explanation_exports_are_read(tmp_path, form):
    if form == "json":  # explanations-only/<model>_<source>.json, /api/explanation/export
        path = tmp_path / "tiny_2-res-test.json"
        path.write_text(json.dumps(EXPLANATIONS))
    else:  # v1/<model>/<source>/explanations/batch-N.jsonl.gz
        folder = tmp_path / "explanations"
        folder.mkdir()
        for batch in (0, 1):
            lines = "\n".join(json.dumps(e) for e in EXPLANATIONS[batch * 3 : batch * 3 + 3]) + "\n"
            (folder / f"batch-{batch}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        path = folder if form == "folder" else folder / "batch-0.jsonl.gz"
    explanations = load_explanations(path)
    assert explanations.source == "tiny/2-res-test"
    assert explanations.label(3) == "the Eiffel Tower and Paris landmarks"
    if form != "jsonl.gz":
        assert (explanations.label(5), explanations.label(40), len(explanations)) == ("ocean waves", None, 4)


def test_search_ranks_exact_then_whole_word_then_substring(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps(EXPLANATIONS))
    found = search_features("EIFFEL", path)
    assert [(m.feature, m.label) for m in found] == [
        (9, "eiffel"), (3, "the Eiffel Tower and Paris landmarks"), (12, "Eiffelturm, in German texts")]
    assert [m.feature for m in search_features("explanation of", path)] == [3]  # any of a feature's explanations
    assert search_features("eiffel", path, limit=1)[0].feature == 9
    assert search_features("nothing like it", path) == []
    with pytest.raises(ValueError, match="query: give some text"):
        search_features("  ", path)


def test_labels_are_attached_to_results(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([explanation(i, f"feature number {i}") for i in range(D_SAE)]))
    sae = load_sae(write_sae("relu", tmp_path)[0])
    results = attach_labels(top_features_of_streams(streams(), sae, 3, "token"), load_explanations(path))
    for token in results[-1].tokens:
        assert all(f.label == f"feature number {f.feature}" for f in token.features)


def test_an_export_of_several_saes_needs_a_source(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in [explanation(1, "one"), explanation(1, "other", "3-res-test")]))
    with pytest.raises(ValueError, match=r"several SAEs \(tiny/2-res-test, tiny/3-res-test\): choose one with source="):
        load_explanations(path)
    assert load_explanations(path, source="3-res-test").label(1) == "other"
    (tmp_path / "bad.json").write_text(json.dumps([{"description": "no index"}]))
    with pytest.raises(ValueError, match=r"bad.json\[0\]: expected Neuronpedia explanation objects"):
        load_explanations(tmp_path / "bad.json")


# ---- the query and the capture plan ------------------------------------------------------------
@pytest.mark.parametrize("body, field, message", [
    ({"prompts": ["hi"], "k": 0}, "k", "greater than or equal to 1"),
    ({"prompts": ["hi"], "over": "max"}, "over", "'last', 'mean' or 'token'"),
    ({"prompts": []}, "prompts", "at least one prompt"),
    ({}, "prompts", "either 'prompts' or 'messages'"),
    ({"prompts": ["hi"], "sae": "x", "layer": 1}, "layer", "not both"),
    ({"prompts": ["hi"], "bogus": 1}, "bogus", "Extra inputs"),
])
def test_query_errors_name_the_field(body, field, message):
    with pytest.raises(SteeringError, match=message) as info:
        FeatureQuery.parse(body)
    assert info.value.field == field


def test_the_capture_plan_takes_each_token_as_the_last_of_its_prefix():
    plan = CapturePlan.of([[1, 7, 8], [1], [4, 5]], "mean", bos_token_id=1, include_bos=False)
    assert plan.positions == [[1, 2], [0], [0, 1]]  # a BOS alone is kept: it is the whole prompt
    assert plan.prefixes() == [[1, 7], [1, 7, 8], [1], [4], [4, 5]]
    rows = [np.full(2, i, np.float32) for i in range(5)]
    assert [s[:, 0].tolist() for s in plan.streams(rows)] == [[0, 1], [2], [3, 4]]
    assert CapturePlan.of([[1, 7, 8]], "last", 1, False).prefixes() == [[1, 7, 8]]
    assert CapturePlan.of([[1, 7, 8]], "token", 1, True).positions == [[0, 1, 2]]


def test_the_cli_searches_labels_without_an_engine(tmp_path, capsys):
    from vllm_steer import cli

    path = tmp_path / "e.json"
    path.write_text(json.dumps(EXPLANATIONS))
    cli.main(["features", "--query", "eiffel", "--explanations", str(path), "--top", "2"])
    assert capsys.readouterr().out.splitlines() == [
        "features labelled 'eiffel'",
        "feature | label",
        "--------+-------------------------------------",
        "9       | eiffel",
        "3       | the Eiffel Tower and Paris landmarks",
    ]
