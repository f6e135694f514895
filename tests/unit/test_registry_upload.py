"""The registry API's upload (a vector file's bytes in the request, as the playground sends
them) and broken vector files: every failure is a ValueError naming the field, no 500."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pydantic import ValidationError

from vllm_steer.server.routes import UploadedFile, VectorRegistration, _from_upload
from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import VectorRegistry, export_vectors, load_vector_file

ONES = np.ones(8, np.float32)


def file_bytes(tmp_path, suffix: str, vectors: dict) -> bytes:
    registry = VectorRegistry()
    for name, layers in vectors.items():
        registry.add(name, layers, source="test")
    return export_vectors(registry, list(vectors), tmp_path / f"made{suffix}").read_bytes()


def upload(filename: str, content: bytes) -> UploadedFile:
    return UploadedFile(filename=filename, content_b64=base64.b64encode(content).decode())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".gguf"])
def test_an_uploaded_file_of_each_format_gives_its_vector(tmp_path, suffix):
    layered = {1: ONES, 2: 2 * ONES}
    vector, source = _from_upload(upload(f"calm{suffix}", file_bytes(tmp_path, suffix, {"calm": layered})), None)
    assert sorted(vector) == [1, 2] and np.array_equal(vector[2], 2 * ONES)
    assert source.startswith(f"upload:calm{suffix}:")


def test_a_file_of_several_vectors_needs_file_vector(tmp_path):
    content = file_bytes(tmp_path, ".safetensors", {"a": ONES, "b": 3 * ONES})
    with pytest.raises(SteeringError) as error:
        _from_upload(upload("two.safetensors", content), None)
    assert error.value.field == "file_vector" and "a, b" in str(error.value)
    vector, _ = _from_upload(upload("two.safetensors", content), "b")
    assert np.array_equal(vector, 3 * ONES)


@pytest.mark.parametrize("filename, content, field, words", [
    ("v.npy", b"x", "upload.filename", "unsupported vector file type"),
    ("v.safetensors", None, "upload.content_b64", "not valid base64"),
    ("v.safetensors", b"\x00" * 40, "upload", "v.safetensors: not a readable safetensors file"),
    ("v.gguf", b"GGUF" + b"\x00" * 40, "upload", "v.gguf: not a readable GGUF file"),
    ("v.pt", b"PK", "upload", "v.pt: refused to load"),
])
def test_bad_uploads_name_the_field(filename, content, field, words):
    sent = upload(filename, content) if content is not None else UploadedFile(filename=filename, content_b64="***")
    with pytest.raises(SteeringError) as error:
        _from_upload(sent, None)
    assert error.value.field == field and words in str(error.value)
    assert "vllm-steer-upload-" not in str(error.value)  # the temporary folder is never shown


def test_an_uploaded_name_is_a_plain_file_name(tmp_path):
    content = file_bytes(tmp_path, ".gguf", {"x": {1: ONES}})
    _, source = _from_upload(upload("../../etc/#name=evil dir.gguf", content), None)
    assert source == "upload:_name_evil_dir.gguf:_name_evil_dir"


def test_upload_is_one_source_among_the_others():
    with pytest.raises(ValidationError, match="exactly one of .*'upload'"):
        VectorRegistration(name="n", vector=[1.0], upload={"filename": "a.pt", "content_b64": "AA=="})
    assert VectorRegistration(name="n", upload={"filename": "a.pt", "content_b64": "AA=="}).upload.filename == "a.pt"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".gguf"])
def test_a_truncated_vector_file_is_a_value_error_naming_it(tmp_path, suffix):
    whole = file_bytes(tmp_path, suffix, {"v": {1: ONES, 2: ONES}})
    for cut in (0, 10, len(whole) // 2, len(whole) - 3):
        path = tmp_path / f"cut{cut}{suffix}"
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}"):
            load_vector_file(path, VectorRegistry())
