"""``POST /v1/steering/features``: an SAE's most active features on prompts, as JSON.

    POST /v1/steering/features  {"prompts": ["The Eiffel Tower"]   (or "messages": one conversation),
                                 "layer": 20 (or "sae": its source as loaded), "k": 20,
                                 "over": "last" | "mean" | "token", "include_bos": false}
    -> {"object": "steering.features", "sae": ..., "layer": 20, "over": "last", "k": 20,
        "data": [{"over": "last", "features": [{"feature": 123, "activation": 4.2}, ...]}, ...]}

The SAE is one the server loaded (``--sae``), and capture must be on (``--capture``): the
stream is captured by this server's own engine, each captured token a one-token generation
request carrying ``steering_capture`` (the same path as ``SteeredLLM.capture``; see
features/finder.py for which tokens), and collected from the workers. The encoder is read in a
worker thread, so the server keeps serving meanwhile. A bad request is a 400 whose ``param``
names the field; ``over`` "mean" and "token" cost a request per prompt token, so a request
may capture at most ``MAX_POSITIONS`` tokens.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from vllm import SamplingParams

from vllm_steer.core.spec import SteeringError
from vllm_steer.discovery import finder
from vllm_steer.engine import rpc, seam
from vllm_steer.server.middleware import error_body

router = APIRouter()
MAX_POSITIONS = 1024
BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": finder.FeatureQuery.model_json_schema()}}}}


@router.post("/v1/steering/features", openapi_extra=BODY)
async def find_features(raw_request: Request):
    state = getattr(raw_request.app.state, "vllm_steer", None)
    try:
        if state is None:
            raise SteeringError("this server's model is not steerable", "model")
        query = finder.FeatureQuery.parse(await _json_object(raw_request))
        sae = finder.choose_sae(state.frontend.registry, query)
        finder.check_sae(state.frontend, sae, query)
        tokenizer = finder.optional_tokenizer(lambda: seam.engine_tokenizer(state.engine_client))
        plan = finder.plan(tokenizer, query, state.frontend.bos_token_id)
        prefixes = plan.prefixes()
        if len(prefixes) > MAX_POSITIONS:
            raise SteeringError(f"{len(prefixes)} tokens to capture; at most {MAX_POSITIONS} per request "
                                "(over 'mean' and 'token' capture every prompt token)", "prompts")
    except SteeringError as exc:
        body = json.loads(error_body(str(exc), 400, exc.field or None))
        return JSONResponse(status_code=400, content=body)
    rows = await _capture(state, prefixes, sae.layer)
    found = await asyncio.to_thread(finder.results, sae, plan, plan.streams(rows), query, tokenizer)
    return {"object": "steering.features", "sae": sae.description, "layer": sae.layer, "over": query.over,
            "k": query.k, "data": [result.model_dump(exclude_none=True) for result in found]}


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise SteeringError("the body is not JSON", "body") from None
    if not isinstance(body, dict):
        raise SteeringError("the body must be a JSON object", "body")
    return body


async def _capture(state, prefixes: list[list[int]], layer: int) -> list:
    """The stream after ``layer`` at the last token of each prefix, through the served engine."""
    keys = [f"vllm-steer-features-{uuid.uuid4().hex}" for _ in prefixes]

    async def one(token_ids: list[int], key: str) -> None:
        capture = {"key": key, "layers": [layer], "reduce": "last"}
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"steering_capture": capture})
        async for _ in seam.engine_generate(state.engine_client, token_ids, params, key):
            pass

    await asyncio.gather(*(one(ids, key) for ids, key in zip(prefixes, keys)))
    rows = rpc.merge_captures(await state.send(rpc.collect_captures(keys)), keys, [layer])
    return [row[layer] for row in rows]
