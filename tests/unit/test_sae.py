"""SAE decoders as on-demand feature sources: dictionary_learning ae.pt (andyrdt layout) and
SAELens sae_weights.safetensors + cfg.json. Every SAE is built by the test with a known decoder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from support.helpers import memory_growth
from support.sae_files import write_saelens
from safetensors.numpy import save_file

from vllm_steer.core.plan import ModelShape
from vllm_steer.core.resolve import resolve
from vllm_steer.core.spec import SteeringError, vector_digest
from vllm_steer.vectors import load_registry, load_sae

D_MODEL, D_SAE = 16, 32


def decoder_rows(seed: int = 0) -> np.ndarray:
    """[d_sae, d_model]: row f is feature f's direction."""
    return np.random.default_rng(seed).standard_normal((D_SAE, D_MODEL)).astype(np.float32)


def write_ae(folder, rows: np.ndarray):
    """dictionary_learning BatchTopKSAE state dict: decoder.weight is [d_model, d_sae]."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ae.pt"
    decoder = torch.from_numpy(rows.T.copy())
    state = {
        "encoder.weight": decoder.T.clone(),
        "encoder.bias": torch.zeros(rows.shape[0]),
        "decoder.weight": decoder,
        "b_dec": torch.zeros(rows.shape[1]),
        "k": torch.tensor(64),
    }
    torch.save(state, path)
    return path


def assert_features(registry, layer: int, rows: np.ndarray, ids=(0, 5, D_SAE - 1)) -> None:
    for feature_id in ids:
        digest = registry.feature_digest(layer, feature_id)
        assert digest == vector_digest(rows[feature_id]), f"feature {feature_id}"
        assert registry.array(digest).tobytes() == rows[feature_id].tobytes()


SHAPE = ModelShape(num_layers=4, hidden_size=D_MODEL, steerable_layers=(0, 1, 2, 3), max_directions=4)


def test_andyrdt_ae_pt_layout(tmp_path):
    rows = decoder_rows(1)
    path = write_ae(tmp_path / "resid_post_layer_2" / "trainer_1", rows)
    registry = load_registry(sae=[str(path)])
    [source] = registry.feature_sources()
    assert (source.layer, source.num_features) == (2, D_SAE)
    assert_features(registry, 2, rows)
    # The folder works too, and #layer= overrides the path.
    registry = load_registry(sae=[f"{path.parent}#layer=3"])
    assert_features(registry, 3, rows)
    assert registry.feature_digest(2, 0) is None


def test_ae_pt_without_a_layer_in_the_path_needs_one(tmp_path):
    path = write_ae(tmp_path / "my_sae", decoder_rows())
    with pytest.raises(ValueError, match=r"cannot tell the layer.*#layer=N"):
        load_registry(sae=[str(path)])
    with pytest.raises(ValueError, match="unknown option name; options here: layer"):
        load_registry(sae=[f"{path}#name=x"])


@pytest.mark.parametrize(
    "config, layer",
    [
        ({"hook_name": "blocks.2.hook_resid_post", "hook_layer": 2}, 2),  # SAELens <= 5
        ({"meta": {"hook_name": "blocks.2.hook_resid_post", "hook_layer": 2}}, 2),  # SAELens 6
        ({"hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3}, 2),  # input of block 3 = output of block 2
        ({"hook_name": "model.layers.1"}, 1),  # an HF module's output
        ({"hook_layer": 3}, 3),
    ],
)
def test_saelens_layout(tmp_path, config, layer):
    rows = decoder_rows(2)
    folder = write_saelens(tmp_path / "sae", rows, config)
    for text in (str(folder), str(folder / "sae_weights.safetensors")):
        registry = load_registry(sae=[text])
        assert [s.layer for s in registry.feature_sources()] == [layer]
        assert_features(registry, layer, rows)


def test_saelens_hook_that_is_not_a_layer_output(tmp_path):
    rows = decoder_rows(3)
    folder = write_saelens(tmp_path / "sae", rows, {"hook_name": "blocks.2.hook_mlp_out", "hook_layer": 2})
    with pytest.raises(ValueError, match=r"hook 'blocks.2.hook_mlp_out' is not the residual stream.*#layer=N"):
        load_registry(sae=[str(folder)])
    assert_features(load_registry(sae=[f"{folder}#layer=1"]), 1, rows)
    bare = write_saelens(tmp_path / "bare", rows, None)
    with pytest.raises(ValueError, match=r"no cfg.json.*#layer=N"):
        load_registry(sae=[str(bare)])


def test_missing_feature_or_layer_is_a_clear_steering_error(tmp_path):
    rows = decoder_rows(4)
    registry = load_registry(sae=[str(write_ae(tmp_path / "resid_post_layer_2" / "trainer_1", rows))])
    listing = rf"layer 2: features 0-{D_SAE - 1} \(.*resid_post_layer_2/trainer_1/ae.pt\)"
    with pytest.raises(SteeringError, match=rf"no feature vector for \(layer 2, feature {D_SAE}\).*{listing}") as info:
        resolve({"features": [[2, D_SAE, 1.0]]}, SHAPE, registry)
    assert info.value.field == "steering.features[0]"
    with pytest.raises(SteeringError, match=rf"no feature vector for \(layer 1, feature 0\).*{listing}"):
        resolve({"features": [[1, 0, 1.0]]}, SHAPE, registry)

    # A good one resolves to the raw decoder row (normalized when applied), sent inline.
    resolved = resolve({"features": [[2, 5, 0.5]]}, SHAPE, registry)
    [op] = resolved.ops
    assert (op.layer, op.mode, op.coeff, op.normalize) == (2, "add", 0.5 * 2, True)
    assert resolved.inline[op.digest].tobytes() == rows[5].tobytes()


def test_two_decoders_for_one_layer_are_refused(tmp_path):
    first = write_ae(tmp_path / "a" / "resid_post_layer_2" / "trainer_1", decoder_rows())
    second = write_saelens(tmp_path / "b", decoder_rows(), {"hook_name": "blocks.2.hook_resid_post"})
    with pytest.raises(ValueError, match="two SAE decoders for layer 2"):
        load_registry(sae=[str(first), str(second)])


@pytest.mark.parametrize("layout", ["ae.pt", "saelens"])
def test_feature_is_a_fresh_copy_of_one_row(tmp_path, layout):
    rows = decoder_rows(5)
    if layout == "ae.pt":
        text = f"{write_ae(tmp_path / 'x', rows)}#layer=0"
    else:
        text = str(write_saelens(tmp_path / "x", rows, {"hook_layer": 0}))
    source = load_sae(text)
    first = source.feature(7)
    assert first.dtype == np.float32 and first.shape == (D_MODEL,)
    assert first.tobytes() == rows[7].tobytes()
    first[:] = 0  # the caller owns it: changing it changes nothing in the source
    assert source.feature(7).tobytes() == rows[7].tobytes()
    with pytest.raises(KeyError, match=f"feature {D_SAE} is out of range"):
        source.feature(D_SAE)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("layout", ["ae.pt", "saelens"])
def test_only_requested_features_are_read(tmp_path, layout):
    """A 64 MiB decoder: loading it as a source and reading two features must not bring the
    matrix into the process's memory (it stays memory-mapped; features are copied out)."""
    d_model, d_sae = 128, 131072
    if layout == "ae.pt":
        decoder = torch.zeros(d_model, d_sae)  # [d_model, d_sae]: feature = column
        decoder[:, 5] = torch.arange(d_model, dtype=torch.float32)
        path = tmp_path / "ae.pt"
        torch.save({"decoder.weight": decoder}, path)
    else:
        decoder = np.zeros((d_sae, d_model), np.float32)  # W_dec [d_sae, d_model]: feature = row
        decoder[5] = np.arange(d_model, dtype=np.float32)
        path = tmp_path / "sae_weights.safetensors"
        save_file({"W_dec": decoder}, str(path))
    del decoder
    file_size = path.stat().st_size
    assert file_size >= 64 * 2**20
    grew, five = memory_growth(f"""
        from vllm_steer.vectors import load_registry

        def run():
            registry = load_registry(sae=[{f"{path}#layer=1"!r}])
            five = registry.array(registry.feature_digest(1, 5))
            registry.feature_digest(1, {d_sae - 1})
            return five.tolist()
        """)
    assert five == list(range(d_model))
    assert grew < 16 * 2**20, f"resident memory grew by {grew / 2**20:.1f} MiB reading 2 features"


def test_hub_sae_sources_download_the_right_files(tmp_path, monkeypatch):
    rows = decoder_rows(6)
    ae = write_ae(tmp_path / "local_ae", rows)
    saelens = write_saelens(tmp_path / "local_saelens", rows, {"hook_name": "blocks.3.hook_resid_post"})
    ae_config = tmp_path / "local_ae" / "config.json"
    ae_config.write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": 64}}))
    files = {
        "resid_post_layer_11/trainer_1/ae.pt": ae,
        "resid_post_layer_11/trainer_1/config.json": ae_config,
        "blocks.3.hook_resid_post/sae_weights.safetensors": saelens / "sae_weights.safetensors",
        "blocks.3.hook_resid_post/cfg.json": saelens / "cfg.json",
    }
    calls = []

    def fake_download(**kwargs):
        calls.append((kwargs["repo_id"], kwargs["filename"], kwargs["repo_type"], kwargs["revision"]))
        return str(files[kwargs["filename"]])

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    andyrdt = "hf://andyrdt/saes-llama-3.1-8b-instruct/resid_post_layer_11/trainer_1/ae.pt"
    registry = load_registry(sae=[andyrdt, "hf://me/saes@main/blocks.3.hook_resid_post"])
    assert calls == [
        ("andyrdt/saes-llama-3.1-8b-instruct", "resid_post_layer_11/trainer_1/ae.pt", "model", None),
        # dictionary_learning's config.json names the trainer class (TopK or BatchTopK encoding)
        ("andyrdt/saes-llama-3.1-8b-instruct", "resid_post_layer_11/trainer_1/config.json", "model", None),
        ("me/saes", "blocks.3.hook_resid_post/sae_weights.safetensors", "model", "main"),
        ("me/saes", "blocks.3.hook_resid_post/cfg.json", "model", "main"),
    ]
    # The layer comes from the hub path (resid_post_layer_11), not from the cache path.
    assert [(s.layer, s.description) for s in registry.feature_sources()] == [
        (3, "hf://me/saes@main/blocks.3.hook_resid_post"),
        (11, andyrdt),
    ]
    assert_features(registry, 11, rows)
    assert_features(registry, 3, rows)


def test_what_is_not_an_sae_is_named(tmp_path):
    (tmp_path / "decoder.npy").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "decoder.npy", tmp_path / "empty"):
        with pytest.raises(ValueError, match=r"not an SAE decoder; supported: a dictionary_learning \.pt.*sae_weights\.safetensors"):
            load_registry(sae=[str(path)])
    with pytest.raises(FileNotFoundError, match="SAE source not found"):
        load_registry(sae=[str(tmp_path / "missing")])
    torch.save({"weight": torch.zeros(4, 4)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"no SAE decoder: expected one of 'decoder.weight' \[d_model, d_sae\], 'W_dec' \[d_sae, d_model\].*found weight"):
        load_registry(sae=[f"{tmp_path / 'other.pt'}#layer=1"])


@pytest.mark.parametrize("architecture, usable", [("standard", True), ("topk", False), (None, False)])
def test_a_saelens_encoder_needs_a_threshold_or_the_standard_relu(tmp_path, architecture, usable):
    rows = np.random.default_rng(4).standard_normal((D_SAE, 16)).astype(np.float32)
    config = {"hook_name": "blocks.2.hook_resid_post"} | ({"architecture": architecture} if architecture else {})
    source = load_sae(str(write_saelens(tmp_path / "sae", rows, config)))
    if usable:
        encoder = source.encoder(5)
        assert encoder.row.tobytes() == rows[5].tobytes() and (encoder.offset, encoder.threshold) == (0.0, 0.0)
    else:
        with pytest.raises(ValueError, match="no threshold array"):
            source.encoder(5)
