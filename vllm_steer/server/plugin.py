"""vLLM endpoint plugin: the ``steering`` field, ``/v1/steering/*``, steering metrics and the
browser playground (``/playground``).

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (they add HTTP routes);
``vllm-steer serve`` sets ``VLLM_PLUGINS=vllm_steer``. Without it, steering still works
through ``vllm_xargs`` (the general plugin is what validates and isolates requests).
"""

from __future__ import annotations

import asyncio
import logging
from argparse import Namespace
from typing import Any

from vllm_steer.core.spec import SteeringSpec
from vllm_steer.engine import rpc, seam
from vllm_steer.engine.frontend import SteeringFrontend, frontend_of
from vllm_steer.server import features, pages
from vllm_steer.server.metrics import SteeringMetrics
from vllm_steer.server.middleware import GENERATION_PATHS, SteeringFieldMiddleware
from vllm_steer.server.routes import router

logger = logging.getLogger("vllm_steer")
POLL_SECONDS = 5.0


class ServerState:
    """What the middleware and routes of one API server process share."""

    def __init__(self, engine_client: Any, frontend: SteeringFrontend, metrics: SteeringMetrics):
        self.engine_client = engine_client
        self.frontend = frontend
        self.settings = frontend.settings
        self.metrics = metrics

    async def send(self, call: rpc.WorkerCall) -> list:
        return await rpc.send_async(self.engine_client, call)

    async def sync_workers(self) -> None:
        """Push what the registry directory gained to this engine's workers (another
        replica's registrations; a restarted server's vectors) and remove what it lost.
        Meanwhile, requests carry such vectors inline (SteeringFrontend.resolve)."""
        for call, done in self.frontend.worker_updates():
            await self.send(call)
            done()

    async def poll_workers(self) -> None:
        """Every POLL_SECONDS: the workers' stats, and the registry directory's changes."""
        while True:
            try:
                await self.sync_workers()
                stats = await self.send(rpc.stats())
                self.metrics.worker_stats(stats[0])
                self.metrics.registry_vectors.set(len(self.frontend.registry))
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                logger.debug("steering stats poll failed", exc_info=True)
            await asyncio.sleep(POLL_SECONDS)


def document_steering_field(app) -> None:
    """Add the ``steering`` field to the generation requests of the OpenAPI document, so
    clients and schema-driven tools (e.g. schemathesis) see it."""

    build = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        spec_schema = SteeringSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(spec_schema.pop("$defs", {}))
        schemas["SteeringSpec"] = spec_schema
        for path in GENERATION_PATHS:
            body = document.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {})
            ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            request_schema = schemas.get(ref.rsplit("/", 1)[-1])
            if request_schema is not None:
                request_schema.setdefault("properties", {})["steering"] = {
                    "anyOf": [{"$ref": "#/components/schemas/SteeringSpec"}, {"type": "null"}],
                    "description": "Per-request activation steering (vllm-steer).",
                }
        app.openapi_schema = document
        return document

    app.openapi = openapi


class SteeringEndpoints:
    name = "vllm_steer"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        app.include_router(router)
        app.include_router(features.router)
        app.include_router(pages.router)
        app.add_middleware(SteeringFieldMiddleware)
        document_steering_field(app)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        frontend = frontend_of(seam.served_input_processor(engine_client)) if engine_client is not None else None
        if frontend is None:
            logger.warning("vllm_steer endpoints are idle: the served model is not steerable")
            return
        server = ServerState(engine_client, frontend, SteeringMetrics.get())
        if frontend.store is None and getattr(args, "api_server_count", 1) and args.api_server_count > 1:
            logger.warning(
                "with --api-server-count > 1, registry changes stay in the API server that made them "
                "unless hf_overrides steering.registry_dir names a shared directory (vllm-steer serve sets one)"
            )
        await server.sync_workers()
        server.metrics.registry_vectors.set(len(frontend.registry))
        server.poll_task = asyncio.get_running_loop().create_task(server.poll_workers())
        state.vllm_steer = server
