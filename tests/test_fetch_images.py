"""Image fetching against a real HTTP server on 127.0.0.1 serving good, bad, slow and huge answers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from prismrec.cli.app import app
from prismrec.data.generic import GenericDataset, GenericOptions
from prismrec.data.images import FetchOptions, FetchOutcome, ImageCache, decode_check, fetch_images, url_key


def image_bytes(fmt: str = "JPEG", size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, fmt)
    return buffer.getvalue()


JPEG = image_bytes()
PNG = image_bytes("PNG")


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.release_hang = threading.Event()
        self.hang_is_fast = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: ImageServer
    protocol_version = "HTTP/1.0"  # close-delimited bodies allow an answer without Content-Length

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def send(self, status: int, body: bytes, content_type: str = "image/jpeg", length: int | None = None,
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.hits[self.path] += 1
            hits = srv.hits[self.path]
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self.route(self.path, hits)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def route(self, path: str, hits: int) -> None:
        srv = self.server
        if path.startswith("/ok/"):
            self.send(200, JPEG, length=len(JPEG))
        elif path.startswith("/png/"):
            self.send(200, PNG, "image/png", len(PNG))
        elif path.startswith("/pace/"):  # slowish: lets concurrent requests overlap
            time.sleep(0.3)
            self.send(200, JPEG, length=len(JPEG))
        elif path == "/notfound":
            self.send(404, b"no", "text/plain")
        elif path == "/error500":
            self.send(500, b"boom", "text/plain")
        elif path == "/flaky":
            self.send(503, b"busy", "text/plain") if hits <= 2 else self.send(200, JPEG, length=len(JPEG))
        elif path == "/ratelimited":
            if hits == 1:
                self.send(429, b"slow down", "text/plain", headers={"Retry-After": "0"})
            else:
                self.send(200, PNG, "image/png", len(PNG))
        elif path == "/slow":
            time.sleep(5.0)
            self.send(200, JPEG, length=len(JPEG))
        elif path == "/trickle":  # headers at once, then a body too slow to finish within the limit
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for start in range(0, len(JPEG), 40):
                self.wfile.write(JPEG[start:start + 40])
                self.wfile.flush()
                time.sleep(0.3)
        elif path == "/big":
            self.send(200, b"\xff" * 300_000, length=300_000)
        elif path == "/big-unannounced":
            self.send(200, b"\xff" * 300_000)
        elif path == "/corrupt":
            self.send(200, b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
        elif path == "/truncated":
            self.send(200, JPEG[: len(JPEG) // 2])
        elif path == "/html":
            self.send(200, b"<html>sorry</html>", "text/html; charset=utf-8")
        elif path == "/redirect-file":
            self.send(302, b"", "text/plain", headers={"Location": "file:///etc/passwd"})
        elif path == "/redirect-ok":
            self.send(302, b"", "text/plain", headers={"Location": "/ok/target.jpg"})
        elif path.startswith("/hang/"):
            if not srv.hang_is_fast:
                srv.release_hang.wait(60)
            self.send(200, JPEG, length=len(JPEG))
        else:
            self.send(404, b"unknown", "text/plain")


@pytest.fixture
def server() -> Iterator[ImageServer]:
    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release_hang.set()
    srv.shutdown()
    srv.server_close()


# Generous per-request limit so a busy test machine does not turn good answers into timeouts; the
# timeout cases get their own short limit below.
FAST = FetchOptions(timeout_s=10, retries=2, backoff_s=0.05, max_bytes=100_000)


def test_good_bad_slow_huge_and_corrupt(tmp_path: Path, server: ImageServer) -> None:
    b = server.base
    urls = {name: f"{b}/{name}" for name in ("ok/a.jpg", "png/b", "notfound", "error500", "flaky", "ratelimited",
                                             "big", "big-unannounced", "corrupt", "truncated", "html",
                                             "redirect-file", "redirect-ok")}
    urls["ftp"] = "ftp://127.0.0.1/x.jpg"
    urls["file"] = "file:///etc/passwd"
    cache = ImageCache(tmp_path / "cache")
    report = fetch_images(list(urls.values()), cache, FAST, progress=False)
    by_url = {o.url: o for o in report.outcomes}

    def outcome(name: str) -> FetchOutcome:
        return by_url[urls[name]]

    for name in ("ok/a.jpg", "png/b", "flaky", "ratelimited", "redirect-ok"):
        assert outcome(name).status == "fetched", (name, outcome(name))
        assert outcome(name).path is not None and outcome(name).path.is_file()
    assert outcome("ok/a.jpg").path.suffix == ".jpg" and outcome("png/b").path.suffix == ".png"
    assert outcome("flaky").attempts == 3 and server.hits["/flaky"] == 3
    assert outcome("notfound").reason == "HTTP 404" and server.hits["/notfound"] == 1  # not retried
    assert outcome("error500").reason.startswith("HTTP 500 (after 3 attempts)") and server.hits["/error500"] == 3
    assert outcome("big").reason.startswith("too large: 300000 bytes")
    assert outcome("big-unannounced").reason.startswith("too large: more than 100000")
    assert outcome("corrupt").reason.startswith("not a decodable image")
    assert outcome("truncated").reason.startswith("not a decodable image")
    assert outcome("html").reason.startswith("content type: text/html")
    assert "scheme not allowed: 'file'" in outcome("redirect-file").reason
    assert "scheme not allowed: 'ftp'" in outcome("ftp").reason
    assert "scheme not allowed: 'file'" in outcome("file").reason
    assert report.count("fetched") == 5 and report.count("failed") == len(urls) - 5
    # Nothing half-written is left in the cache, and only decoded images are there.
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".part")]
    assert sorted(p.name for p in files if not p.name.endswith(".failed.json")) == sorted(
        f"{url_key(urls[n])}.{'png' if n in ('png/b', 'ratelimited') else 'jpg'}"
        for n in ("ok/a.jpg", "png/b", "flaky", "ratelimited", "redirect-ok"))

    # Second run: cached ones are not asked for again, permanent failures are skipped, transient retried.
    hits_before = Counter(server.hits)
    again = fetch_images(list(urls.values()), ImageCache(tmp_path / "cache"), FAST, progress=False)
    statuses = {o.url: o.status for o in again.outcomes}
    assert all(statuses[urls[n]] == "cached" for n in ("ok/a.jpg", "png/b", "flaky", "ratelimited", "redirect-ok"))
    assert statuses[urls["notfound"]] == "skipped" and statuses[urls["corrupt"]] == "skipped"
    assert statuses[urls["error500"]] == "failed"  # transient: asked again
    for path in ("/ok/a.jpg", "/png/b", "/notfound", "/corrupt", "/big", "/html"):
        assert server.hits[path] == hits_before[path], path
    retried = fetch_images([urls["notfound"]], ImageCache(tmp_path / "cache"),
                           FAST.model_copy(update={"retry_failed": True}), progress=False)
    assert retried.outcomes[0].status == "failed" and server.hits["/notfound"] == hits_before["/notfound"] + 1


def test_slow_answers_time_out_and_are_retried_next_run(tmp_path: Path, server: ImageServer) -> None:
    """A server that never answers, and one whose body trickles in too slowly, both hit the whole-request limit."""
    urls = [f"{server.base}/slow", f"{server.base}/trickle"]
    short = FetchOptions(timeout_s=1.5, retries=0)
    started = time.monotonic()
    report = fetch_images(urls, ImageCache(tmp_path / "cache"), short, progress=False)
    assert time.monotonic() - started < 4.5
    assert [o.status for o in report.outcomes] == ["failed", "failed"]
    assert all(o.reason.startswith("timeout: no complete answer within 1.5s") for o in report.outcomes)
    again = fetch_images(urls, ImageCache(tmp_path / "cache"), short, progress=False)
    assert [o.status for o in again.outcomes] == ["failed", "failed"]  # not marked as permanent failures
    assert server.hits["/slow"] == 2 and server.hits["/trickle"] == 2


def test_per_host_concurrency_limit(tmp_path: Path, server: ImageServer) -> None:
    urls = [f"{server.base}/pace/{n}.jpg" for n in range(8)]
    options = FetchOptions(concurrency=8, per_host=2, timeout_s=5)
    report = fetch_images(urls, ImageCache(tmp_path / "cache"), options, progress=False)
    assert report.count("fetched") == 8
    assert server.max_in_flight == 2


def test_decode_check_formats_and_bombs() -> None:
    assert decode_check(JPEG, 10_000) == "jpg"
    assert decode_check(image_bytes("WEBP"), 10_000) == "webp"
    with pytest.raises(Exception, match="too many pixels"):
        decode_check(image_bytes("PNG", 200), 10_000)


def write_url_shop(root: Path, urls: list[str]) -> None:
    root.mkdir(parents=True)
    items = [f"i{n}" for n in range(len(urls))]
    pd.DataFrame({"user": ["u1"] * len(items), "item": items, "timestamp": range(len(items))}).to_csv(
        root / "interactions.csv", index=False)
    pd.DataFrame({"item": items, "title": [f"Item {n}" for n in range(len(items))], "image": urls}).to_csv(
        root / "items.csv", index=False)


def test_cli_fetches_and_loader_finds_images(tmp_path: Path, server: ImageServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    urls = [f"{server.base}/ok/{n}.jpg" for n in range(5)] + [f"{server.base}/notfound"]
    write_url_shop(tmp_path / "data" / "shop", urls)
    before = GenericDataset().load(tmp_path / "data" / "shop")
    assert before.items["image_path"].isna().all()
    result = CliRunner().invoke(app, ["data", "fetch-images", "generic", "--data-dir", str(tmp_path / "data"),
                                      "--folder", "shop", "--timeout", "5", "--retries", "0"])
    assert result.exit_code == 0, result.output
    assert "fetched 5, already cached 0, failed 1" in result.output
    assert "1 x HTTP 404" in result.output
    assert (tmp_path / "home" / "reports" / "fetch-images-generic.json").is_file()
    after = GenericDataset(GenericOptions()).load(tmp_path / "data" / "shop")
    paths = list(after.items["image_path"])
    assert all(isinstance(p, Path) and p.is_file() for p in paths[:5]) and paths[5] is None
    with Image.open(paths[0]) as image:
        assert image.size == (16, 16)


def test_killed_run_resumes_without_refetching(tmp_path: Path, server: ImageServer) -> None:
    fast = [f"{server.base}/ok/{n}.jpg" for n in range(6)]
    hanging = [f"{server.base}/hang/{n}.jpg" for n in range(3)]
    write_url_shop(tmp_path / "data" / "shop", fast + hanging)
    env = {**os.environ, "PRISMREC_HOME": str(tmp_path / "home"), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "prismrec", "data", "fetch-images", "generic", "--data-dir",
           str(tmp_path / "data"), "--folder", "shop", "--timeout", "60", "--all-items"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_dir = tmp_path / "home" / "cache" / "images"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [p for p in cache_dir.rglob("*.jpg")] if cache_dir.exists() else []
            if len(done) == len(fast) and sum(server.hits[f"/hang/{n}.jpg"] for n in range(3)) == 3:
                break
            assert proc.poll() is None, "the fetch run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the first run did not fetch the fast images in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert server.hits["/hang/0.jpg"] == 1
    server.hang_is_fast = True
    server.release_hang.set()
    report = fetch_images(fast + hanging, ImageCache(cache_dir), FAST, progress=False)
    statuses = {o.url: o.status for o in report.outcomes}
    assert all(statuses[u] == "cached" for u in fast)
    assert all(statuses[u] == "fetched" for u in hanging)
    assert all(server.hits[f"/ok/{n}.jpg"] == 1 for n in range(6))  # never asked for twice


def test_amazon_games_fetch_only_items_left_after_the_paper_filter(tmp_path: Path, server: ImageServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from prismrec.data.amazon import AmazonGames
    from test_data_amazon import expected, meta_line, write_fixture, write_lines

    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    root = tmp_path / "data" / "amazon-games"
    reviews, described = write_fixture(root, "2023", gz=True)
    meta = []
    for n, item in enumerate(sorted(described)):
        record = meta_line("2023", item, n)
        record["images"] = [{"thumb": None, "large": f"{server.base}/ok/{item}.jpg", "variant": "MAIN",
                             "hi_res": None}]
        meta.append(json.dumps(record))
    write_lines(root / "meta_Video_Games.jsonl.gz", meta, gz=True)
    (_, n_items, _), _ = expected(reviews, described, 5, 3)
    result = CliRunner().invoke(app, ["data", "fetch-images", "amazon-games", "--data-dir", str(tmp_path / "data"),
                                      "-o", "release=2023"])
    assert result.exit_code == 0, result.output
    assert f"fetched {n_items}, already cached 0, failed 0" in result.output
    assert sum(1 for path in server.hits if path.startswith("/ok/")) == n_items < len(described)
    raw = AmazonGames(AmazonGames.Options(release="2023")).load(root)
    assert int(raw.items["image_path"].notna().sum()) == n_items
