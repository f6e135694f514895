"""Feature labels from a feature-explanations export, and finding features by label.

Neuronpedia's exports (docs.neuronpedia.org, "Exports") hold one explanation per object:
``{"modelId": "gemma-2-2b", "layer": "20-gemmascope-res-16k", "index": "10956",
"description": " references to Paris", "explanationModelName": "gpt-4o-mini", "typeName":
"oai_token-act-pair", ...}``. Read here: a JSON array of them (the ``explanations-only/*.json``
exports and ``/api/explanation/export``), JSON Lines (the ``v1/<model>/<source>/explanations/
batch-N.jsonl.gz`` exports; gzipped or not), or a folder of such files. ``layer`` is
Neuronpedia's SAE id (a "source"), not a layer number. A feature may have several
explanations: its label is the first one read; search looks at all of them.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from vllm_steer.discovery.encode import PromptFeatures

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


class FeatureMatch(BaseModel):
    feature: int
    label: str  # the matching explanation


class Explanations:
    """Feature index -> its explanations (one SAE's, from one export)."""

    def __init__(self, descriptions: dict[int, list[str]], source: str | None = None):
        self.descriptions = descriptions
        self.source = source  # Neuronpedia's "modelId/layer" of the entries, when they say

    def label(self, feature: int) -> str | None:
        found = self.descriptions.get(feature)
        return found[0] if found else None

    def __len__(self) -> int:
        return len(self.descriptions)


def load_explanations(path: str | Path, source: str | None = None) -> Explanations:
    """Read an explanations export (see the module docstring). A file holding several SAEs'
    explanations needs ``source``: Neuronpedia's ``layer`` (e.g. "20-gemmascope-res-16k") or
    ``modelId/layer``."""
    path = Path(path).expanduser()
    descriptions: dict[int, list[str]] = {}
    sources: dict[str, int] = {}
    for where, entry in _entries(path):
        if not isinstance(entry, dict) or "index" not in entry:
            raise ValueError(f"{where}: expected Neuronpedia explanation objects with 'index' and 'description'")
        name = "/".join(str(entry[key]) for key in ("modelId", "layer") if entry.get(key) is not None)
        if source is not None and source not in (name, str(entry.get("layer"))):
            continue
        try:
            index = int(entry["index"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'index' must be a feature number, not {entry['index']!r}") from None
        text = str(entry.get("description") or "").strip()
        if text:
            sources[name] = sources.get(name, 0) + 1
            descriptions.setdefault(index, []).append(text)
    if len(sources) > 1:
        raise ValueError(f"{path} holds explanations of several SAEs ({', '.join(sorted(sources))}): choose one with source=")
    if not descriptions:
        wanted = f" for source {source!r}" if source is not None else ""
        raise ValueError(f"{path}: no explanations{wanted} (expected Neuronpedia's export: objects with 'index' and 'description')")
    return Explanations(descriptions, next(iter(sources)) or None)


def search_features(query: str, explanations: Explanations | str | Path, limit: int = 20) -> list[FeatureMatch]:
    """Features whose explanation contains ``query`` (case-insensitive): an explanation that
    is the query first, then one containing it as a whole word, then anywhere; shorter
    explanations first (more specific), then by feature number."""
    text = query.strip().lower()
    if not text:
        raise ValueError("query: give some text to search for")
    if not isinstance(explanations, Explanations):
        explanations = load_explanations(explanations)
    word = re.compile(rf"\b{re.escape(text)}\b")
    best: dict[int, tuple] = {}
    for feature, descriptions in explanations.descriptions.items():
        for description in descriptions:
            lowered = description.lower()
            if text not in lowered:
                continue
            rank = (0 if lowered == text else 1 if word.search(lowered) else 2, len(description), feature)
            if feature not in best or rank < best[feature][0]:
                best[feature] = (rank, description)
    ordered = sorted(best.items(), key=lambda item: item[1][0])[:limit]
    return [FeatureMatch(feature=feature, label=description) for feature, (_, description) in ordered]


def attach_labels(results: list[PromptFeatures], explanations: Explanations) -> list[PromptFeatures]:
    """Set each listed feature's label (in place; returned for convenience)."""
    for result in results:
        for activation in [*(result.features or []), *(f for token in result.tokens or [] for f in token.features)]:
            activation.label = explanations.label(activation.feature)
    return results


def _entries(path: Path) -> Iterator[tuple[str, object]]:
    """(where, object) for every explanation object in a file or a folder of them."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES))
        if not files:
            raise ValueError(f"{path}: no explanation files ({', '.join(SUFFIXES)}) in the folder")
        for file in files:
            yield from _entries(file)
        return
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    if text.lstrip().startswith("["):
        entries = json.loads(text)
        for number, entry in enumerate(entries):
            yield f"{path}[{number}]", entry
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc}); expected a JSON array or JSON Lines") from None
