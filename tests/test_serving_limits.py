"""`prismrec serve`'s limits, tried with raw sockets against a real server process.

Bodies under every framing (Content-Length, chunked, a Content-Length that lies), heads too big or with too
many lines, slow clients, the in-flight cap, /metrics, graceful SIGTERM and --workers. The server's memory
is read from /proc (psutil) before and after the floods: it must not grow with what the clients send.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from serving_fixtures import SHARED_DATA_PRESENT, ServeProcess, serving_runs

pytestmark = pytest.mark.skipif(not SHARED_DATA_PRESENT, reason="../shared/data/movielens-small is not present")

BODY_LIMIT = 64 * 1024
READ_TIMEOUT = 2.0
LIMIT_ARGS = ["--max-body-bytes", str(BODY_LIMIT), "--max-header-bytes", "4096", "--max-headers", "30",
              "--read-timeout", str(READ_TIMEOUT), "--max-in-flight", "2"]


@pytest.fixture(scope="module")
def runs():
    return serving_runs()


@pytest.fixture(scope="module")
def server(runs):
    with ServeProcess([runs.sasrec_export], *LIMIT_ARGS) as served:
        yield served


def connect(port: int, timeout: float = 15) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Everything until the server closes the connection (every refusal closes it) or a complete answer."""
    data = b""
    while True:
        try:
            block = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not block:
            break
        data += block
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
            if "content-length" in headers and len(body) >= int(headers["content-length"]):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"not an HTTP answer: {data[:200]!r}"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return True


def flood(port: int, head: bytes, chunk_source, megabytes: int) -> tuple[int, dict[str, str], bytes, int]:
    """Send ``head`` then up to ``megabytes`` MiB of body from ``chunk_source(block)`` while reading the answer
    on another thread; (status, headers, body, bytes the server let us send)."""
    sock = connect(port)
    sock.sendall(head)
    sent = 0
    answer: dict[str, object] = {}

    def reader() -> None:
        answer["response"] = read_response(sock)

    thread = threading.Thread(target=reader)
    thread.start()
    block = b"x" * 65536
    try:
        while sent < megabytes << 20 and thread.is_alive():
            sock.sendall(chunk_source(block))
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        pass
    thread.join(timeout=30)
    sock.close()
    status, headers, body = answer["response"]  # type: ignore[misc]
    return status, headers, body, sent


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


def recommend_body(runs) -> bytes:
    dataset = runs.dataset
    return json.dumps({"history": [str(dataset.item_ids[i]) for i in dataset.sequences[0][-10:]], "k": 3}).encode()


def test_body_limit_holds_under_every_framing_and_memory_stays_bounded(server, runs):
    port = server.port
    # a declared length over the limit: refused before a byte of the body is read
    sock = connect(port)
    sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 314572800\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status == 413 and headers["connection"] == "close"
    assert "314572800 bytes exceeds the limit of 65536" in json.loads(body)["detail"]

    def chunked(block: bytes) -> bytes:
        return b"%x\r\n" % len(block) + block + b"\r\n"

    before = rss_mb(server.pid)
    chunked_head = (b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    # a Content-Length that lies: small, next to chunked framing (which is what frames the body)
    lying_head = (b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n")
    results: list[tuple[int, dict[str, str], bytes, int]] = []
    for _ in range(2):  # two floods at a time (the in-flight cap of this server is 2), 100 MiB offered each
        threads = [threading.Thread(target=lambda h=h: results.append(flood(port, h, chunked, 100)))
                   for h in (chunked_head, lying_head)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert len(results) == 4
    for status, headers, body, sent in results:
        assert status == 413, body
        assert "exceeds the limit of 65536 bytes" in json.loads(body)["detail"]
        assert headers["connection"] == "close"
        assert sent < 40 << 20, f"the server kept reading: {sent} bytes accepted"
    # A Content-Length below the truth: the declared bytes are the body, the rest is not a request.
    status, headers, _, sent = flood(port, b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                                           b"\r\nContent-Length: 12\r\n\r\n", lambda b: b, 50)
    assert 400 <= status < 500
    after = rss_mb(server.pid)
    assert after - before < 40, f"server RSS grew from {before:.0f} to {after:.0f} MB during the floods"
    # still serving, and the refusals are counted
    ok = httpx.post(f"{server.url}/recommend", content=recommend_body(runs),
                    headers={"Content-Type": "application/json"}, timeout=30)
    assert ok.status_code == 200, ok.text
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert _sample(metrics, 'prismrec_rejected_requests_total{reason="body_too_large"}') >= 5


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics:\n{text[:3000]}")


def test_header_size_and_count_are_bounded(server):
    many = b"".join(b"X-Extra-%d: 1\r\n" % i for i in range(40))
    sock = connect(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
    status, headers, body = read_response(sock)
    assert status == 431 and "header lines; the limit is 30" in json.loads(body)["detail"]
    assert headers["connection"] == "close" and closed_by_server(sock)

    sock = connect(server.port)  # a complete head, too big
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n")
    status, _, body = read_response(sock)
    assert status == 431 and "4096 bytes" in json.loads(body)["detail"]

    before = rss_mb(server.pid)
    sock = connect(server.port)  # a head that never ends: cut once it passes the limit, not buffered on
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Endless: ")
    try:
        for _ in range(2000):
            sock.sendall(b"b" * 4096)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, _, body = read_response(sock)
    assert status == 431 and "exceed 4096 bytes" in json.loads(body)["detail"]
    assert rss_mb(server.pid) - before < 20


def test_slow_and_silent_clients_are_cut_after_the_read_timeout(server):
    sock = connect(server.port)
    start = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    try:
        for _ in range(40):  # one byte every 0.2 s: a slowloris head
            sock.sendall(b"X")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, _, body = read_response(sock)
    elapsed = time.monotonic() - start
    assert status == 408 and "within 2 s" in json.loads(body)["detail"]
    assert READ_TIMEOUT - 0.2 < elapsed < READ_TIMEOUT + 3

    silent = connect(server.port)
    start = time.monotonic()
    status, _, _ = read_response(silent)  # sends nothing at all
    assert status == 408 and time.monotonic() - start < READ_TIMEOUT + 3

    # a body that stops half-way is cut the same way
    body_sock = connect(server.port)
    body_sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"history\": [")
    status, _, _ = read_response(body_sock)
    assert status == 408


def test_requests_beyond_the_in_flight_cap_get_503_with_retry_after(server, runs):
    body = recommend_body(runs)
    head = (b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    held = []
    for _ in range(2):  # two requests in flight: head and part of the body sent, the rest withheld
        sock = connect(server.port)
        sock.sendall(head + body[:5])
        held.append(sock)
    time.sleep(0.3)
    extra = connect(server.port)
    extra.sendall(b"GET /items/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, answer = read_response(extra)
    assert status == 503 and headers["retry-after"] == "1"
    assert "2 requests in flight" in json.loads(answer)["detail"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # monitoring is exempt
    for sock in held:
        sock.sendall(body[5:])
        status, _, answer = read_response(sock)
        assert status == 200, answer
        assert len(json.loads(answer)["items"]) == 3
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert _sample(metrics, 'prismrec_rejected_requests_total{reason="saturated"}') >= 1
    assert _sample(metrics, 'prismrec_requests_total{endpoint="/recommend",model="export-sasrec",status="200"}') >= 2
    assert _sample(metrics, 'prismrec_request_duration_seconds_count{endpoint="/recommend",model="export-sasrec"}') >= 2
    assert "prismrec_requests_in_flight " in metrics
    assert 'prismrec_request_duration_seconds_bucket{endpoint="/recommend",le="0.1",model="export-sasrec"}' in metrics


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_cleanly(runs):
    body = recommend_body(runs)
    with ServeProcess([runs.sasrec_export], "--read-timeout", "30") as served:
        sock = connect(served.port)
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        served.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while True:  # the listening socket closes: new connections are refused
            try:
                socket.create_connection(("127.0.0.1", served.port), timeout=2).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.1)
        assert served.process.poll() is None  # type: ignore[union-attr]  # waiting for the request in flight
        sock.sendall(body[5:])
        status, _, answer = read_response(sock)
        assert status == 200 and len(json.loads(answer)["items"]) == 3
        assert closed_by_server(sock)  # no further request on this connection either
        assert served.process.wait(timeout=30) == 0  # type: ignore[union-attr]


def _mapped_files(pid: int) -> set[str]:
    return {m.path for m in psutil.Process(pid).memory_maps(grouped=True)}


def test_workers_share_the_memory_mapped_export_and_stop_on_sigterm(runs):
    export = Path(runs.dmesr_export)
    with ServeProcess([runs.sasrec_export, export], "--workers", "2") as served:
        parent = psutil.Process(served.pid)
        deadline = time.monotonic() + 120
        while True:  # both workers up (the first one answering /health does not mean the second is)
            mapped = []
            for child in parent.children(recursive=True):
                try:
                    if str(export / "model.safetensors") in _mapped_files(child.pid):
                        mapped.append(child)
                except psutil.Error:
                    pass
            if len(mapped) == 2:
                break
            assert time.monotonic() < deadline, f"workers did not map the export: {served.output()}"
            time.sleep(0.5)
        for worker in mapped:  # the mapped weights are file pages shared between the workers, not private copies
            maps = {m.path: m for m in worker.memory_maps(grouped=True)}
            entry = maps[str(export / "model.safetensors")]
            assert entry.rss > 0 and entry.private_dirty == 0
        with httpx.Client(base_url=served.url, timeout=30) as client:
            body = json.loads(recommend_body(runs))
            for _ in range(10):
                answer = client.post("/recommend", json={**body, "model": "export-dmesr"},
                                     headers={"Connection": "close"})
                assert answer.status_code == 200, answer.text
            metrics = client.get("/metrics").text
        # multiprocess mode: /metrics sums over the workers, whichever answered
        series = 'prismrec_requests_total{endpoint="/recommend",model="export-dmesr",status="200"}'
        assert _sample(metrics, series) == 10
        assert served.stop(timeout=60) == 0
        for worker in mapped:
            assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
