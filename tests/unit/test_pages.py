"""The playground's routes without a server: what they serve and with which headers."""

from __future__ import annotations

from typing import get_args

from fastapi import FastAPI
from fastapi.testclient import TestClient

from vllm_steer.server import pages
from vllm_steer.core.spec import ApplyTo, Compare, Mode


def client() -> TestClient:
    app = FastAPI()
    app.include_router(pages.router)
    return TestClient(app)


def test_home_links_the_playground_and_the_page_loads_only_its_own_files():
    http = client()
    assert 'href="/playground"' in http.get("/").text
    page = http.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "http://" not in page.text and "https://" not in page.text
    for name, kind in pages.FILES.items():
        served = http.get(f"/playground/{name}")
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
        assert "http://" not in served.text and "https://" not in served.text
    assert http.get("/playground/../pages.py").status_code == 404
    assert http.get("/playground/index.html.bak").status_code == 404


def test_the_page_offers_the_specs_own_modes():
    assert client().get("/playground/options.json").json() == {
        "modes": list(get_args(Mode)), "apply_to": list(get_args(ApplyTo)), "compare": list(get_args(Compare))}


def test_the_page_is_outside_the_openapi_document():
    assert not any(path.startswith("/playground") or path == "/" for path in client().app.openapi()["paths"])
