"""Text embedders; importing registers them in ``EMBEDDERS``."""

from prismrec.semantics.embedders import openai as _openai  # noqa: F401
from prismrec.semantics.embedders import sentence_transformers as _sentence_transformers  # noqa: F401
from prismrec.semantics.embedders.base import EMBEDDERS, Embedder

__all__ = ["EMBEDDERS", "Embedder"]
