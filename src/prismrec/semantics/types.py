"""Plain data passed between the derivation engine, the backends and the cache."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prismrec.semantics.prompts import Modality, Route, render_attributes


@dataclass(frozen=True)
class ItemRecord:
    """One catalogue item as the backends see it (``item_id`` is the internal id, 1..n)."""

    item_id: int
    external_id: str
    attributes: dict[str, str]
    image_path: Path | None
    image_sha: str | None  # sha256 of the image file's bytes; None without an image

    @property
    def original_text(self) -> str:
        """The raw attribute text: what the ``original`` matrix embeds and the prompts quote."""
        return render_attributes(self.attributes)

    @property
    def title(self) -> str:
        return next(iter(self.attributes.values()), "")


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; ``image`` is attached to the message by backends that take images."""

    role: Literal["system", "user", "assistant"]
    text: str
    image: Path | None = None
    image_sha: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One model call: a conversation for one item and route, built from a named template."""

    item: ItemRecord
    route: Route
    template_key: str  # "name@vN" of the template that produced the last user turn
    modality: Modality  # what the request asks about (text-only after a no-image fallback)
    messages: tuple[ChatMessage, ...]
    turn: int = 0  # 0 = initial generation, k = k-th refinement turn

    def cache_material(self) -> list[list[str | None]]:
        return [[m.role, m.text, m.image_sha] for m in self.messages]


@dataclass
class Generation:
    """A model's answer (successful, validated)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = "stop"
    cached: bool = False
    extras: dict[str, object] = field(default_factory=dict)


@dataclass
class GenerationFailure:
    """A request that could not be answered, and why: after all retries (``permanent=False``), or at once because
    the same request would fail the same way again (``permanent=True``; ``kind`` says what: image_unsupported,
    context_length, client_error, truncated, ...)."""

    reason: str
    attempts: int = 1
    permanent: bool = False
    kind: str = "transient"

    def describe(self) -> str:
        """The reason as it is recorded per item: permanent (not retried) or transient (retried);
        :func:`failure_kind` reads it back."""
        if self.permanent:
            return f"permanent ({self.kind}, not retried): {self.reason}"
        return f"transient, {self.attempts} attempt(s): {self.reason}"


_FAILURE_KIND = re.compile(r"permanent \(([^,]+), not retried\): |transient, (\d+) attempt\(s\): ")


def failure_kind(error: str | None) -> tuple[str, str]:
    """Split a recorded failure (:meth:`GenerationFailure.describe`) into its kind, ``permanent: <kind>`` or
    ``transient (N attempts)``, and the reason."""
    text = error or ""
    match = _FAILURE_KIND.search(text)
    if match is None:
        return "failed", text
    kind = f"permanent: {match[1]}" if match[1] else f"transient ({match[2]} attempts)"
    return kind, text[:match.start()] + text[match.end():]


GenerationResult = Generation | GenerationFailure


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_hash(payload: object) -> str:
    """A hash of JSON-able data that does not depend on dict order."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
