"""Run-time registry changes, kept in a directory every API server process shares.

    <registry_dir>/names.json           {name: {"vectors": {layer: hex digest}, "source": ...} | null}
    <registry_dir>/objects/<hex>.f32    float32 little-endian bytes, named by their sha256

Objects are immutable (content-addressed); ``names.json`` is replaced atomically under a
file lock. ``null`` marks a deleted name (also one loaded from a vector file at start).
Each process calls ``refresh`` before it resolves names: one ``stat`` when nothing changed.
A restarted server finds the same names pointing at the same digests.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vllm_steer.core.spec import DIGEST_PREFIX, vector_digest
from vllm_steer.core.registry import ANY_LAYER, Vector, VectorRegistry


class RegistryStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self._names_file = self.root / "names.json"
        self._seen: tuple[int, int] | None = None

    # ---- reading ------------------------------------------------------------------------
    def _read_names(self) -> dict:
        try:
            return json.loads(self._names_file.read_text())
        except FileNotFoundError:
            return {}

    def refresh(self, registry: VectorRegistry) -> None:
        """Apply the directory's changes to ``registry`` if the directory changed."""
        try:
            stat = self._names_file.stat()
        except FileNotFoundError:
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        for name, entry in self._read_names().items():
            if entry is None:
                if name in registry:
                    registry.remove(name)
            elif name not in registry or registry.info(name).digest != entry["digest"]:
                registry.add(name, self._load(entry["vectors"]), replace=True, source=entry["source"])
        self._seen = seen

    def entries(self) -> dict:
        return {name: entry for name, entry in self._read_names().items() if entry is not None}

    def load(self, name: str) -> Vector:
        return self._load(self._read_names()[name]["vectors"])

    def _load(self, vectors: dict[str, str]) -> Vector:
        arrays = {int(layer): np.fromfile(self.root / "objects" / f"{hex_}.f32", dtype="<f4") for layer, hex_ in vectors.items()}
        return arrays[ANY_LAYER] if ANY_LAYER in arrays else arrays

    # ---- writing ------------------------------------------------------------------------
    @contextmanager
    def _locked_names(self):
        with open(self.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            names = self._read_names()
            yield names
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".names.")
            with os.fdopen(fd, "w") as out:
                json.dump(names, out, indent=1, sort_keys=True)
            os.replace(tmp, self._names_file)

    def _write_object(self, array: np.ndarray) -> str:
        hex_ = vector_digest(array).removeprefix(DIGEST_PREFIX)
        path = self.root / "objects" / f"{hex_}.f32"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".obj.")
            with os.fdopen(fd, "wb") as out:
                out.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
            os.replace(tmp, path)
        return hex_

    def put(self, name: str, vector: Vector, *, digest: str, source: str, replace: bool) -> None:
        arrays = vector if isinstance(vector, dict) else {ANY_LAYER: vector}
        objects = {str(layer): self._write_object(array) for layer, array in arrays.items()}
        with self._locked_names() as names:
            if names.get(name) is not None and not replace:
                raise ValueError(f"vector {name!r} already exists; send \"replace\": true to replace it")
            names[name] = {"vectors": objects, "digest": digest, "source": source}

    def delete(self, name: str) -> None:
        with self._locked_names() as names:
            names[name] = None
