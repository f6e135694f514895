"""Vector file formats (.pt, .safetensors, GGUF control vectors), hf:// sources and export.
Pure CPU, no engine: every file a test reads is built by the test."""

from __future__ import annotations

import pickle

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from vllm_steer.core.plan import ModelShape
from vllm_steer.core.resolve import resolve
from vllm_steer.core.spec import vector_digest
from vllm_steer.vectors import VectorRegistry, export_vectors, load_registry, load_vector_file
from vllm_steer.core.registry import ANY_LAYER
from vllm_steer.vectors.sources import HubFile, parse_source

D = 16


def vec(seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == np.float32 and a.shape == b.shape and a.tobytes() == np.asarray(b, np.float32).tobytes()


# --- .pt ----------------------------------------------------------------------------------


def test_pt_notebook_layout_registers_features(tmp_path):
    path = tmp_path / "steering_vectors.pt"
    torch.save({(1, 7): torch.from_numpy(vec(1)), (2, 42): torch.from_numpy(vec(2))}, path)
    registry = load_registry([str(path)])
    assert registry.features() == [(1, 7), (2, 42)]
    assert same_bits(registry.array(registry.feature_digest(2, 42)), vec(2))
    assert registry.names() == ["L1/F7", "L2/F42"]
    assert registry.info("L1/F7").source == str(path)


def test_pt_named_layered_and_single_tensor(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"eiffel": torch.from_numpy(vec(1)), "happy": {3: torch.from_numpy(vec(2)), 5: torch.from_numpy(vec(3))}}, path)
    registry = VectorRegistry()
    load_vector_file(path, registry)
    assert registry.layers_of("eiffel") is None and same_bits(registry.arrays_of("eiffel")[ANY_LAYER], vec(1))
    assert registry.layers_of("happy") == (3, 5)
    assert same_bits(registry.arrays_of("happy")[5], vec(3))

    single = tmp_path / "calm.pt"
    torch.save(torch.from_numpy(vec(4)).to(torch.float64), single)
    load_vector_file(single, registry)
    load_vector_file(f"{single}#name=serene", registry)
    assert {"calm", "serene"} <= set(registry.names())
    assert same_bits(registry.arrays_of("serene")[ANY_LAYER], vec(4))


def test_pt_2d_tensor_is_refused(tmp_path):
    path = tmp_path / "matrix.pt"
    torch.save(torch.zeros(4, D), path)
    with pytest.raises(ValueError, match=r"2-D tensor \(4, 16\).*Save a dict instead"):
        load_vector_file(path, VectorRegistry())


def test_pt_non_vector_values_are_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"a": torch.zeros(2, 3)}, path)
    with pytest.raises(ValueError, match=r"\['a'\]: expected a 1-D tensor, got shape \(2, 3\)"):
        load_vector_file(path, VectorRegistry())
    torch.save({3.5: torch.zeros(D)}, path)
    with pytest.raises(ValueError, match="keys must be"):
        load_vector_file(path, VectorRegistry())


class _Payload:
    """Unpickling this opens (creates) ``marker``: code run by the pickle itself."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pt_with_pickled_code_is_refused_and_nothing_runs(tmp_path, writer):
    # The payload is live: unpickling it for real creates its marker.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "steering_vectors.pt"
    payload = {"eiffel": torch.zeros(D), "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(payload, file, protocol=2)
    registry = VectorRegistry()
    with pytest.raises(ValueError, match="refused to load.*could run code"):
        load_vector_file(path, registry)
    assert not marker.exists()
    assert len(registry) == 0


# --- .safetensors --------------------------------------------------------------------------


def test_safetensors_layout(tmp_path):
    path = tmp_path / "vectors.safetensors"
    save_file(
        {
            "eiffel": vec(1),
            "happy.layer.3": vec(2),
            "happy.layer.12": vec(3),
            "L2/F9": vec(4),
            "half": vec(5).astype(np.float16),
        },
        str(path),
    )
    registry = VectorRegistry()
    load_vector_file(path, registry)
    assert registry.names() == ["L2/F9", "eiffel", "half", "happy"]
    assert registry.layers_of("happy") == (3, 12)
    assert same_bits(registry.arrays_of("happy")[12], vec(3))
    assert registry.features() == [(2, 9)]
    assert same_bits(registry.array(registry.feature_digest(2, 9)), vec(4))
    assert same_bits(registry.arrays_of("half")[ANY_LAYER], vec(5).astype(np.float16).astype(np.float32))


def test_safetensors_refuses_ambiguous_content(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"m": np.zeros((3, D), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"\['m'\]: expected a 1-D tensor, got shape \(3, 16\)"):
        load_vector_file(path, VectorRegistry())
    save_file({"x": vec(1), "x.layer.2": vec(2)}, str(path))
    with pytest.raises(ValueError, match="'x' is both a plain vector and a layered one"):
        load_vector_file(path, VectorRegistry())

    registry = VectorRegistry()
    registry.add("odd.layer.2", vec(1))
    with pytest.raises(ValueError, match="reads back as one layer of a layered vector"):
        export_vectors(registry, ["odd.layer.2"], tmp_path / "out.safetensors")


# --- round trips ----------------------------------------------------------------------------


def _sample_registry() -> VectorRegistry:
    registry = VectorRegistry()
    registry.add("eiffel", vec(1))
    registry.add("happy", {1: vec(2), 7: vec(3), 30: vec(4)})
    registry.add_feature(11, 74457, vec(5), source="test")
    return registry


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_is_bit_exact(tmp_path, suffix):
    source = _sample_registry()
    path = export_vectors(source, ["eiffel", "happy", "L11/F74457"], tmp_path / f"out{suffix}")
    loaded = VectorRegistry()
    load_vector_file(path, loaded)
    assert loaded.names() == source.names()
    assert loaded.features() == [(11, 74457)]
    for name in source.names():
        assert loaded.layers_of(name) == source.layers_of(name)
        assert loaded.info(name).digest == source.info(name).digest  # digest of float32 bytes
        for layer, array in source.arrays_of(name).items():
            assert same_bits(loaded.arrays_of(name)[layer], array)


def test_export_single_vector_at_layers(tmp_path):
    path = export_vectors(_sample_registry(), "eiffel", tmp_path / "eiffel.safetensors", layers=[4, 2])
    loaded = VectorRegistry()
    load_vector_file(path, loaded)
    assert loaded.layers_of("eiffel") == (2, 4)
    assert all(same_bits(v, vec(1)) for v in loaded.arrays_of("eiffel").values())
    with pytest.raises(ValueError, match="'happy' is layered"):
        export_vectors(_sample_registry(), "happy", tmp_path / "x.safetensors", layers=[2])
    with pytest.raises(KeyError, match="no vector named 'nope'; loaded: L11/F74457, eiffel, happy"):
        export_vectors(_sample_registry(), "nope", tmp_path / "x.pt")


# --- GGUF control vectors ------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"missing {key}"
    return field.types[0], field.contents()


def test_gguf_written_file_has_llamacpp_layout(tmp_path):
    path = export_vectors(_sample_registry(), "happy", tmp_path / "happy.gguf", model_hint="mistral")
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == (gguf.GGUFValueType.STRING, "controlvector")
    assert _field(reader, "controlvector.model_hint") == (gguf.GGUFValueType.STRING, "mistral")
    assert _field(reader, "controlvector.layer_count") == (gguf.GGUFValueType.INT32, 3)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.30", "direction.7"]
    for name, seed in [("direction.1", 2), ("direction.7", 3), ("direction.30", 4)]:
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in tensors[name].shape] == [D]
        assert same_bits(np.asarray(tensors[name].data), vec(seed))

    loaded = VectorRegistry()
    load_vector_file(path, loaded)
    assert loaded.names() == ["happy"] and loaded.layers_of("happy") == (1, 7, 30)
    assert loaded.info("happy").digest == _sample_registry().info("happy").digest


def test_gguf_export_of_a_single_vector(tmp_path):
    registry = _sample_registry()
    path = export_vectors(registry, "eiffel", tmp_path / "eiffel.gguf", layers=[3, 5])
    assert _field(gguf.GGUFReader(path), "controlvector.model_hint")[1] == "llama"
    loaded = VectorRegistry()
    load_vector_file(f"{path}#name=tower", loaded)
    assert loaded.layers_of("tower") == (3, 5)
    assert all(same_bits(v, vec(1)) for v in loaded.arrays_of("tower").values())

    with pytest.raises(ValueError, match="give the layers"):
        export_vectors(registry, "eiffel", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="layer 0.*llama.cpp rejects direction.0"):
        export_vectors(registry, "eiffel", tmp_path / "x.gguf", layers=[0, 1])
    with pytest.raises(ValueError, match="holds one vector; got 2"):
        export_vectors(registry, ["eiffel", "L11/F74457"], tmp_path / "x.gguf", layers=[1])
    with pytest.raises(ValueError, match="model_hint is recorded in .gguf"):
        export_vectors(registry, "eiffel", tmp_path / "x.pt", model_hint="llama")


def test_gguf_written_the_repeng_way_maps_layers(tmp_path):
    # As repeng's ControlVector.export_gguf writes it (vgel/repeng repeng/extract.py), for
    # directions keyed by the index into model.model.layers.
    directions = {15: vec(15), 2: vec(2), 1: vec(1)}
    path = tmp_path / "honest.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    registry = load_registry([str(path)])
    assert registry.layers_of("honest") == (1, 2, 15)
    assert all(same_bits(registry.arrays_of("honest")[layer], v) for layer, v in directions.items())
    # Named without layers, it steers its own layers: direction.N at our layer N.
    shape = ModelShape(num_layers=16, hidden_size=D, steerable_layers=tuple(range(16)), max_directions=4)
    resolved = resolve({"vectors": [{"name": "honest", "scale": 2.0}]}, shape, registry)
    assert [(op.layer, op.digest, op.coeff) for op in resolved.ops] == [
        (layer, vector_digest(directions[layer]), 2.0) for layer in (1, 2, 15)
    ]


def test_gguf_that_is_not_a_control_vector_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, D), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture is 'llama'.*not a control vector"):
        load_vector_file(path, VectorRegistry())


# --- sources: hf://, options, unsupported types --------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "hf://spaces/huggingface/eiffel-tower-llama-demo/steering_vectors.pt",
            HubFile("huggingface/eiffel-tower-llama-demo", "steering_vectors.pt", "space"),
        ),
        (
            "hf://andyrdt/saes-llama-3.1-8b-instruct/resid_post_layer_11/trainer_1/ae.pt",
            HubFile("andyrdt/saes-llama-3.1-8b-instruct", "resid_post_layer_11/trainer_1/ae.pt", "model"),
        ),
        ("hf://datasets/me/vecs@v1.0/a/b.gguf#name=x", HubFile("me/vecs", "a/b.gguf", "dataset", "v1.0")),
        ("hf://models/me/m@refs%2Fpr%2F3/v.safetensors", HubFile("me/m", "v.safetensors", "model", "refs/pr/3")),
    ],
)
def test_hf_source_strings(text, expected):
    source = parse_source(text, ("name",))
    assert source.hub == expected
    assert source.location == text.split("#")[0]


@pytest.mark.parametrize("text", ["hf://only/two", "hf://spaces/a/b", "hf://a//b/c.pt", "hf://a/@/c.pt"])
def test_bad_hf_source_strings(text):
    with pytest.raises(ValueError, match=r"expected hf://"):
        parse_source(text)


def test_hub_vector_file_downloads_through_hf_hub_download(tmp_path, monkeypatch):
    local = tmp_path / "downloaded.pt"
    torch.save({(15, 21576): torch.from_numpy(vec(9))}, local)
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(local)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    text = "hf://spaces/huggingface/eiffel-tower-llama-demo/steering_vectors.pt"
    registry = load_registry([text])
    assert calls == [
        dict(repo_id="huggingface/eiffel-tower-llama-demo", filename="steering_vectors.pt", repo_type="space", revision=None)
    ]
    assert registry.features() == [(15, 21576)]
    assert registry.info("L15/F21576").source == text


def test_local_sources_never_touch_the_hub(tmp_path, monkeypatch):
    def no_network(**kwargs):
        raise AssertionError(f"hf_hub_download called for a local path: {kwargs}")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    path = tmp_path / "odd#dir" / "v.pt"  # a '#' not followed by key=value is part of the path
    path.parent.mkdir()
    torch.save({"a": torch.from_numpy(vec(1))}, path)
    assert load_registry([str(path)]).names() == ["a"]
    # The type is checked before any download.
    with pytest.raises(ValueError, match="unsupported vector file type '.npy'"):
        load_registry(["hf://me/repo/vectors.npy"])


def test_unsupported_types_and_options_name_what_is_supported(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported vector file type '\.npy'; supported: \.pt, \.pth .*\.safetensors .*\.gguf"):
        load_vector_file(tmp_path / "v.npy", VectorRegistry())
    with pytest.raises(ValueError, match=r"unsupported vector file type '\.npz'; supported: \.pt"):
        export_vectors(_sample_registry(), "eiffel", tmp_path / "v.npz")
    with pytest.raises(ValueError, match="unknown option layer; options here: name"):
        load_vector_file(f"{tmp_path / 'v.pt'}#layer=3", VectorRegistry())
    with pytest.raises(FileNotFoundError, match="vector file not found"):
        load_vector_file(tmp_path / "missing.gguf", VectorRegistry())


def test_absolute_source_keeps_hub_addresses_and_options(tmp_path, monkeypatch):
    from vllm_steer.vectors.sources import absolute_source

    monkeypatch.chdir(tmp_path)
    hub = "hf://spaces/huggingface/eiffel-tower-llama-demo/steering_vectors.pt"
    assert absolute_source(hub) == hub
    assert absolute_source(f"{hub}#name=x") == f"{hub}#name=x"
    assert absolute_source("cv.gguf#name=joy") == f"{tmp_path / 'cv.gguf'}#name=joy"
    assert absolute_source("sae/blocks.3.hook_resid_post#layer=2") == f"{tmp_path}/sae/blocks.3.hook_resid_post#layer=2"
