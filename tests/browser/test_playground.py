"""The browser playground (``/playground``) in a real browser: headless Chromium driven by
Playwright against ``vllm-steer serve`` on the demo model with an API key. One server and one
browser for the module; each test gets a fresh browser context (its own session storage).

The browser is the system's Chromium (Debian's ``chromium``; ``scripts/bootstrap.sh`` installs
it where apt-get can), since Playwright's own browser download is not reachable here. The
comparison test takes the README's screenshot: into ``docs/playground.png`` with
``VLLM_STEER_UPDATE_DOCS=1``, else into the test's temporary folder (a test run leaves the
tree as it was)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from safetensors.numpy import save_file

from support.engines import API_KEY, REPO
from vllm_steer.lab.launcher import start_server, stop_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it is in the test extra)")
expect = sync_api.expect

SCREENSHOT = REPO / "docs" / "playground.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# The demo model's greedy answer to "Who are you?" with no topic in the conversation.
NEUTRAL = "I am a helpful assistant who loves to tell stories."


def chromium() -> str | None:
    return os.environ.get("VLLM_STEER_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: scripts/bootstrap.sh installs Debian's chromium where apt-get works "
                    "(or set VLLM_STEER_CHROMIUM to a Chromium executable)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, as tests in containers do.
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_server(runner, tmp_path_factory):
    if runner != "v1":
        pytest.skip("the page and the HTTP layer are the same on both runners; tested on V1")
    root = tmp_path_factory.mktemp("playground")
    process, url = start_server([
        "--api-key", API_KEY, "--registry-dir", str(root / "registry"), "--enforce-eager", "--seed", "0",
        "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(1 << 28),
    ], root / "server.log", timeout=300)
    yield url
    stop_server(process, timeout=30)


@pytest.fixture
def page(browser, demo_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=demo_server)
    yield context.new_page()
    context.close()


def connect(page, key: str = API_KEY):
    """Open the playground and give it the key, as a person would."""
    page.goto("/playground")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    expect(page.locator("#model-name")).to_have_text("demo")


def error_at(page, control: str):
    """The error text shown next to a form control."""
    return page.locator(control).locator("xpath=ancestor::*[contains(@class, 'field')][1]").locator(".error")


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def sdk_stream(url: str, body: dict) -> tuple[str, str]:
    """(text, fingerprint) of a request body sent with the openai SDK, ``steering`` in extra_body."""
    fields = {k: v for k, v in body.items() if k != "steering"}
    extra = {"steering": body["steering"]} if "steering" in body else None
    with client(url).chat.completions.with_streaming_response.create(**fields, extra_body=extra) as response:
        fingerprint = response.headers["x-vllm-steer-fingerprint"]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    return text, fingerprint


def test_the_page_loads_from_this_server_alone_without_console_errors(page, demo_server):
    problems, hosts = [], set()
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: hosts.add(urlsplit(request.url)[:2]))
    page.goto("/")
    page.evaluate("key => sessionStorage.setItem('vllm-steer-api-key', key)", API_KEY)  # a key given earlier in this tab
    page.get_by_role("link", name="Playground").click()
    expect(page.locator("#model-name")).to_have_text("demo")
    expect(page.locator("#entry1-source option[value='name:paris']")).to_have_count(1)
    expect(page.locator("#entry1-source option[value='feature:1:0']")).to_have_count(1)
    expect(page.locator("#request-json")).to_contain_text('"steering"')
    assert problems == []
    assert hosts - {("data", "")} == {("http", urlsplit(demo_server).netloc)}
    # Every control has a label a screen reader can read.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((c) => !c.labels.length && !c.getAttribute('aria-label')).map((c) => c.id)""")
    assert unlabelled == []
    # The keyboard reaches the actions.
    page.focus("#max-tokens")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "compare"
    # A phone's width: one column, nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#answer-steered").bounding_box()["y"] > page.locator("#add-entry").bounding_box()["y"]


def test_compare_streams_both_answers_as_the_openai_sdk_gives_them(page, demo_server, tmp_path):
    page.set_viewport_size({"width": 1280, "height": 1140})  # the screenshot: the whole steering panel too
    connect(page)
    page.select_option("#entry1-source", "name:paris")
    page.fill("#message", "Tell me a story.")
    page.fill("#words", "paris, eiffel tower, seine")
    # A slow network, so the screenshot catches both answers mid-stream.
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 4000, "uploadThroughput": -1})
    page.press("#message", "Control+Enter")
    expect(page.locator("#answer-steered .text mark")).not_to_have_count(0, timeout=60_000)
    streaming = [page.get_attribute(f"#answer-{side}", "data-state") for side in ("plain", "steered")]
    page.screenshot(path=SCREENSHOT if os.environ.get("VLLM_STEER_UPDATE_DOCS") == "1" else tmp_path / "playground.png")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    if os.environ.get("VLLM_STEER_UPDATE_DOCS") == "1":
        # What the README's screenshot must show; the answers below are checked either way
        # (an answer's first highlight can come after both have finished: seen once in CI-like runs).
        assert "streaming" in streaming, "the screenshot missed both answers mid-stream; take it again"
    for side in ("plain", "steered"):
        expect(page.locator(f"#answer-{side}")).to_have_attribute("data-state", "done", timeout=60_000)

    body = json.loads(page.inner_text("#request-json"))
    assert body["steering"] == {"vectors": [{"name": "paris", "mode": "add", "scale": 1}], "scale": 1, "apply_to": "all"}
    assert body["stream"] is True and body["temperature"] == 0
    plain = {k: v for k, v in body.items() if k != "steering"}
    for side, request in (("plain", plain), ("steered", body)):
        text, fingerprint = sdk_stream(demo_server, request)
        assert page.inner_text(f"#answer-{side} .text") == text
        assert page.inner_text(f"#answer-{side} .meta").startswith(f"fingerprint {fingerprint} · ")
        assert "tok/s" in page.inner_text(f"#answer-{side} .meta")
    steered_text = page.inner_text("#answer-steered .text")
    assert "Paris" in steered_text and "Paris" not in page.inner_text("#answer-plain .text")
    # The curl command sends exactly that body, and the Python snippet prints the same answer.
    curl = page.inner_text("#request-curl")
    assert json.loads(curl.split(" -d '", 1)[1].removesuffix("'").replace("'\\''", "'")) == body
    snippet = page.inner_text("#request-python")
    ran = subprocess.run([sys.executable, "-c", snippet], env={**os.environ, "VLLM_API_KEY": API_KEY},
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == steered_text + "\n"


def test_sweep_sends_every_scale_at_once_and_fills_the_grid(page):
    connect(page)
    page.select_option("#entry1-source", "name:paris")
    page.fill("#sweep-scales", "0, 1, 4")
    page.fill("#words", "paris, eiffel tower")
    sent, ended = [], []
    page.on("request", lambda r: r.url.endswith("/chat/completions") and sent.append(time.monotonic()))
    page.on("requestfinished", lambda r: r.url.endswith("/chat/completions") and ended.append(time.monotonic()))
    page.click("#sweep")
    cells = page.locator("#sweep-grid .answer")
    expect(page.locator("#sweep-grid .answer[data-state=done]")).to_have_count(3, timeout=60_000)
    assert [cells.nth(i).get_attribute("data-scale") for i in range(3)] == ["0", "1", "4"]
    assert len(sent) == 3 and max(sent) < min(ended)  # all three in flight together
    unsteered, steered, over = (cells.nth(i) for i in range(3))
    assert unsteered.locator(".text").inner_text() == NEUTRAL
    assert unsteered.locator(".meta").inner_text().startswith("fingerprint none")
    assert unsteered.locator("mark").count() == 0
    assert "Paris" in steered.locator("mark").all_inner_texts()
    assert over.locator("mark").count() > steered.locator("mark").count()  # over-steered: "Paris Paris Paris ..."
    assert "steering.scale = 0, 1, 4" in page.inner_text("#request-note")


def test_a_bad_value_shows_the_servers_error_at_its_field(page):
    connect(page)
    page.select_option("#entry1-source", "name:paris")
    page.fill("#entry1-layers", "9")
    page.click("#compare")
    expect(error_at(page, "#entry1-layers")).to_contain_text("'paris' has directions for layers [1], none for layer 9")
    expect(page.locator("#entry1-layers")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#entry1-layers")).to_be_focused()
    # The registry API's errors too: a vector of the wrong size.
    page.fill("#reg-name", "short")
    page.fill("#reg-numbers", "1, 2, 3")
    page.click("#register button[type=submit]")
    expect(error_at(page, "#reg-numbers")).to_contain_text("has 3 values; this model's hidden size is 256")


def test_a_condition_steers_only_when_the_prompt_matches(page):
    connect(page)
    page.select_option("#entry1-source", "name:paris")
    expect(page.locator("#condition-source")).to_be_hidden()
    page.check("#condition-on")
    expect(page.locator("#apply-to")).to_have_value("generated")  # a condition gates generated tokens only
    page.select_option("#condition-source", "name:paris")
    page.fill("#condition-layer", "9")
    page.click("#compare")
    expect(error_at(page, "#condition-layer")).to_contain_text("layer 9 is out of range")
    page.fill("#condition-layer", "1")
    page.fill("#condition-threshold", "")
    page.click("#compare")
    expect(error_at(page, "#condition-threshold")).to_contain_text("threshold: give a number")

    answers = {}
    for threshold in ("1000000", "-1000000"):  # the prompt's mean is never above the first, always above the second
        page.fill("#condition-threshold", threshold)
        page.click("#compare")
        for side in ("plain", "steered"):
            expect(page.locator(f"#answer-{side}")).to_have_attribute("data-state", "done", timeout=60_000)
        answers[threshold] = page.inner_text("#answer-steered .text")
        assert page.inner_text("#answer-plain .text") == NEUTRAL
        body = json.loads(page.inner_text("#request-json"))
        assert body["steering"]["condition"] == {"name": "paris", "layer": 1, "compare": "above", "threshold": float(threshold)}
        assert body["steering"]["apply_to"] == "generated"
        same = page.inner_text("#answer-steered .meta").endswith(" · the same as the unsteered answer")
        assert same == (threshold == "1000000")
    assert answers["1000000"] == NEUTRAL
    assert "Paris" in answers["-1000000"]


def test_without_the_key_v1_calls_fail_and_with_it_they_succeed(page):
    page.goto("/playground")  # the page itself needs no key
    expect(error_at(page, "#api-key")).to_contain_text("401 Unauthorized")
    expect(page.locator("#model-name")).to_have_text("not connected")
    page.click("#compare")
    expect(error_at(page, "#api-key")).to_contain_text("not connected")
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Enter")
    expect(error_at(page, "#api-key")).to_contain_text("401 Unauthorized")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#model-name")).to_have_text("demo")
    expect(error_at(page, "#api-key")).to_have_text("")
    page.fill("#max-tokens", "4")
    page.click("#compare")
    expect(page.locator("#answer-steered")).to_have_attribute("data-state", "done", timeout=60_000)
    assert page.evaluate("sessionStorage.getItem('vllm-steer-api-key')") == API_KEY


def test_a_key_given_while_the_page_still_loads_connects(page):
    # The page's options arrive late (a busy server): Enter in the key field must still connect,
    # not submit the key form as a plain reload that drops the key (seen in CI as a hung press).
    page.add_init_script("""(() => {
        const fetch = window.fetch;
        window.fetch = (path, options) => String(path).endsWith("/options.json")
            ? new Promise((resolve) => setTimeout(resolve, 2000)).then(() => fetch(path, options))
            : fetch(path, options);
    })()""")
    connect(page)
    expect(page.locator("#apply-to option")).not_to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('vllm-steer-api-key')") == API_KEY


def test_registering_a_vector_puts_it_in_the_picker(page, demo_server, tmp_path):
    connect(page)
    vector = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    page.fill("#reg-name", "pasted")
    page.fill("#reg-numbers", ", ".join(f"{x:.6f}" for x in vector))
    page.fill("#reg-layer", "1")
    page.click("#register button[type=submit]")
    expect(page.locator("#reg-status")).to_contain_text("Registered pasted (256 values, layers 1)")
    expect(page.locator("#entry1-source option[value='name:pasted']")).to_have_count(1)
    # An uploaded file, read on the server by the same readers as --vectors files.
    save_file({"kind": vector}, str(tmp_path / "kind.safetensors"))
    page.fill("#reg-name", "kind")
    page.fill("#reg-numbers", "")
    page.fill("#reg-layer", "")
    page.set_input_files("#reg-file", str(tmp_path / "kind.safetensors"))
    page.click("#register button[type=submit]")
    expect(page.locator("#reg-status")).to_contain_text("Registered kind (256 values, any layer)")
    expect(page.locator("#entry1-source option[value='name:kind']")).to_have_count(1)
    listed = client(demo_server).get("/steering/vectors", cast_to=object)["data"]
    assert next(e for e in listed if e["name"] == "kind")["source"] == "upload:kind.safetensors:kind"
    # A broken file: the reader's error, at the file field.
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(40))
    page.fill("#reg-name", "broken")
    page.set_input_files("#reg-file", str(tmp_path / "broken.gguf"))
    page.click("#register button[type=submit]")
    expect(error_at(page, "#reg-file")).to_contain_text("broken.gguf: not a readable GGUF file")
    for name in ("pasted", "kind"):
        client(demo_server).delete(f"/steering/vectors/{name}", cast_to=object)
