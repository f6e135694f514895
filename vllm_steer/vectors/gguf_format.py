"""llama.cpp / repeng control vectors (``.gguf``), read and written with the ``gguf`` package.

A control vector is one layered vector: one direction per layer. It is registered under
the file's stem (or the source's ``#name=``) and steers all its layers when a spec names it
without ``layers``.

File layout, as llama.cpp reads it (``llama_control_vector_load_one`` in
ggerganov/llama.cpp ``common/common.cpp``, now ``common_control_vector_load_one``) and as
llama.cpp's ``cvector-generator`` (ggml-org/llama.cpp
``tools/cvector-generator/cvector-generator.cpp``, ``export_gguf``) and repeng
(vgel/repeng ``repeng/extract.py``, ``ControlVector.export_gguf``) write it:

- metadata ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (a
  string: the model's architecture or HF ``model_type``, e.g. ``"llama"``) and
  ``controlvector.layer_count`` (the number of direction tensors; int32 from llama.cpp,
  uint32 from repeng);
- one F32 1-D tensor per layer named ``direction.{N}``; llama.cpp refuses ``direction.0``.

Layer numbering -- ``direction.N`` is our layer ``N`` (identity, both ways):

- llama.cpp adds ``direction.N`` to the output of decoder layer ``N`` (0-based):
  ``llama_adapter_cvec::apply`` (ggml-org/llama.cpp ``src/llama-adapter.cpp``) puts the data
  of ``direction.il`` in ``tensors[il]`` ("there's never a tensor for layer 0"), and the layer
  loop of every model graph, e.g. ggml-org/llama.cpp ``src/models/llama.cpp``
  (``for (int il = 0; il < n_layer; ++il)``), ends with ``cur = build_cvec(cur, il);
  cb(cur, "l_out", il)`` after the FFN residual add: the output of layer ``il``.
- repeng keys ``directions`` by the index into ``model.model.layers``: ``read_representations``
  reads ``out.hidden_states[layer + 1]`` (the output of ``model.model.layers[layer]``;
  ``hidden_states[0]`` is the embeddings) and ``repeng/control.py`` adds ``directions[layer]``
  to the output of ``model.model.layers[layer]``; ``export_gguf`` writes it as
  ``direction.{layer}``.
- Ours: layer ``L`` is the residual stream at the output of HF ``model.model.layers[L]``.

So a file's ``direction.N`` is registered at layer ``N``, and exporting layer ``L`` writes
``direction.L``. (llama.cpp's ``cvector-generator`` computes ``direction.{il+1}`` from the
output of layer ``il`` -- ``tools/cvector-generator/pca.hpp`` -- but its files are applied as
above; we read what a file means when applied.) Reading accepts ``direction.0`` (repeng can
write it); writing refuses layer 0, since llama.cpp would reject the whole file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vllm_steer.vectors.common import Entries, is_layered
from vllm_steer.core.registry import VectorRegistry

SUFFIXES = (".gguf",)
DESCRIPTION = "llama.cpp/repeng GGUF control vector"
ARCHITECTURE = "controlvector"
KEY_ARCHITECTURE = "general.architecture"
KEY_MODEL_HINT = f"{ARCHITECTURE}.model_hint"
KEY_LAYER_COUNT = f"{ARCHITECTURE}.layer_count"
DIRECTION = re.compile(r"direction\.(\d+)")
DEFAULT_MODEL_HINT = "llama"


def read(path: Path, registry: VectorRegistry, *, name: str | None = None, source: str | None = None) -> None:
    from gguf import GGMLQuantizationType, GGUFReader  # gguf: ~0.6 s to import; only .gguf files need it

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError) as exc:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from None
    architecture = _string_field(reader, KEY_ARCHITECTURE)
    if architecture is not None and architecture != ARCHITECTURE:
        raise ValueError(
            f"{path}: general.architecture is {architecture!r}, not {ARCHITECTURE!r}: "
            "not a control vector (a model file?)"
        )
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64}
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        match = DIRECTION.fullmatch(tensor.name)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r}; a control vector holds direction.N tensors")
        if tensor.tensor_type not in readable:
            raise ValueError(
                f"{path}: {tensor.name} is {tensor.tensor_type.name}; control vectors are F32 (F16/F64 also read)"
            )
        if int(np.prod(tensor.shape[1:])) != 1:
            raise ValueError(f"{path}: {tensor.name} has shape {[int(n) for n in tensor.shape]}; expected a 1-D vector")
        layer = int(match[1])
        if layer in directions:
            raise ValueError(f"{path}: {tensor.name} appears twice")
        directions[layer] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if not directions:
        raise ValueError(f"{path}: no direction.N tensors: not a control vector")
    registry.add(name or path.stem, directions, replace=True, source=source or str(path))


def write(path: Path, entries: Entries, *, model_hint: str | None = None) -> None:
    from gguf import GGUFWriter  # gguf: ~0.6 s to import; only .gguf files need it

    if len(entries) != 1:
        raise ValueError(f"a GGUF control vector holds one vector; got {len(entries)}: {', '.join(entries)}")
    ((name, layers),) = entries.items()
    if not is_layered(layers):
        raise ValueError(f"{name!r} is one vector for any layer: give the layers to write it at")
    if 0 in layers:
        raise ValueError(
            f"{name!r} has a direction for layer 0, which a GGUF control vector cannot hold: llama.cpp "
            "rejects direction.0 (it applies direction.N at the output of layer N, N >= 1)"
        )
    writer = GGUFWriter(str(path), ARCHITECTURE)
    try:
        writer.add_string(KEY_MODEL_HINT, model_hint or DEFAULT_MODEL_HINT)
        writer.add_int32(KEY_LAYER_COUNT, len(layers))
        for layer, vector in sorted(layers.items()):
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
