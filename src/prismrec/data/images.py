"""Item images given as URLs: a resumable on-disk cache and a careful concurrent downloader.

Cache layout: ``$PRISMREC_HOME/cache/images/<k[:2]>/<k>.<ext>`` where ``k`` is the SHA-256 of the URL and
``ext`` the format Pillow detected (jpg, png, webp, gif). The file name is derived from the URL by us,
never taken from the data, so it cannot point anywhere else. A file only appears there after the whole
body arrived and decoded (written to a temporary name, then renamed), so a killed run leaves no half
image behind and the next run skips everything already cached. URLs that failed for a reason that will
not go away (HTTP 4xx, not an image, too large, undecodable, a scheme other than http/https) get a
``<k>.failed.json`` marker and are not asked for again unless ``retry_failed`` is set; timeouts,
connection errors, HTTP 429 and 5xx are retried with exponential backoff and simply retried on the next
run when they persist.

Loaders keep the URL in the ``image_url`` column of the item catalogue and point ``image_path`` at the
cached file when there is one (``prismrec data fetch-images DATASET`` fills the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from prismrec.data.paths import prismrec_home

ALLOWED_SCHEMES = frozenset({"http", "https"})
ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
_FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def url_scheme(value: str) -> str | None:
    """The URL scheme of ``value`` or ``None`` for a plain (relative) path; ``C:\\x`` counts as a path."""
    scheme = urlsplit(value).scheme
    if len(scheme) <= 1:
        return None
    return scheme.lower()


def default_image_cache_dir() -> Path:
    return prismrec_home() / "cache" / "images"


class ImageCache:
    """Content cache of fetched images keyed by the SHA-256 of their URL (see the module docstring)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_image_cache_dir()
        self._index: dict[str, Path] | None = None

    def _shard(self, key: str) -> Path:
        return self.directory / key[:2]

    def index(self) -> dict[str, Path]:
        """key -> cached file, built once by scanning the cache (one directory listing per shard)."""
        if self._index is None:
            found: dict[str, Path] = {}
            if self.directory.is_dir():
                for shard in os.scandir(self.directory):
                    if not shard.is_dir() or len(shard.name) != 2:
                        continue
                    for entry in os.scandir(shard.path):
                        stem, _, ext = entry.name.partition(".")
                        if len(stem) == 64 and ext and ext != "failed.json" and not ext.endswith("part"):
                            found[stem] = Path(entry.path)
            self._index = found
        return self._index

    def lookup(self, url: str) -> Path | None:
        return self.index().get(url_key(url))

    def store(self, url: str, data: bytes, ext: str) -> Path:
        key = url_key(url)
        shard = self._shard(key)
        shard.mkdir(parents=True, exist_ok=True)
        final = shard / f"{key}.{ext}"
        fd, tmp = tempfile.mkstemp(dir=shard, prefix=f"{key}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, final)  # atomic: a reader sees no file or the whole file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        (shard / f"{key}.failed.json").unlink(missing_ok=True)
        self.index()[key] = final
        return final

    def failure(self, url: str) -> str | None:
        marker = self._shard(url_key(url)) / f"{url_key(url)}.failed.json"
        if not marker.exists():
            return None
        try:
            return str(json.loads(marker.read_text("utf-8")).get("reason", "failed before"))
        except (OSError, ValueError):
            return "failed before"

    def mark_failed(self, url: str, reason: str) -> None:
        key = url_key(url)
        shard = self._shard(key)
        shard.mkdir(parents=True, exist_ok=True)
        (shard / f"{key}.failed.json").write_text(json.dumps({"url": url, "reason": reason}), "utf-8")


class FetchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(16, ge=1, description="requests in flight in total")
    per_host: int = Field(4, ge=1, description="requests in flight per host (be polite to image CDNs)")
    timeout_s: float = Field(20.0, gt=0, description="limit for one whole request, body included")
    retries: int = Field(3, ge=0, description="extra attempts after a timeout, connection error, 429 or 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt (with jitter)")
    max_bytes: int = Field(10_000_000, ge=1, description="larger images are refused")
    max_pixels: int = Field(40_000_000, ge=1, description="decoded size cap (decompression bombs)")
    max_redirects: int = Field(5, ge=0)
    retry_failed: bool = Field(False, description="ask again for URLs that failed permanently before")
    user_agent: str = "prismrec-image-fetcher/0.1"


FetchStatus = Literal["fetched", "cached", "failed", "skipped"]


@dataclass
class FetchOutcome:
    url: str
    status: FetchStatus
    reason: str = ""
    path: Path | None = None
    attempts: int = 0


@dataclass
class FetchReport:
    outcomes: list[FetchOutcome] = field(default_factory=list)

    def count(self, status: FetchStatus) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def failures(self) -> list[FetchOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "skipped")]

    def reasons(self) -> Counter[str]:
        return Counter(o.reason.split(":")[0] for o in self.failures())

    def to_json(self) -> dict[str, object]:
        return {
            "fetched": self.count("fetched"), "cached": self.count("cached"), "failed": self.count("failed"),
            "skipped_failed_before": self.count("skipped"),
            "failures": [{"url": o.url, "status": o.status, "reason": o.reason} for o in self.failures()],
        }


class _Permanent(Exception):
    """The URL will not work on a retry."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def decode_check(data: bytes, max_pixels: int) -> str:
    """Return the file extension for ``data`` if Pillow fully decodes it, else raise ``_Permanent``."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise _Permanent(f"too many pixels: {width}x{height} > {max_pixels}")
            fmt = probe.format or ""
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # verify() does not catch truncated pixel data; a full decode does
    except _Permanent:
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        raise _Permanent(f"not a decodable image: {type(exc).__name__}: {exc}") from None
    return _FORMAT_EXTENSIONS.get(fmt, fmt.lower() or "img")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return min(float(value), 30.0)
    except ValueError:
        return None


class ImageFetcher:
    def __init__(self, cache: ImageCache, options: FetchOptions) -> None:
        self.cache = cache
        self.options = options
        self._global = asyncio.Semaphore(options.concurrency)
        self._hosts: dict[str, asyncio.Semaphore] = {}

    def _host_limit(self, url: str) -> asyncio.Semaphore:
        host = urlsplit(url).netloc.lower()
        if host not in self._hosts:
            self._hosts[host] = asyncio.Semaphore(self.options.per_host)
        return self._hosts[host]

    async def _get(self, client: httpx.AsyncClient, url: str) -> bytes:
        opts = self.options
        current = url
        for _ in range(opts.max_redirects + 1):
            scheme = url_scheme(current)
            if scheme not in ALLOWED_SCHEMES:
                raise _Permanent(f"scheme not allowed: {scheme or 'none'!r} in {current!r} (only http/https)")
            try:
                async with client.stream("GET", current) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    status = response.status_code
                    if status == 429 or status >= 500:
                        raise _Transient(f"HTTP {status}", _retry_after(response))
                    if status != 200:
                        raise _Permanent(f"HTTP {status}")
                    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if not content_type.startswith(ACCEPTED_CONTENT_TYPES):
                        raise _Permanent(f"content type: {content_type or '(none)'} is not an image")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > opts.max_bytes:
                        raise _Permanent(f"too large: {declared} bytes > {opts.max_bytes}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > opts.max_bytes:
                            raise _Permanent(f"too large: more than {opts.max_bytes} bytes")
                    return bytes(body)
            except httpx.TimeoutException as exc:
                raise _Transient(f"timeout: {type(exc).__name__}") from None
            except httpx.TransportError as exc:
                raise _Transient(f"connection: {type(exc).__name__}: {exc}") from None
        raise _Permanent(f"redirects: more than {opts.max_redirects}")

    async def fetch_one(self, client: httpx.AsyncClient, url: str) -> FetchOutcome:
        opts = self.options
        scheme = url_scheme(url)
        if scheme not in ALLOWED_SCHEMES:
            return FetchOutcome(url, "failed", f"scheme not allowed: {scheme or 'none'!r} (only http/https)")
        cached = self.cache.lookup(url)
        if cached is not None:
            return FetchOutcome(url, "cached", path=cached)
        if not opts.retry_failed:
            previous = self.cache.failure(url)
            if previous is not None:
                return FetchOutcome(url, "skipped", f"{previous} (failed before; use --retry-failed)")
        attempts = 0
        reason = ""
        while attempts <= opts.retries:
            attempts += 1
            wait: float | None = None
            # Host slot first, so requests queued behind a busy host do not hold global slots.
            async with self._host_limit(url), self._global:
                try:
                    async with asyncio.timeout(opts.timeout_s):
                        data = await self._get(client, url)
                    ext = await asyncio.to_thread(decode_check, data, opts.max_pixels)
                    path = await asyncio.to_thread(self.cache.store, url, data, ext)
                    return FetchOutcome(url, "fetched", path=path, attempts=attempts)
                except _Permanent as exc:
                    reason = str(exc)
                    self.cache.mark_failed(url, reason)
                    return FetchOutcome(url, "failed", reason, attempts=attempts)
                except TimeoutError:
                    reason = f"timeout: no complete answer within {opts.timeout_s:g}s"
                except _Transient as exc:
                    reason, wait = str(exc), exc.retry_after
            if attempts <= opts.retries:  # back off without holding a slot
                delay = wait if wait is not None else opts.backoff_s * 2 ** (attempts - 1)
                await asyncio.sleep(delay * (1 + 0.25 * random.random()))
        return FetchOutcome(url, "failed", f"{reason} (after {attempts} attempts)", attempts=attempts)

    async def run(self, urls: list[str], on_done: Callable[[FetchOutcome], None] | None = None) -> FetchReport:
        headers = {"user-agent": self.options.user_agent}
        limits = httpx.Limits(max_connections=self.options.concurrency)
        timeout = httpx.Timeout(self.options.timeout_s)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout, follow_redirects=False,
                                     trust_env=False) as client:

            async def one(url: str) -> FetchOutcome:
                outcome = await self.fetch_one(client, url)
                if on_done is not None:
                    on_done(outcome)
                return outcome

            outcomes = await asyncio.gather(*(one(u) for u in urls))
        return FetchReport(list(outcomes))


def fetch_images(urls: Iterable[str], cache: ImageCache | None = None, options: FetchOptions | None = None,
                 *, progress: bool | None = None) -> FetchReport:
    """Download every distinct URL into the cache; return what happened to each (never raises per URL)."""
    unique = list(dict.fromkeys(u for u in urls if u))
    fetcher = ImageFetcher(cache or ImageCache(), options or FetchOptions())
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return asyncio.run(fetcher.run(unique))
    with Progress(TextColumn("fetching images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("fetch", total=len(unique))
        return asyncio.run(fetcher.run(unique, lambda _: bar.advance(task)))
