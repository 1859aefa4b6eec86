"""The one interface every generation backend implements: requests for items -> texts, async and batched."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

from pydantic import BaseModel

from prismrec.registry import Registry
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.types import GenerationRequest, GenerationResult

ImageInput = Literal["attached", "analysis", "path", "none"]
"""How a backend receives an item's image: attached to the message, as a text analysis, as a local path, or not at
all (the visual and hybrid routes then use the textual prompt)."""

_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')t (help|assist|comply|provide|describe)|"
    r"i cannot (help|assist|comply|provide|describe)|as an ai\b)",
    re.IGNORECASE,
)


def answer_problem(text: str | None, finish_reason: str | None) -> str | None:
    """Why an answer is unusable (``None`` when it is fine): empty, truncated or refused."""
    if text is None or not text.strip():
        return "empty answer"
    if finish_reason == "length":
        return "truncated answer (finish_reason=length; raise --max-tokens)"
    if finish_reason == "content_filter":
        return "refused answer (finish_reason=content_filter)"
    if _REFUSAL.match(text):
        return f"refused answer ({text.strip()[:60]!r})"
    return None


class Backend(ABC):
    """A generation backend. Subclasses set ``Options`` (a pydantic model) and ``image_input``.

    ``batch_size`` requests are given to :meth:`generate_batch` at once (local models batch them);
    ``concurrency`` batches may be in flight at the same time (remote servers).
    """

    Options: ClassVar[type[BaseModel]]
    #: how images reach the model; a class default, which a backend may settle per instance (openai's auto)
    image_input: ImageInput = "attached"
    #: True while the deriver should first check that the server takes images (openai's ``image_input=auto``)
    probe_images: bool = False
    #: model calls made by this instance (cache hits are not calls); tests and benchmarks read it.
    calls: int

    def __init__(self, options: BaseModel, cache: SemanticCache) -> None:
        self.options = options
        self.cache = cache
        self.calls = 0

    @property
    @abstractmethod
    def backend_name(self) -> str: ...

    @property
    @abstractmethod
    def model(self) -> str: ...

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def concurrency(self) -> int:
        return 1

    @property
    def iterates_internally(self) -> bool:
        """False for backends with no generative model (``describe``): multi-turn refinement is skipped."""
        return True

    def use_image_input(self, mode: ImageInput) -> None:
        """Send images this way from now on (the deriver settles ``auto`` with it)."""
        self.image_input = mode
        self.probe_images = False

    def capability_key(self) -> str:
        """Names the model (and server) in the cache's capability notes."""
        return f"{self.backend_name}:{self.model}"

    def generation_params(self) -> dict:
        """Parameters that change answers; part of every cache key."""
        return {}

    def public_config(self) -> dict:
        """The backend's configuration for items.json and logs: never secrets."""
        return {"backend": self.backend_name, "model": self.model, **self.generation_params()}

    @abstractmethod
    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer each request (same order); failures are returned, not raised."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook)
        """Release connections and models."""


BACKENDS: Registry[type[Backend]] = Registry("semantic backend")
