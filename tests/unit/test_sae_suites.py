"""The published SAE suites as feature sources: Gemma Scope params.npz, Gemma Scope 2
params.safetensors + config.json, Llama Scope hyperparams.json + checkpoints/final.safetensors,
Qwen-Scope layer{L}.sae.pt and Goodfire .pth/.pt. Each test writes a small file in the suite's
exact layout (file and folder names, keys, orientation, dtype) with a known decoder."""

from __future__ import annotations

import json
import logging
import math
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.helpers import memory_growth
from support.sae_files import write_gemma_scope

from vllm_steer.core.plan import ModelShape
from vllm_steer.core.resolve import resolve
from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import load_registry, load_sae

D_MODEL, D_SAE = 16, 32


def decoder_rows(seed: int = 0) -> np.ndarray:
    """[d_sae, d_model]: row f is feature f's direction."""
    return np.random.default_rng(seed).standard_normal((D_SAE, D_MODEL)).astype(np.float32)


def assert_source(source, layer: int, rows: np.ndarray) -> None:
    assert (source.layer, source.num_features, source.d_model) == (layer, D_SAE, D_MODEL)
    for feature_id in (0, 5, D_SAE - 1):
        got = source.feature(feature_id)
        assert got.dtype == np.float32 and got.shape == (D_MODEL,)
        assert got.tobytes() == rows[feature_id].tobytes(), f"feature {feature_id}"
    with pytest.raises(KeyError, match=rf"feature {D_SAE} is out of range: .* has features 0-{D_SAE - 1}"):
        source.feature(D_SAE)


# ---- Gemma Scope (Gemma 2): layer_{L}/width_{W}/average_l0_{N}/params.npz -----------------------
GEMMA_RES = "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_71"


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_gemma_scope_params_npz(tmp_path, compressed, caplog):
    rows = decoder_rows(1)
    path = write_gemma_scope(tmp_path / GEMMA_RES, rows, compressed=compressed)
    with zipfile.ZipFile(path) as archive:
        kind = archive.getinfo("W_dec.npy").compress_type
    assert kind == (zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    with caplog.at_level(logging.WARNING, logger="vllm_steer.vectors.sae"):
        for text in (str(path), str(path.parent)):
            source = load_sae(text)
            assert source.layout.suite == "Gemma Scope"
            assert_source(source, 3, rows)
    assert ("W_dec is compressed in the archive" in caplog.text) == compressed
    assert_source(load_sae(f"{path}#layer=7"), 7, rows)
    assert_source(load_sae(str(write_gemma_scope(tmp_path / "lower" / GEMMA_RES, rows, lower=True))), 3, rows)


def test_gemma_scope_stored_decoder_is_read_in_place(tmp_path, monkeypatch):
    """A stored member is memory-mapped at its offset: after load, reading features never opens
    the member through zipfile (which would read it) nor calls np.load (which loads it whole)."""
    rows = decoder_rows(2)
    source = load_sae(str(write_gemma_scope(tmp_path / GEMMA_RES, rows)))

    def refuse(*args, **kwargs):
        raise AssertionError("read the member instead of seeking into it")

    monkeypatch.setattr(zipfile.ZipFile, "open", refuse)
    monkeypatch.setattr(np, "load", refuse)
    assert_source(source, 3, rows)


def test_gemma_scope_compressed_decoder_is_streamed_to_the_row(tmp_path, monkeypatch):
    """A compressed member cannot be mapped: it is decompressed up to the row in bounded reads,
    never np.load-ed."""
    rows = decoder_rows(3)
    source = load_sae(str(write_gemma_scope(tmp_path / GEMMA_RES, rows, compressed=True)))
    reads = []  # (position, size) of each read from an archive member
    real_read = zipfile.ZipExtFile.read

    def read(self, n=-1):
        reads.append((self.tell(), n))
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load loads the whole archive member"))
    assert source.feature(5).tobytes() == rows[5].tobytes()
    position, size = reads[-1]
    assert size == D_MODEL * 4
    assert 0 < position - 5 * D_MODEL * 4 < 256  # the .npy header, then 5 rows skipped
    assert all(0 <= n <= 1 << 20 for _, n in reads)  # ZipExtFile.seek's 16 MiB reads stay on the heap


@pytest.mark.parametrize(
    "repo, folder, refused",
    [
        ("gemma-scope-2b-pt-mlp", "layer_3/width_16k/average_l0_71", "an MLP-output SAE"),
        ("gemma-scope-9b-pt-att", "layer_3/width_16k/average_l0_71", "an attention-output SAE"),
        ("gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_76", "a transcoder SAE"),
        ("gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6", "an embedding SAE"),
    ],
)
def test_gemma_scope_sites_other_than_the_residual_stream_are_refused(tmp_path, repo, folder, refused):
    """Given as a path into the HF cache, which names the repo (its site)."""
    rows = decoder_rows(4)
    path = write_gemma_scope(tmp_path / f"hub/models--google--{repo}/snapshots/0123abcd/{folder}", rows)
    with pytest.raises(ValueError, match=rf"{refused}, not the residual stream.*add #layer=N to use it"):
        load_sae(str(path))
    assert_source(load_sae(f"{path}#layer=2"), 2, rows)


def test_gemma_scope_without_a_layer_folder_needs_one(tmp_path):
    path = write_gemma_scope(tmp_path / "my_sae", decoder_rows())
    with pytest.raises(ValueError, match=r"cannot tell the layer \(no layer_N folder in the path\): add #layer=N"):
        load_sae(str(path))


# ---- Gemma Scope 2 (Gemma 3): {site}/layer_{L}_width_{W}_l0_{S}/params.safetensors + config.json ---
def write_gemma_scope_2(folder, rows: np.ndarray, *, hook: str | None, hook_out: str | None = None):
    """Lower-case keys w_enc [d_model, d_sae], w_dec [d_sae, d_model], b_enc, b_dec, threshold
    (float32), and the config.json Gemma Scope 2 ships (hook None: no config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    d_sae, d_model = rows.shape
    weights = torch.from_numpy(rows)
    save_file(
        {
            "w_enc": weights.T.contiguous(),
            "w_dec": weights,
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_model),
            "threshold": torch.ones(d_sae),
        },
        str(folder / "params.safetensors"),
    )
    if hook is not None:
        config = {
            "hf_hook_point_in": hook,
            "hf_hook_point_out": hook_out or hook,
            "width": d_sae,
            "model_name": "google/gemma-3-1b-pt",
            "architecture": "jump_relu",
            "l0": 60,
            "affine_connection": False,
            "type": "sae" if hook_out is None else "transcoder",
        }
        (folder / "config.json").write_text(json.dumps(config))
    return folder / "params.safetensors"


def test_gemma_scope_2_params_safetensors(tmp_path):
    rows = decoder_rows(5)
    path = write_gemma_scope_2(tmp_path / "resid_post/layer_7_width_16k_l0_medium", rows, hook="model.layers.7.output")
    for text in (str(path), str(path.parent)):
        source = load_sae(text)
        assert source.layout.suite == "Gemma Scope 2"
        assert_source(source, 7, rows)
    assert_source(load_sae(f"{path}#layer=1"), 1, rows)
    # No config.json: the site folder and layer_{L} say it.
    bare = write_gemma_scope_2(tmp_path / "resid_post_all/layer_9_width_16k_l0_small", rows, hook=None)
    assert_source(load_sae(str(bare)), 9, rows)


@pytest.mark.parametrize(
    "folder, hook, hook_out, refused",
    [
        ("mlp_out/layer_7_width_16k_l0_big", "model.layers.7.post_feedforward_layernorm.output", None,
         r"hook 'model.layers.7.post_feedforward_layernorm.output' is not the residual stream"),
        ("attn_out/layer_7_width_16k_l0_big", "model.layers.7.self_attn.o_proj.input", None,
         r"hook 'model.layers.7.self_attn.o_proj.input' is not the residual stream"),
        ("transcoder/layer_7_width_16k_l0_big", "model.layers.7.pre_feedforward_layernorm.output",
         "model.layers.7.post_feedforward_layernorm.output", r"\(a transcoder\), not an SAE"),
        ("mlp_out/layer_7_width_16k_l0_big", None, None, "a mlp_out SAE, not the residual stream"),
    ],
)
def test_gemma_scope_2_other_sites_are_refused(tmp_path, folder, hook, hook_out, refused):
    rows = decoder_rows(6)
    path = write_gemma_scope_2(tmp_path / folder, rows, hook=hook, hook_out=hook_out)
    with pytest.raises(ValueError, match=rf"{refused}.*add #layer=N to use it"):
        load_sae(str(path))
    assert_source(load_sae(f"{path}#layer=3"), 3, rows)


# ---- Llama Scope: <name>/hyperparams.json + <name>/checkpoints/final.safetensors ------------------
LLAMA_SCOPE_NORM = 6.3125  # dataset_average_activation_norm["in"]


def write_llama_scope(folder, rows: np.ndarray, hook: str | None, hook_out: str | None = None):
    """encoder.weight [d_sae, d_model], encoder.bias, decoder.weight [d_model, d_sae],
    decoder.bias in bfloat16 (hyperparams.json says torch.bfloat16). Returns the file and the
    feature directions as read: the bf16 decoder rows, in the stream's units (SAELens folds the
    dataset-wise norm factor S = sqrt(d_model) / norm into W_dec / S; no hyperparams.json: as stored)."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    d_sae, d_model = rows.shape
    decoder = torch.from_numpy(rows).to(torch.bfloat16)
    save_file(
        {
            "encoder.weight": decoder.clone(),
            "encoder.bias": torch.zeros(d_sae, dtype=torch.bfloat16),
            "decoder.weight": decoder.T.contiguous(),
            "decoder.bias": torch.zeros(d_model, dtype=torch.bfloat16),
        },
        str(folder / "checkpoints" / "final.safetensors"),
    )
    if hook is not None:
        hyperparams = {
            "dtype": "torch.bfloat16",
            "hook_point_in": hook,
            "hook_point_out": hook_out or hook,
            "expansion_factor": d_sae // d_model,
            "d_model": d_model,
            "d_sae": d_sae,
            "act_fn": "jumprelu",
            "jump_relu_threshold": 0.2021484375,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": LLAMA_SCOPE_NORM, "out": LLAMA_SCOPE_NORM},
        }
        (folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    stored = decoder.to(torch.float32).numpy()
    scale = math.sqrt(d_model) / LLAMA_SCOPE_NORM if hook is not None else 1.0
    read = stored if hook is None else (stored.astype(np.float64) / scale).astype(np.float32)
    return folder / "checkpoints" / "final.safetensors", read


def test_llama_scope_final_safetensors(tmp_path):
    folder = tmp_path / "Llama3_1-8B-Base-LXR-8x" / "Llama3_1-8B-Base-L5R-8x"
    path, rows = write_llama_scope(folder, decoder_rows(7), "blocks.5.hook_resid_post")
    for text in (str(path), str(folder)):
        source = load_sae(text)
        assert source.layout.suite == "Llama Scope"
        assert_source(source, 5, rows)
    assert_source(load_sae(f"{folder}#layer=2"), 2, rows)
    # The input of block 5 is the output of block 4.
    pre, rows = write_llama_scope(tmp_path / "pre", decoder_rows(8), "blocks.5.hook_resid_pre")
    assert_source(load_sae(str(pre)), 4, rows)


def test_llama_scope_other_sites_and_a_missing_config(tmp_path):
    mlp, rows = write_llama_scope(tmp_path / "Llama3_1-8B-Base-L15M-8x", decoder_rows(9), "blocks.15.hook_mlp_out")
    with pytest.raises(ValueError, match=r"hook 'blocks.15.hook_mlp_out' is not the residual stream.*#layer=N"):
        load_sae(str(mlp))
    assert_source(load_sae(f"{mlp}#layer=15"), 15, rows)
    transcoder, _ = write_llama_scope(
        tmp_path / "Llama3_1-8B-Base-L8TC-8x", decoder_rows(9), "blocks.8.ln2.hook_normalized", "blocks.8.hook_mlp_out"
    )
    with pytest.raises(ValueError, match=r"\(a transcoder\), not an SAE"):
        load_sae(str(transcoder))
    bare, rows = write_llama_scope(tmp_path / "bare", decoder_rows(9), None)
    with pytest.raises(ValueError, match=r"no hyperparams.json in the folder above.*#layer=N"):
        load_sae(str(bare))
    assert_source(load_sae(f"{bare}#layer=3"), 3, rows)
    # Without hyperparams.json the folder is no Llama Scope folder.
    with pytest.raises(ValueError, match="not an SAE decoder"):
        load_sae(str(tmp_path / "bare"))


# ---- Qwen-Scope: layer{L}.sae.pt ------------------------------------------------------------------
def write_qwen_scope(folder, rows: np.ndarray, layer: int, *, transposed: bool = False):
    """A torch dict W_enc [d_sae, d_model], W_dec [d_model, d_sae], b_enc, b_dec (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    d_sae, d_model = rows.shape
    weights = torch.from_numpy(rows)
    state = {
        "W_enc": weights.clone(),
        "W_dec": weights.clone() if transposed else weights.T.contiguous(),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_model),
    }
    path = folder / f"layer{layer}.sae.pt"
    torch.save(state, path)
    return path


def test_qwen_scope_layer_sae_pt(tmp_path):
    rows = decoder_rows(10)
    path = write_qwen_scope(tmp_path / "SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", rows, 12)
    source = load_sae(str(path))
    assert source.layout.suite == "Qwen-Scope"
    assert_source(source, 12, rows)
    assert_source(load_sae(f"{path}#layer=3"), 3, rows)
    # The repo folder holds one file per layer: name the file.
    with pytest.raises(ValueError, match=r"not an SAE decoder.*Qwen-Scope layer<L>\.sae\.pt"):
        load_sae(str(path.parent))


def test_qwen_scope_decoder_orientation_is_checked_against_b_dec(tmp_path):
    path = write_qwen_scope(tmp_path / "q", decoder_rows(11), 2, transposed=True)
    expected = r"the decoder is \[32, 16\] but 'b_dec' is \[16\]: expected a Qwen-Scope decoder as \[d_model, d_sae\]"
    with pytest.raises(ValueError, match=expected):
        load_sae(str(path))


# ---- Goodfire: <Model>-SAE-l{L}.pth / .pt ---------------------------------------------------------
def write_goodfire(path, rows: np.ndarray):
    """An OrderedDict state dict: encoder_linear.weight [d_sae, d_model], encoder_linear.bias,
    decoder_linear.weight [d_model, d_sae], decoder_linear.bias (float32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    d_sae, d_model = rows.shape
    weights = torch.from_numpy(rows)
    state = OrderedDict(
        [
            ("encoder_linear.weight", weights.clone()),
            ("encoder_linear.bias", torch.zeros(d_sae)),
            ("decoder_linear.weight", weights.T.contiguous()),
            ("decoder_linear.bias", torch.zeros(d_model)),
        ]
    )
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "name, layer",
    [
        ("Llama-3.1-8B-Instruct-SAE-l19/Llama-3.1-8B-Instruct-SAE-l19.pth", 19),
        ("Llama-3.3-70B-Instruct-SAE-l50/Llama-3.3-70B-Instruct-SAE-l50.pt", 50),
        ("old/Llama-3.3-70B-Instruct__model.layers.50.pt", 50),
    ],
)
def test_goodfire_pth(tmp_path, name, layer):
    rows = decoder_rows(12)
    path = write_goodfire(tmp_path / name, rows)
    source = load_sae(str(path))
    assert source.layout.suite == "Goodfire"
    assert_source(source, layer, rows)
    assert_source(load_sae(f"{path}#layer=4"), 4, rows)


def test_goodfire_without_a_layer_in_the_name_needs_one(tmp_path):
    path = write_goodfire(tmp_path / "my_sae.pth", decoder_rows())
    with pytest.raises(ValueError, match=r"no -SAE-lN or model.layers.N in the path\): add #layer=N"):
        load_sae(str(path))


# ---- across suites --------------------------------------------------------------------------------
def test_a_folder_with_two_layouts_is_refused(tmp_path):
    folder = tmp_path / "both"
    write_gemma_scope(folder, decoder_rows())
    write_gemma_scope_2(folder, decoder_rows(), hook="model.layers.1.output")
    with pytest.raises(ValueError, match=r"more than one SAE layout \(params.npz, params.safetensors\): name the file"):
        load_sae(str(folder))


def test_hidden_size_mismatch_is_a_clear_steering_error(tmp_path):
    rows = decoder_rows(13)
    registry = load_registry(sae=[str(write_qwen_scope(tmp_path / "q", rows, 2))])
    shape = ModelShape(num_layers=4, hidden_size=D_MODEL * 2, steerable_layers=(0, 1, 2, 3), max_directions=4)
    with pytest.raises(SteeringError, match=rf"vector has {D_MODEL} values; this model's hidden size is {D_MODEL * 2}"):
        resolve({"features": [[2, 5, 1.0]]}, shape, registry)


def test_hub_suites_download_their_files_and_configs(tmp_path, monkeypatch):
    from huggingface_hub import errors

    rows = decoder_rows(14)
    gemma = write_gemma_scope(tmp_path / "gs", rows)
    gemma_2 = write_gemma_scope_2(tmp_path / "gs2", rows, hook="model.layers.13.output")
    llama, llama_rows = write_llama_scope(tmp_path / "ls", rows, "blocks.15.hook_resid_post")
    qwen = write_qwen_scope(tmp_path / "qs", rows, 20)
    goodfire = write_goodfire(tmp_path / "gf" / "Llama-3.1-8B-Instruct-SAE-l19.pth", rows)
    files = {
        ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71/params.npz"): gemma,
        ("google/gemma-scope-2-1b-pt", "resid_post/layer_13_width_16k_l0_medium/params.safetensors"): gemma_2,
        ("google/gemma-scope-2-1b-pt", "resid_post/layer_13_width_16k_l0_medium/config.json"): gemma_2.parent / "config.json",
        ("fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x/checkpoints/final.safetensors"): llama,
        ("fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x/hyperparams.json"): llama.parent.parent / "hyperparams.json",
        ("Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50", "layer20.sae.pt"): qwen,
        ("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "Llama-3.1-8B-Instruct-SAE-l19.pth"): goodfire,
    }
    calls = []

    def fake_download(**kwargs):
        key = (kwargs["repo_id"], kwargs["filename"])
        calls.append(key)
        if key not in files:
            raise errors.EntryNotFoundError(f"{key} not found")
        return str(files[key])

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    expected = {
        "hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz": (20, rows),
        "hf://google/gemma-scope-2-1b-pt/resid_post/layer_13_width_16k_l0_medium/params.safetensors": (13, rows),
        "hf://fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L15R-8x/checkpoints/final.safetensors": (15, llama_rows),
        "hf://Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50/layer20.sae.pt": (20, rows),
        "hf://Goodfire/Llama-3.1-8B-Instruct-SAE-l19/Llama-3.1-8B-Instruct-SAE-l19.pth": (19, rows),
    }
    for text, (layer, want) in expected.items():
        source = load_sae(text)
        assert source.description == text
        assert_source(source, layer, want)
    assert sorted(calls) == sorted(files)
    # A hub folder is read as SAELens; another suite's folder names the file to give.
    with pytest.raises(ValueError, match=r"no sae_weights.safetensors in that folder.*params.npz"):
        load_sae("hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_gemma_scope_features_do_not_bring_the_decoder_into_memory(tmp_path, compressed):
    """A 64 MiB W_dec in params.npz: loading it and reading two features (one near its end)
    must not hold the matrix in the process's memory."""
    d_model, d_sae = 128, 131072
    decoder = np.zeros((d_sae, d_model), np.float32)
    decoder[5] = np.arange(d_model, dtype=np.float32)
    path = tmp_path / "layer_1" / "params.npz"
    path.parent.mkdir()
    (np.savez_compressed if compressed else np.savez)(path, W_dec=decoder, b_dec=np.zeros(d_model, np.float32))
    del decoder
    grew, (five, last_any) = memory_growth(f"""
        from vllm_steer.vectors import load_sae

        def run():
            source = load_sae({str(path)!r})
            return source.feature(5).tolist(), bool(source.feature({d_sae - 1}).any())
        """)
    assert five == list(range(d_model)) and not last_any
    assert grew < 16 * 2**20, f"resident memory grew by {grew / 2**20:.1f} MiB reading 2 features"


# ---- encoders (feature_clamp) ----------------------------------------------------------------
@pytest.mark.parametrize("suite", ["gemma_scope", "gemma_scope_2", "goodfire"])
def test_encoder_rows_offsets_and_thresholds(tmp_path, suite):
    """Each writer stores the encoder as the decoder's transpose with zero biases, so feature
    f's encoder row equals its decoder row; the threshold is the suite's (a ReLU's is 0)."""
    rows = decoder_rows(21)
    path, threshold = {
        "gemma_scope": lambda: (write_gemma_scope(tmp_path / GEMMA_RES, rows), 0.5),
        "gemma_scope_2": lambda: (write_gemma_scope_2(tmp_path / "resid_post/layer_7_width_16k_l0_medium", rows,
                                                      hook="model.layers.7.output"), 1.0),
        "goodfire": lambda: (write_goodfire(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth", rows), 0.0),
    }[suite]()
    source = load_sae(str(path))
    for feature_id in (0, 5, D_SAE - 1):
        encoder = source.encoder(feature_id)
        assert encoder.row.tobytes() == rows[feature_id].tobytes()
        assert (encoder.offset, encoder.threshold) == (0.0, threshold)


def test_encoder_offset_folds_in_both_biases_where_the_reference_subtracts_b_dec(tmp_path):
    """dictionary_learning's AutoEncoder encodes ``relu(encoder(x - bias))``: the offset is
    ``b_enc - <e, bias>``. Goodfire's encodes ``relu(encoder_linear(x))``: its decoder bias
    plays no part in the activation."""
    rows = decoder_rows(22)
    path = write_goodfire(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth", rows)
    state = torch.load(path)
    state["encoder_linear.bias"] = torch.arange(D_SAE, dtype=torch.float32)
    state["decoder_linear.bias"] = torch.full((D_MODEL,), 0.25)
    torch.save(state, path)
    assert load_sae(str(path)).encoder(5).offset == 5.0
    ae = tmp_path / "resid_post_layer_3" / "ae.pt"
    ae.parent.mkdir()
    torch.save({"encoder.weight": torch.from_numpy(rows), "encoder.bias": torch.arange(D_SAE, dtype=torch.float32),
                "decoder.weight": torch.from_numpy(rows.T.copy()), "bias": torch.full((D_MODEL,), 0.25)}, ae)
    encoder = load_sae(str(ae)).encoder(5)
    assert encoder.offset == pytest.approx(5.0 - 0.25 * float(rows[5].astype(np.float64).sum()), rel=1e-6)


def test_a_compressed_gemma_scope_encoder_asks_for_a_stored_archive(tmp_path):
    """W_enc is [d_model, d_sae]: a feature's encoder is a column, which a compressed member
    cannot give without decompressing all of it (never done: the encoder stays on disk)."""
    source = load_sae(str(write_gemma_scope(tmp_path / GEMMA_RES, decoder_rows(25), compressed=True)))
    with pytest.raises(ValueError, match="columns are not contiguous.*re-save the archive with np.savez"):
        source.encoder(3)


def test_encoders_that_cannot_give_an_activation_are_refused(tmp_path):
    qwen = load_sae(str(write_qwen_scope(tmp_path / "SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", decoder_rows(23), 12)))
    with pytest.raises(ValueError, match="no threshold array, so its activation .* cannot be computed per token"):
        qwen.encoder(0)
    path = write_goodfire(tmp_path / "g" / "Llama-3.1-8B-Instruct-SAE-l19.pth", decoder_rows(24))
    state = torch.load(path)
    state["encoder_linear.weight"] = torch.zeros(D_SAE, D_MODEL + 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"the encoder 'encoder_linear.weight' is \[32, 17\].*expected the encoder as \[32, 16\]"):
        load_sae(str(path)).encoder(0)
