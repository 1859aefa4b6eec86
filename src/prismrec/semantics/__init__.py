"""Item-semantic derivation (DMESR stage one): three-way prompting, backends, embedders, cache, artefact.

Importing this package registers the built-in backends (``describe``, ``openai``, ``transformers``,
``local-llm``) and embedders (``sentence-transformers``, ``openai``). Heavy libraries load lazily.

The default backend, ``describe``, uses NO multimodal LLM: its "descriptions" are the item's attributes
and an EfficientNet-Lite0 + colour analysis of the poster, so that everything runs offline on a laptop.
The paper's setup (Qwen2.5-VL-3B-Instruct, text-embedding-ada-002 aside) is one command against a vLLM
server::

    vllm serve Qwen/Qwen2.5-VL-3B-Instruct --port 8000
    prismrec derive movielens-small --backend openai --base-url http://127.0.0.1:8000/v1 \
        --model Qwen/Qwen2.5-VL-3B-Instruct --concurrency 16
"""

from prismrec.semantics.artefact import SemanticArtefact, load_artefact
from prismrec.semantics.backends import BACKENDS, Backend
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.derive import DeriveOptions, Deriver, DeriveReport, HybridMode
from prismrec.semantics.embedders import EMBEDDERS, Embedder
from prismrec.semantics.prompts import PROMPTS, ROUTES, PromptTemplate, Route

__all__ = [
    "BACKENDS",
    "EMBEDDERS",
    "PROMPTS",
    "ROUTES",
    "Backend",
    "DeriveOptions",
    "DeriveReport",
    "Deriver",
    "Embedder",
    "HybridMode",
    "PromptTemplate",
    "Route",
    "SemanticArtefact",
    "SemanticCache",
    "load_artefact",
]
