"""Plain-text tables of found features, for the command line."""

from __future__ import annotations

from vllm_steer.discovery.encode import FeatureActivation, PromptFeatures
from vllm_steer.discovery.explanations import FeatureMatch


def features_table(prompt: str, result: PromptFeatures) -> str:
    """One prompt's top features: rank, feature, activation, label (and the token, per token)."""
    if result.tokens is None:
        rows = [[str(rank), *_cells(f)] for rank, f in enumerate(result.features or [], 1)]
        return _table(f"{prompt!r} ({result.over})", ["#", "feature", "activation", "label"], rows)
    rows = [[str(t.position), repr(t.token), *_cells(f)] for t in result.tokens for f in t.features]
    return _table(f"{prompt!r} (per token)", ["pos", "token", "feature", "activation", "label"], rows)


def matches_table(query: str, matches: list[FeatureMatch]) -> str:
    return _table(f"features labelled {query!r}", ["feature", "label"], [[str(m.feature), m.label] for m in matches])


def _cells(feature: FeatureActivation) -> list[str]:
    return [str(feature.feature), f"{feature.activation:.4g}", feature.label or ""]


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return f"{title}: none"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join([title, *lines])
