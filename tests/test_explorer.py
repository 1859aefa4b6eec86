"""The explorer page in a real browser: `prismrec serve` (subprocess, 127.0.0.1) with two tiny exports,
driven by headless Chromium (Debian's package) through Playwright. Saves screenshots in a temporary folder,
or under reports/screenshots/ (the README's) with PRISMREC_UPDATE_SCREENSHOTS=1, so a test run leaves the
checkout clean."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving_fixtures import SHARED_DATA_PRESENT, serving_runs

REPO = Path(__file__).resolve().parents[1]
README_SCREENSHOTS = REPO / "reports" / "screenshots"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.skipif(not SHARED_DATA_PRESENT, reason="../shared/data/movielens-small is not present"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (it is in requirements.lock: `make venv`)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; "
                                                "`make test` installs it when run as root)"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    runs = serving_runs()
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PRISMREC_SERVE_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "prismrec", "serve", str(runs.sasrec_export),
                                str(runs.dmesr_export), "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prismrec serve exited: {process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("prismrec serve did not answer /health within 120 s")
        time.sleep(0.3)
    yield url, runs
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def _save_small_png(png: bytes, path: Path) -> None:
    """Screenshots are committed: keep them small (256-colour palette, optimised)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_explorer_item_search_and_user_view_in_chromium(served, tmp_path):
    from playwright import sync_api
    url, _runs = served
    screenshots = README_SCREENSHOTS if os.environ.get("PRISMREC_UPDATE_SCREENSHOTS") == "1" else tmp_path
    # Show a user whose held-out item one of the (barely trained) models finds, so the hit marking is on screen.
    user_id, marked = "1", "export-dmesr"
    with httpx.Client(base_url=url) as client:
        for prefix in "123456789":  # /users lists at most 100 ids per query
            candidates = client.get("/users", params={"query": prefix, "limit": 100}).json()["users"]
            found = next(((u, m) for u in candidates for m in ("export-dmesr", "export-sasrec")
                          if client.get(f"/users/{u}/recommendations", params={"model": m}).json()["hit_rank"]), None)
            if found:
                user_id, marked = found
                break
    expected = httpx.get(f"{url}/users/{user_id}/recommendations", params={"model": marked, "explain": "true"}).json()
    user = httpx.get(f"{url}/users/{user_id}").json()
    outside: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((url, "blob:", "data:")) else None)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            sync_api.expect(page.locator("#models-info")).to_contain_text("export-dmesr (dmesr")

            # Item search -> poster, original attributes, the three derived descriptions with their backend.
            page.fill("#item-query", "toy story")
            page.press("#item-query", "Enter")
            page.locator("#item-results li", has_text="Toy Story (1995)").click()
            sync_api.expect(page.locator("#item-title")).to_have_text("Toy Story")
            detail = page.locator("#item-detail")
            sync_api.expect(detail.locator("table.attrs")).to_contain_text("Adventure, Animation")
            for route, text in (("textual", "TEXTUAL view of Toy Story"), ("visual", "VISUAL view of Toy Story"),
                                ("hybrid", "HYBRID view of Toy Story")):
                sync_api.expect(detail.locator(f'[data-route="{route}"]')).to_contain_text(text)
            sync_api.expect(detail.locator("#derived")).to_contain_text("Derived semantics (export-dmesr)")
            sync_api.expect(detail.locator(".provenance")).to_have_text(
                "backend test-fixture · model random-embeddings · embedder random-normal-12d · artefact tiny")
            poster = detail.locator(".top img")
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=poster.element_handle())
            _save_small_png(page.screenshot(full_page=False), screenshots / "explorer-item.png")

            # User view: history strip (most recent first), held-out item, two exports side by side.
            page.click("#tab-users")
            page.fill("#user-id", user_id)
            page.select_option("#model-a", "export-sasrec")
            page.select_option("#model-b", "export-dmesr")
            page.click('#user-form button[type="submit"]')
            columns = page.locator("#compare .column")
            sync_api.expect(columns).to_have_count(2)
            shown_history = min(len(user["history"]), 40)
            sync_api.expect(page.locator("#history .card")).to_have_count(shown_history)
            first_history = page.locator("#history .card").first.get_attribute("data-item")
            assert first_history == user["history"][0]["item_id"]
            assert page.locator("#test-item .card").get_attribute("data-item") == user["test_item"]["item_id"]
            dmesr = page.locator(f'#compare .column[data-model="{marked}"]')
            sync_api.expect(dmesr.locator("ol.recs li")).to_have_count(10)
            shown = [li.get_attribute("data-item") for li in dmesr.locator("ol.recs li").all()]
            assert shown == [i["item_id"] for i in expected["items"]]
            assert dmesr.locator("li.hit").count() == sum(i["hit"] for i in expected["items"])
            if expected["hit_rank"] is not None:
                sync_api.expect(dmesr.locator("li.hit .badge")).to_have_text("HIT")
                sync_api.expect(dmesr.locator(".verdict")).to_have_text(f"test item at rank {expected['hit_rank']}")
            sync_api.expect(page.locator("#compare .column ol.recs li")).to_have_count(20)
            # Explanations under each recommendation: the history items behind it, with the reason.
            why = dmesr.locator("ol.recs li").first.locator("details.why")
            why.locator("summary").click()
            reason = why.locator(".reason").first
            sync_api.expect(reason).to_contain_text("without it the score")
            if marked == "export-dmesr":
                sync_api.expect(reason).to_contain_text("semantic similarity coarse")
            named = reason.get_attribute("data-because")
            assert named == expected["items"][0]["because"][0]["item_id"]
            assert named in {h["item_id"] for h in user["history"]}
            page.wait_for_function("() => [...document.querySelectorAll('#user-view img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.set_viewport_size({"width": 1280, "height": 1180})
            _save_small_png(page.screenshot(full_page=False), screenshots / "explorer-user.png")
            page.click("#history-all")
            sync_api.expect(page.locator("#history .card")).to_have_count(len(user["history"]))
            assert not errors, errors
        finally:
            browser.close()
    assert not outside, f"the page requested something other than the local server: {outside[:5]}"
    for name in ("explorer-item.png", "explorer-user.png"):
        assert 0 < (screenshots / name).stat().st_size < 400_000
