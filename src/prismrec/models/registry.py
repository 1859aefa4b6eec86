"""The model registry (one registry per kind of component)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prismrec.registry import Registry

if TYPE_CHECKING:
    from prismrec.models.base import Recommender

MODELS: Registry[type[Recommender]] = Registry("model")
