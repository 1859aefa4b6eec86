"""The ``transformers`` backend with a tiny randomly initialised Qwen2.5-VL built from a config (no download).

Exercises the real path end to end: local-folder loading, the PIL image processor, the chat template,
image-token expansion, batched left-padded ``generate`` and decoding, then the Deriver and the cache.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from prismrec.semantics import DeriveOptions, Deriver, SemanticCache, load_artefact
from prismrec.semantics.backends.transformers import TransformersBackend, TransformersOptions
from prismrec.semantics.derive import load_items
from prismrec.semantics.embedders.sentence_transformers import SentenceTransformerEmbedder, SentenceTransformerOptions
from prismrec.semantics.prompts import Route
from prismrec.semantics.types import Generation
from semantics_helpers import make_tiny_movielens, make_tiny_qwen2_5_vl

pytest.importorskip("transformers.models.qwen2_5_vl")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


def test_qwen2_5_vl_inputs_and_generation(tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    make_tiny_movielens(tmp_path / "data")
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        backend = TransformersBackend(TransformersOptions(model=str(tiny_qwen), device="cpu", batch_size=4,
                                                          max_tokens=12, min_tokens=2), cache)
        embedder = SentenceTransformerEmbedder(SentenceTransformerOptions())
        deriver = Deriver(DeriveOptions(dataset="movielens-small", data_dir=tmp_path / "data", name="qwen", limit=3),
                          backend, embedder, cache)
        items = asyncio.run(deriver.run()).n_items
        assert items == 3

        # the image really went through the vision tower: one expanded placeholder run per image
        model, _, image_processor, _ = backend._load()
        catalogue, _ = load_items(deriver.options)
        request, _ = deriver.initial_request(catalogue[0], Route.VISUAL)
        inputs = backend.build_inputs([request, deriver.initial_request(catalogue[1], Route.TEXTUAL)[0]])
        grid = inputs["image_grid_thw"]
        assert grid.shape == (1, 3)
        image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert image_tokens == int(grid[0].prod()) // image_processor.merge_size ** 2
        assert inputs["pixel_values"].shape[0] == int(grid[0].prod())
        assert inputs["attention_mask"][1, 0] == 0  # the shorter text-only prompt is left-padded

        answers = asyncio.run(backend.generate_batch([request]))
        assert isinstance(answers[0], Generation) and answers[0].finish_reason == "stop"
        assert 2 <= answers[0].completion_tokens < 12 and answers[0].prompt_tokens > image_tokens

    artefact = load_artefact("qwen")
    assert artefact.matrices["visual"].shape == (4, 384)
    assert (np.abs(artefact.matrices["hybrid"][1:]).sum(1) > 0).all()
    assert artefact.manifest["backend"]["backend"] == "transformers"
    assert set(artefact.descriptions()["visual_status"]) == {"ok"}

    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        backend = TransformersBackend(TransformersOptions(model=str(tiny_qwen), device="cpu", batch_size=4,
                                                          max_tokens=12, min_tokens=2), cache)
        again = Deriver(DeriveOptions(dataset="movielens-small", data_dir=tmp_path / "data", name="qwen", limit=3),
                        backend, SentenceTransformerEmbedder(SentenceTransformerOptions()), cache)
        report = asyncio.run(again.run())
        assert report.written and report.model_calls == 0 and backend._loaded is None  # model never loaded


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with SemanticCache(tmp_path / "cache.sqlite") as cache, pytest.raises(FileNotFoundError, match=r"no config\.json"):
        TransformersBackend(TransformersOptions(model=str(tmp_path / "nowhere")), cache)
