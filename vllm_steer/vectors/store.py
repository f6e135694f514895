"""Run-time registry changes, kept in a directory every API server process shares.

    <registry_dir>/names.json           {name: {"vectors": {layer: hex digest}, "source": ...} | null}
    <registry_dir>/objects/<hex>.f32    float32 little-endian bytes, named by their sha256

Objects are immutable (content-addressed); ``names.json`` is replaced atomically under a
file lock. ``null`` marks a deleted name (also one loaded from a vector file at start).
Each process calls ``refresh`` before it resolves names: one ``stat`` when nothing changed.
A restarted server finds the same names pointing at the same digests.

Every change prunes the objects no name points at any more, under the lock (a writer adds
its objects under it too, so none is pruned before its name is written). A reader holding
an older ``names.json`` may find an object gone: that means the file changed, so it reads
it again.
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
from vllm_steer.core.registry import ANY_LAYER, Vector, VectorRegistry, as_vector

# Reads of names.json and its objects, each after a change pruned what the last one named.
READ_ATTEMPTS = 5


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
        for attempt in range(READ_ATTEMPTS):
            names = self._read_names()
            try:
                changes = {
                    name: entry and self._load(entry["vectors"])
                    for name, entry in names.items()
                    if (entry is None and name in registry)
                    or (entry is not None and (name not in registry or registry.entry_digest(name) != entry["digest"]))
                }
                break
            except FileNotFoundError:  # pruned by a change since this names.json was read
                if attempt == READ_ATTEMPTS - 1:
                    raise
        for name, vector in changes.items():
            if vector is None:
                registry.remove(name)
            else:
                registry.add(name, vector, replace=True, source=names[name]["source"])
        self._seen = seen

    def _load(self, vectors: dict[str, str]) -> Vector:
        return as_vector({int(layer): np.fromfile(self.root / "objects" / f"{hex_}.f32", dtype="<f4") for layer, hex_ in vectors.items()})

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
            self._prune(names)

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
        with self._locked_names() as names:
            if names.get(name) is not None and not replace:
                raise ValueError(f"vector {name!r} already exists; send \"replace\": true to replace it")
            objects = {str(layer): self._write_object(array) for layer, array in arrays.items()}
            names[name] = {"vectors": objects, "digest": digest, "source": source}

    def delete(self, name: str) -> None:
        with self._locked_names() as names:
            names[name] = None

    def _prune(self, names: dict) -> None:
        """Remove the objects no name points at (called under the lock)."""
        kept = {f"{hex_}.f32" for entry in names.values() if entry for hex_ in entry["vectors"].values()}
        for path in (self.root / "objects").glob("*.f32"):
            if path.name not in kept:
                path.unlink(missing_ok=True)
