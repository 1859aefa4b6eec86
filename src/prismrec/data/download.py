"""Download public dataset releases into a data directory (only where a public source exists)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from prismrec.data.errors import DataError

GROUPLENS_ML_LATEST_SMALL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
MOVIELENS_FILES = ("ratings.csv", "movies.csv", "links.csv", "tags.csv", "README.txt")
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024


def _fetch(url: str, timeout: float) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise DataError(f"refusing to download {url!r}: only http and https URLs are allowed")
    buffer = io.BytesIO()
    with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
        if response.status_code != 200:
            raise DataError(f"download of {url} failed: HTTP {response.status_code}")
        total = int(response.headers.get("content-length") or 0) or None
        with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True) as progress:
            task = progress.add_task("download", total=total)
            for chunk in response.iter_bytes():
                buffer.write(chunk)
                if buffer.tell() > MAX_DOWNLOAD_BYTES:
                    raise DataError(f"download of {url} exceeds {MAX_DOWNLOAD_BYTES} bytes; stopped")
                progress.update(task, advance=len(chunk))
    return buffer.getvalue()


def download_movielens_small(data_dir: Path, url: str = GROUPLENS_ML_LATEST_SMALL, timeout: float = 60.0) -> Path:
    """Fetch GroupLens' ml-latest-small zip and unpack its CSVs into ``data_dir/movielens-small``.

    The public zip has no posters or plot overviews; the loader works without them (the visual route of
    semantic derivation then falls back to text for every item).
    """
    payload = _fetch(url, timeout)
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except zipfile.BadZipFile as exc:
        raise DataError(f"{url} did not return a valid zip archive") from exc
    target = Path(data_dir) / "movielens-small"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for member in archive.namelist():
        name = PurePosixPath(member).name
        # Only the known files, by base name: a crafted archive cannot write outside ``target``.
        if name not in MOVIELENS_FILES:
            continue
        out = target / ("README.grouplens.txt" if name == "README.txt" else name)
        tmp = out.with_suffix(out.suffix + ".part")
        tmp.write_bytes(archive.read(member))
        tmp.replace(out)
        written.append(out.name)
    missing = {"ratings.csv", "movies.csv"} - set(written)
    if missing:
        raise DataError(f"the archive from {url} lacks {', '.join(sorted(missing))}")
    return target
