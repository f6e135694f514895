"""Finding features through the engine: which SAE, which tokens to capture, and the results.

Shared by the offline API (``SteeredLLM.top_features``) and the server
(``POST /v1/steering/features``); each runs the captures on its own engine. The stream is
the one capture records (offline.py): the output of decoder layer ``sae.layer``, the same
stream steering edits, computed by the serving engine. Capture keeps one row per request
(the last prompt token's, or the prompt's mean stream), while a feature's mean activation
needs every token's stream, so for ``over`` "mean" and "token" each token is captured as the
last token of its own prefix request (the stream at a position depends only on the tokens
up to it): ``n`` tokens cost ``n`` requests and ``n(n+1)/2`` prompt tokens. A leading BOS
token is left out of "mean" and "token" unless ``include_bos`` (its activations are
outliers on most models; Neuronpedia leaves it out too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_steer.discovery.encode import Over, PromptFeatures, top_features_of_streams
from vllm_steer.discovery.explanations import Explanations, attach_labels
from vllm_steer.core.resolve import check_layer
from vllm_steer.core.spec import SteeringError
from vllm_steer.vectors import absolute_source, load_sae

MAX_TOP_K = 1000


class FeatureQuery(BaseModel):
    """What to find: the prompts (text, token ids, or a conversation rendered with the
    model's chat template and its generation prompt), or ``messages``, one conversation;
    the SAE by ``sae`` (its source as loaded) or ``layer`` (optional when one is loaded)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str | list[int] | list[dict[str, str]]] | None = None
    messages: list[dict[str, str]] | None = None  # {"role": ..., "content": ...}
    sae: str | None = None
    layer: int | None = None
    k: int = Field(default=20, ge=1, le=MAX_TOP_K)
    over: Over = "last"
    include_bos: bool = False

    @classmethod
    def parse(cls, value: dict[str, Any]) -> FeatureQuery:
        """Validate; a problem is one SteeringError naming its field."""
        try:
            query = cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            loc = first["loc"]
            field = f"{loc[0]}[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else str(loc[0]) if loc else "body"
            raise SteeringError(first["msg"].removeprefix("Value error, "), field) from None
        if (query.prompts is None) == (query.messages is None):
            raise SteeringError("give either 'prompts' or 'messages'", "prompts")
        if query.prompts is not None and not query.prompts:
            raise SteeringError("give at least one prompt", "prompts")
        if query.sae is not None and query.layer is not None:
            raise SteeringError("name the SAE by 'sae' or by 'layer', not both", "layer")
        return query

    @property
    def all_prompts(self) -> list[Any]:
        return list(self.prompts) if self.prompts is not None else [self.messages]


def choose_sae(registry, query: FeatureQuery, load: bool = False):
    """The loaded SAE the query names (SteeringError naming 'sae' or 'layer' otherwise); with
    ``load`` (the offline API), an SAE source that is not loaded is read (vectors.load_sae)."""
    loaded = registry.feature_sources()
    described = ", ".join(f"{s.description} (layer {s.layer})" for s in loaded) or "none (load one with --sae / sae=[...])"
    if query.layer is not None:
        found = [s for s in loaded if s.layer == query.layer]
        if not found:
            raise SteeringError(f"no SAE is loaded for layer {query.layer}; loaded: {described}", "layer")
        return found[0]
    if query.sae is not None:
        found = [s for s in loaded if s.description in (query.sae, absolute_source(query.sae))]
        if not found and load:
            try:
                return load_sae(query.sae)
            except (OSError, ValueError) as exc:
                raise SteeringError(str(exc), "sae") from None
        if not found:
            raise SteeringError(f"no SAE {query.sae!r} is loaded; loaded: {described}", "sae")
        return found[0]
    if len(loaded) != 1:
        raise SteeringError(f"name the SAE with 'sae' or 'layer'; loaded: {described}", "sae")
    return loaded[0]


def check_sae(frontend, sae, query: FeatureQuery) -> None:
    """The engine can capture the SAE's layer and the SAE can encode it."""
    field = "layer" if query.layer is not None else "sae"
    if not frontend.settings.capture:
        raise SteeringError("capture is off: finding features captures the stream; start with capture on "
                            "(vllm-steer serve --capture, SteeredLLM(capture=True))", "")
    check_layer(sae.layer, frontend.shape, field)
    if sae.d_model != frontend.shape.hidden_size:
        raise SteeringError(f"{sae.description} has d_model {sae.d_model}; this model's hidden size is "
                            f"{frontend.shape.hidden_size}", field)
    try:
        sae.encoding  # noqa: B018 - reads the biases and threshold, or says why it cannot encode
    except ValueError as exc:
        raise SteeringError(str(exc), field) from None
    if query.k > sae.num_features:
        raise SteeringError(f"must be at most the SAE's {sae.num_features} features", "k")


@dataclass
class CapturePlan:
    """The token positions of each prompt to capture, each as the last token of its prefix."""

    token_ids: list[list[int]]
    positions: list[list[int]]

    @classmethod
    def of(cls, token_ids: list[list[int]], over: Over, bos_token_id: int | None, include_bos: bool) -> CapturePlan:
        positions = []
        for ids in token_ids:
            first = int(not include_bos and len(ids) > 1 and bos_token_id is not None and ids[0] == bos_token_id)
            positions.append([len(ids) - 1] if over == "last" else list(range(first, len(ids))))
        return cls(token_ids, positions)

    def prefixes(self) -> list[list[int]]:
        return [ids[: p + 1] for ids, positions in zip(self.token_ids, self.positions) for p in positions]

    def streams(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The captured rows (in ``prefixes`` order) as one ``[positions, hidden]`` array per prompt."""
        out, first = [], 0
        for positions in self.positions:
            out.append(np.stack(rows[first : first + len(positions)]))
            first += len(positions)
        return out


def optional_tokenizer(get_tokenizer: Callable[[], Any]) -> Any:
    """The engine's tokenizer, or None for an engine started with ``skip_tokenizer_init``
    (vLLM's ``get_tokenizer`` raises ValueError there): token-id prompts need none."""
    try:
        return get_tokenizer()
    except ValueError:
        return None


def prompt_token_ids(tokenizer, prompt: Any) -> list[int]:
    """Token ids as vLLM makes them: text with the tokenizer's special tokens, a conversation
    through the chat template with the generation prompt, token ids as given."""
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if isinstance(prompt, str) or (prompt and all(isinstance(m, dict) for m in prompt)):
        if tokenizer is None:
            raise ValueError("text and conversations need the tokenizer, and this engine runs without one "
                             "(skip_tokenizer_init): give token ids")
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))  # the template has the special tokens
    return [int(t) for t in prompt]


def plan(tokenizer, query: FeatureQuery, bos_token_id: int | None = None) -> CapturePlan:
    """What to capture; ``tokenizer`` may be None when every prompt is token ids (then
    ``bos_token_id``, the model config's, says which first token to leave out)."""
    token_ids = []
    for index, prompt in enumerate(query.all_prompts):
        field = f"prompts[{index}]" if query.prompts is not None else "messages"
        try:
            token_ids.append(prompt_token_ids(tokenizer, prompt))
        except ValueError as exc:
            raise SteeringError(str(exc), field) from None
        if not token_ids[-1]:
            raise SteeringError("has no tokens", field)
    if tokenizer is not None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
    return CapturePlan.of(token_ids, query.over, bos_token_id, query.include_bos)


def results(sae, capture_plan: CapturePlan, streams: list[np.ndarray], query: FeatureQuery, tokenizer,
            explanations: Explanations | None = None) -> list[PromptFeatures]:
    """The top features of the captured streams; each token's text where there is a tokenizer."""
    tokens = None if tokenizer is None else [[tokenizer.decode([ids[p]]) for p in positions]
                                             for ids, positions in zip(capture_plan.token_ids, capture_plan.positions)]
    found = top_features_of_streams(streams, sae, query.k, query.over, positions=capture_plan.positions, tokens=tokens)
    return attach_labels(found, explanations) if explanations is not None else found
