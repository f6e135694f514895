"""The ``steering`` field on vLLM's generation endpoints, and the body limit.

vLLM accepts unknown top-level request fields and drops them, and its ``vllm_xargs`` holds
only flat values. This ASGI middleware runs before vLLM parses the body: it takes the
``steering`` field (or ``vllm_xargs.steering``), resolves it against the served model and
the registry (the only time it is resolved), and hands vLLM the result sealed for the
front-end hook as ``vllm_xargs.steering`` (a string). A bad spec is answered here with a
400 in vLLM's error shape, naming the field. Every response carries
``x-vllm-steer-fingerprint``: the applied steering's content fingerprint, or ``none``.
Bodies of the generation routes and of ``POST /v1/steering/*`` over ``max_body_bytes``
get a 413.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_steer.core.spec import SteeringError

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
STEERING_PREFIX = "/v1/steering/"
FINGERPRINT_HEADER = b"x-vllm-steer-fingerprint"


def error_body(message: str, status: int, param: str | None = None, err_type: str = "BadRequestError") -> bytes:
    """vLLM's (and OpenAI's) error shape."""
    return json.dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}}).encode()


async def send_error(send: Send, status: int, message: str, param: str | None = None, err_type: str = "BadRequestError") -> None:
    body = error_body(message, status, param, err_type)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class SteeringFieldMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        state = getattr(getattr(scope.get("app"), "state", None), "vllm_steer", None)
        generation = path in GENERATION_PATHS
        limited = generation or path.startswith(STEERING_PREFIX)
        if scope["type"] != "http" or scope.get("method") != "POST" or not limited or state is None:
            await self.app(scope, receive, send)
            return
        limit = state.settings.max_body_bytes
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await send_error(send, 413, f"request body exceeds {limit} bytes (hf_overrides steering.max_body_bytes)", None, "RequestEntityTooLarge")
            return
        except ConnectionResetError:
            return
        if not generation:
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            body, fingerprint = self._rewrite(body, state)
        except SteeringError as exc:
            state.metrics.rejected()
            await send_error(send, 400, str(exc), exc.field)
            return
        await self.app(scope, _replay(body, receive), _with_header(send, fingerprint))

    @staticmethod
    def _rewrite(body: bytes, state: Any) -> tuple[bytes, str]:
        try:
            request = json.loads(body)
        except ValueError:
            return body, "none"  # not JSON: vLLM answers with its own error
        if not isinstance(request, dict):
            return body, "none"
        xargs = request.get("vllm_xargs")
        xargs = dict(xargs) if isinstance(xargs, dict) else xargs
        spec = request.pop("steering", None)
        if isinstance(xargs, dict) and "steering" in xargs:
            if spec is not None:
                raise SteeringError("give the spec once: either 'steering' or 'vllm_xargs.steering'")
            spec = xargs.pop("steering")
        if spec is None:
            state.metrics.request(steered=False)
            return body, "none"
        resolved = state.frontend.resolve(spec)
        state.metrics.request(steered=resolved is not None)
        if resolved is None:
            fingerprint = "none"
        else:
            xargs = xargs if isinstance(xargs, dict) else {}
            xargs["steering"] = state.frontend.seal(resolved)
            fingerprint = resolved.fingerprint
        if xargs:
            request["vllm_xargs"] = xargs
        else:
            request.pop("vllm_xargs", None)
        return json.dumps(request).encode(), fingerprint


def _replay(body: bytes, receive: Receive) -> Receive:
    """The (rewritten) body once, then the client's own messages (a disconnect, when it comes)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_header(send: Send, fingerprint: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (FINGERPRINT_HEADER, fingerprint.encode())]}
        await send(message)

    return wrapped
