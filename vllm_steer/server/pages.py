"""The browser playground: ``GET /playground`` and its files, and a home page linking to it.

Plain HTML, CSS and JavaScript shipped in the package (``server/playground/``): no build step,
nothing loaded from other hosts (the Content-Security-Policy says so to the browser too).
The page and its files are outside ``/v1``, so they load without an API key; the page sends
the key with its own ``/v1`` requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from vllm_steer.core.spec import ApplyTo, Compare, Mode

PAGE_DIR = Path(__file__).parent / "playground"
FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
# Everything from this server; data: only for the empty favicon (no /favicon.ico request).
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
HOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vllm-steer</title><link rel="icon" href="data:,"></head>
<body><h1>vllm-steer</h1><ul>
<li><a href="/playground">Playground</a>: steer the served model in the browser</li>
<li><a href="/docs">API documentation</a></li>
</ul></body></html>
"""

router = APIRouter(include_in_schema=False)


@router.get("/")
async def home():
    return HTMLResponse(HOME, headers=HEADERS)


@router.get("/playground")
async def playground():
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/playground/options.json")
async def options():
    """The spec's choices, so the page offers exactly what this server's spec accepts."""
    return JSONResponse({"modes": list(get_args(Mode)), "apply_to": list(get_args(ApplyTo)), "compare": list(get_args(Compare))},
                        headers=HEADERS)


@router.get("/playground/{name}")
async def playground_file(name: str):
    if name not in FILES:
        return JSONResponse({"error": f"no playground file {name!r}"}, status_code=404)
    return FileResponse(PAGE_DIR / name, media_type=FILES[name], headers=HEADERS)
