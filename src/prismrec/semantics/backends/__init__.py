"""Generation backends; importing registers them in ``BACKENDS``."""

from prismrec.semantics.backends import describe as _describe  # noqa: F401
from prismrec.semantics.backends import local_llm as _local_llm  # noqa: F401
from prismrec.semantics.backends import openai as _openai  # noqa: F401
from prismrec.semantics.backends import transformers as _transformers  # noqa: F401
from prismrec.semantics.backends.base import BACKENDS, Backend

__all__ = ["BACKENDS", "Backend"]
