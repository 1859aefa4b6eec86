"""`prismrec data download` against a real HTTP server on 127.0.0.1 serving a small GroupLens-style zip."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prismrec.data import DataError, load_sequences
from prismrec.data.download import download_movielens_small


def _zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture()
def http_dir(tmp_path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


RATINGS = "userId,movieId,rating,timestamp\n" + "".join(
    f"{u},{m},4.0,{100 + m}\n" for u in (1, 2) for m in (1, 2, 3, 4))
MOVIES = "movieId,title,genres\n" + "".join(f"{m},Film {m} (1999),Comedy\n" for m in (1, 2, 3, 4))


def test_download_unpacks_and_loads(http_dir, tmp_path):
    base, served = http_dir
    (served / "ml.zip").write_bytes(_zip_bytes({
        "ml-latest-small/ratings.csv": RATINGS,
        "ml-latest-small/movies.csv": MOVIES,
        "ml-latest-small/README.txt": "GroupLens",
        "ml-latest-small/../../evil.csv": "should never be written",
    }))
    data_dir = tmp_path / "data"
    target = download_movielens_small(data_dir, f"{base}/ml.zip")
    assert sorted(p.name for p in target.iterdir()) == ["README.grouplens.txt", "movies.csv", "ratings.csv"]
    assert not (tmp_path / "evil.csv").exists()
    ds = load_sequences("movielens-small", data_dir)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 4, 8)
    assert all(ds.image_path(i) is None for i in range(1, 5))  # the public zip has no posters


def test_download_errors(http_dir, tmp_path):
    base, served = http_dir
    (served / "notzip.zip").write_text("hello")
    with pytest.raises(DataError, match="HTTP 404"):
        download_movielens_small(tmp_path, f"{base}/missing.zip")
    with pytest.raises(DataError, match="not return a valid zip"):
        download_movielens_small(tmp_path, f"{base}/notzip.zip")
    with pytest.raises(DataError, match="only http and https"):
        download_movielens_small(tmp_path, "file:///etc/passwd")


def test_cli_download_then_stats(http_dir, tmp_path):
    base, served = http_dir
    (served / "ml.zip").write_bytes(_zip_bytes({"x/ratings.csv": RATINGS, "x/movies.csv": MOVIES}))
    env = {**os.environ, "PRISMREC_HOME": str(tmp_path), "COLUMNS": "200"}
    data_dir = tmp_path / "d"
    done = subprocess.run([sys.executable, "-m", "prismrec", "data", "download", "movielens-small", "--data-dir",
                           str(data_dir), "--url", f"{base}/ml.zip"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "prismrec", "data", "stats", "movielens-small", "--data-dir",
                           str(data_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if "│" in line and "paper" not in line and "#" not in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[:3] == ["2", "4", "8"]
    missing = subprocess.run([sys.executable, "-m", "prismrec", "data", "stats", "movielens-small", "--data-dir",
                              str(tmp_path / "nowhere")], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not found" in missing.stdout
