"""The registry API: ``/v1/steering/vectors``.

    GET    /v1/steering/vectors           every named vector: name, digest, dimension, norm, layers, source
    POST   /v1/steering/vectors           register one: inline floats/base64, {layer: floats}, a server
                                          file (inside steering.file_dirs), an uploaded file (its bytes,
                                          base64) or a loaded feature/SAE feature
    DELETE /v1/steering/vectors/{name}
    GET    /v1/steering/stats             per worker: runner, slots in use, vectors, per-step histogram

Under ``/v1``, so ``--api-key`` guards them like every other route. A change reaches every
worker before it is visible to requests; requests already accepted keep their vectors.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_steer.core.spec import SteeringError, decode_b64
from vllm_steer.engine import rpc
from vllm_steer.server.middleware import error_body
from vllm_steer.vectors import VectorRegistry, load_vector_file
from vllm_steer.vectors.files import format_for

router = APIRouter()


class UploadedFile(BaseModel):
    """A vector file sent in the request (the playground's upload), read like a server file."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=256, description="its suffix picks the format: .pt/.pth, .safetensors, .gguf")
    content_b64: str = Field(min_length=1, description="the file's bytes, base64")


SOURCES = ("vector", "vector_b64", "layers", "file", "upload", "feature")


class VectorRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    vector: list[float] | None = None
    vector_b64: str | None = None
    layers: dict[int, list[float] | str] | None = Field(default=None, description="one vector per layer: floats or base64")
    file: str | None = Field(default=None, description="a vector file inside the server's steering.file_dirs")
    upload: UploadedFile | None = Field(default=None, description="a vector file sent in the request")
    file_vector: str | None = Field(default=None, description="which vector of the file or upload (when it holds several)")
    feature: tuple[int, int] | None = Field(default=None, description="[layer, feature_id] of a loaded feature or SAE")
    replace: bool = False
    source: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _one_source(self) -> VectorRegistration:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of " + ", ".join(f"'{k}'" for k in SOURCES[:-1]) + f" or '{SOURCES[-1]}'")
        return self


def _json_error(status: int, message: str, param: str | None, err_type: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=json.loads(error_body(message, status, param, err_type)))


def _info(frontend, name: str) -> dict[str, Any]:
    info = frontend.registry.info(name)
    return {
        "object": "steering.vector",
        "name": info.name,
        "digest": info.digest,
        "dimension": info.dimension,
        "norm": info.norm,
        "layers": list(info.layers) if info.layers is not None else None,
        "source": info.source,
    }


def _state(request: Request):
    state = getattr(request.app.state, "vllm_steer", None)
    if state is None:
        raise SteeringError("this server's model is not steerable", "model")
    return state


@router.get("/v1/steering/vectors")
async def list_vectors(raw_request: Request):
    try:
        frontend = _state(raw_request).frontend
    except SteeringError as exc:
        return _json_error(400, str(exc), exc.field, "BadRequestError")
    frontend.refresh()
    return {"object": "list", "data": [_info(frontend, name) for name in frontend.registry.names()]}


@router.get("/v1/steering/stats")
async def steering_stats(raw_request: Request):
    """Per worker: the model runner, steering slots in use (0 when idle: a debug count for
    leaks), vectors and arrays held, requests whose steering could not be applied, and the
    histogram of distinct configs among admitted requests per step."""
    try:
        state = _state(raw_request)
    except SteeringError as exc:
        return _json_error(400, str(exc), exc.field, "BadRequestError")
    return {"object": "steering.stats", "workers": await state.send(rpc.stats())}


@router.post("/v1/steering/vectors", status_code=201)
async def register_vector(body: VectorRegistration, raw_request: Request):
    try:
        state = _state(raw_request)
        vector, source = _vector_of(body, state.frontend)
        registration = state.frontend.registration(body.name, vector, replace=body.replace, source=body.source or source)
    except SteeringError as exc:
        return _json_error(400, str(exc), exc.field, "BadRequestError")
    await state.send(registration.worker_call)
    try:
        registration.commit()
    except ValueError as exc:  # another API server registered the name meanwhile
        return _json_error(400, str(exc), "name", "BadRequestError")
    state.metrics.registry_vectors.set(len(state.frontend.registry))
    return JSONResponse(status_code=201, content=_info(state.frontend, body.name))


@router.delete("/v1/steering/vectors/{name:path}")
async def delete_vector(name: str, raw_request: Request):
    try:
        state = _state(raw_request)
        call = state.frontend.remove_vector(name)
    except SteeringError as exc:
        return _json_error(400, str(exc), exc.field, "BadRequestError")
    except KeyError:
        return _json_error(404, f"no vector named {name!r}", "name", "NotFoundError")
    await state.send(call)
    state.metrics.registry_vectors.set(len(state.frontend.registry))
    return {"object": "steering.vector.deleted", "name": name, "deleted": True}


def _vector_of(body: VectorRegistration, frontend) -> tuple[Any, str]:
    """The vector a registration names, and a description of where it came from."""
    if body.vector is not None:
        return body.vector, "inline"
    if body.vector_b64 is not None:
        return _b64(body.vector_b64, "vector_b64"), "inline"
    if body.layers is not None:
        if not body.layers:
            raise SteeringError("give at least one layer", "layers")
        return {
            layer: _b64(v, f"layers[{layer}]") if isinstance(v, str) else v for layer, v in body.layers.items()
        }, "inline"
    if body.feature is not None:
        layer, feature_id = body.feature
        try:
            digest = frontend.registry.feature_digest(layer, feature_id)
        except (KeyError, ValueError) as exc:
            raise SteeringError(f"feature [{layer}, {feature_id}] cannot be read: {exc}", "feature") from None
        if digest is None:
            raise SteeringError(f"no feature [{layer}, {feature_id}] is loaded or in a configured SAE", "feature")
        return frontend.registry.array(digest), f"feature {layer}/{feature_id}"
    if body.upload is not None:
        return _from_upload(body.upload, body.file_vector)
    return _from_file(body, frontend.settings.file_dirs)


def _b64(text: str, field: str):
    try:
        return decode_b64(text)
    except ValueError as exc:
        raise SteeringError(str(exc), field) from None


def _from_file(body: VectorRegistration, file_dirs: tuple[str, ...]) -> tuple[Any, str]:
    if not file_dirs:
        raise SteeringError("reading files is off on this server (hf_overrides steering.file_dirs)", "file")
    path = Path(os.path.realpath(body.file))  # symlinks resolved: their target must be inside too
    roots = [Path(os.path.realpath(d)) for d in file_dirs]
    if not any(path.is_relative_to(root) for root in roots):
        raise SteeringError(f"only files inside {', '.join(map(str, roots))} may be read", "file")
    vector, choice = _read_file(path, body.file_vector, "file")
    return vector, f"{path}:{choice}"


def _from_upload(upload: UploadedFile, file_vector: str | None) -> tuple[Any, str]:
    # Only a plain file name is kept: never a path, and no '#' (sources.py reads options there).
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", Path(upload.filename).name).lstrip(".")
    try:
        format_for(Path(filename).suffix, upload.filename)
    except ValueError as exc:
        raise SteeringError(str(exc), "upload.filename") from None
    try:
        content = base64.b64decode(upload.content_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SteeringError(f"not valid base64 ({exc})", "upload.content_b64") from None
    with tempfile.TemporaryDirectory(prefix="vllm-steer-upload-") as folder:
        path = Path(folder) / filename
        path.write_bytes(content)
        vector, choice = _read_file(path, file_vector, "upload", shown=upload.filename)
    return vector, f"upload:{filename}:{choice}"


def _read_file(path: Path, file_vector: str | None, field: str, shown: str | None = None) -> tuple[Any, str]:
    """The vector ``file_vector`` names in a vector file (or its only one), and that name."""
    registry = VectorRegistry()
    try:
        load_vector_file(path, registry)
    except (OSError, ValueError) as exc:
        message = str(exc) if shown is None else str(exc).replace(str(path), shown)  # no temporary paths in errors
        raise SteeringError(message, field) from None
    names = registry.names()
    choice = file_vector or (names[0] if len(names) == 1 else None)
    if choice not in names:
        raise SteeringError(f"name the vector to take with 'file_vector'; the file holds: {', '.join(names[:20])}", "file_vector")
    return registry.vector(choice), choice
