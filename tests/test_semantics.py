"""Prompts, cache and the offline ``describe`` backend end to end (real posters, real SQLite, real files)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from prismrec.registry import UnknownComponentError
from prismrec.semantics import PROMPTS, DeriveOptions, Deriver, Route, SemanticCache, load_artefact
from prismrec.semantics.backends.describe import DescribeBackend, DescribeOptions
from prismrec.semantics.derive import load_items
from prismrec.semantics.embedders.sentence_transformers import SentenceTransformerEmbedder, SentenceTransformerOptions
from prismrec.semantics.image_analysis import colour_statistics, imagenet_labels, render_analysis
from prismrec.semantics.prompts import render_attributes
from prismrec.semantics.types import Generation
from semantics_helpers import WITHOUT_POSTER, make_tiny_movielens

PAPER = Path(__file__).resolve().parents[2] / "shared" / "papers" / "002_ba3a20df7442af7f.txt"


def _normalise(text: str) -> str:
    return " ".join(text.replace("**", "").split())


def test_dmesr_templates_are_the_papers_text_verbatim() -> None:
    textual = PROMPTS.get("dmesr-textual")
    rendered = textual.render(attributes=render_attributes({"title": "Heat", "year": "1995"}))
    assert rendered.startswith("The item has the following attributes: title: Heat; year: 1995. Summarize the item")
    hybrid = PROMPTS.get("dmesr-hybrid").render(text_info="TEXT", image_path="IMG")
    assert "Step 3: Final Output. Repeat Step 2 until no new information added" in hybrid
    if not PAPER.exists():
        pytest.skip(f"{PAPER} not at hand")
    paper = _normalise(PAPER.read_text())
    for name in ("dmesr-textual", "dmesr-visual", "dmesr-hybrid"):
        segments = re.split(r"\{[a-z_]+\}", PROMPTS.get(name).text)
        assert len(segments) >= 2
        for segment in segments:
            assert _normalise(segment) in paper, (name, segment)


def test_template_registry_versions() -> None:
    for template in ("dmesr-textual", "dmesr-visual", "dmesr-hybrid", "prismrec-hybrid-initial",
                     "prismrec-hybrid-refine"):
        assert PROMPTS.get(template).version >= 1
        assert PROMPTS.get(template).key.endswith(f"@v{PROMPTS.get(template).version}")
    with pytest.raises(UnknownComponentError, match="known: dmesr-hybrid"):
        PROMPTS.get("x-reflect")


def test_cache_is_wal_and_keeps_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with SemanticCache(path) as cache:
        cache.put_generation("k1", backend="b", model="m", template="t@v1", route="textual", item="7", turn=0,
                             generation=Generation(text="hello", prompt_tokens=3, completion_tokens=1, latency_s=0.5))
        cache.put_embeddings("e", "m", {"sha": np.arange(4, dtype=np.float32)})
        cache.put_image_analyses("cnn", {"img": ({"labels": [["x", 0.5]]}, np.ones(3, dtype=np.float32))})
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    with SemanticCache(path) as cache:
        hit = cache.get_generation("k1")
        assert hit is not None and hit.text == "hello" and hit.cached and hit.prompt_tokens == 3
        assert cache.get_generation("k2") is None
        np.testing.assert_array_equal(cache.get_embeddings("e", "m", ["sha", "nope"])["sha"], np.arange(4))
        analysis, features = cache.get_image_analyses("cnn", ["img"])["img"]
        assert analysis["labels"][0][0] == "x" and features.tolist() == [1.0, 1.0, 1.0]


def test_colour_statistics_and_rendering() -> None:
    red = np.zeros((20, 10, 3), dtype=np.uint8)
    red[..., 0] = 200
    red[..., 1:] = 35
    stats = colour_statistics(red)
    assert stats["dominant_colours"][0] == ("red", 1.0)
    assert stats["contrast"] == 0.0
    sentence = render_analysis({"labels": [("comic book", 0.4), ("jersey", 0.1), ("bobsleigh", 0.004)], **stats})
    assert "comic book (40%) and jersey (10%);" in sentence and "red (100%)" in sentence
    assert len(imagenet_labels()) == 1000


def _describe_deriver(cache: SemanticCache, data_dir: Path, **options: object) -> Deriver:
    backend = DescribeBackend(DescribeOptions(), cache)
    embedder = SentenceTransformerEmbedder(SentenceTransformerOptions())
    return Deriver(DeriveOptions(dataset="movielens-small", data_dir=data_dir, **options), backend, embedder, cache)


def test_describe_derivation_writes_artefact_and_reruns_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    make_tiny_movielens(tmp_path / "data")
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        deriver = _describe_deriver(cache, tmp_path / "data", name="tiny")
        report = asyncio.run(deriver.run())
        assert report.written and not report.failures
        assert report.images_analysed == 10  # one CNN pass per poster, shared by visual and hybrid
        assert report.counts["visual"]["fallback_no_image"] == len(WITHOUT_POSTER)

        artefact = load_artefact("tiny")
        items, _ = load_items(DeriveOptions(dataset="movielens-small", data_dir=tmp_path / "data"))
        n = len(items)
        for key in ("text", "visual", "hybrid", "original"):
            matrix = artefact.matrices[key]
            assert matrix.shape == (n + 1, 384) and matrix.dtype == np.float32
            assert not matrix[0].any() and (np.abs(matrix[1:]).sum(1) > 0).all()
        assert artefact.matrices["image"].shape == (n + 1, 1280)
        # describe's textual route restates the attributes: same text as "original", same vectors
        np.testing.assert_array_equal(artefact.matrices["text"], artefact.matrices["original"])
        no_poster = [item.item_id for item in items if item.image_path is None]
        with_poster = [item.item_id for item in items if item.image_path is not None]
        assert not artefact.matrices["image"][no_poster].any()
        assert (np.abs(artefact.matrices["image"][with_poster]).sum(1) > 0).all()
        # no-image fallback: visual == textual prompt == original text
        np.testing.assert_array_equal(artefact.matrices["visual"][no_poster], artefact.matrices["original"][no_poster])
        assert not np.allclose(artefact.matrices["visual"][with_poster], artefact.matrices["original"][with_poster])

        manifest = json.loads((tmp_path / "home" / "semantics" / "tiny" / "items.json").read_text())
        assert manifest["item_ids"][0] == "<pad>" and manifest["item_ids"][1:] == [i.external_id for i in items]
        assert manifest["templates"]["hybrid"] == ["dmesr-hybrid@v1", "dmesr-textual@v1"]
        assert manifest["counts"]["hybrid"]["fallback_no_image"] == len(WITHOUT_POSTER)
        artefact.check_matches(manifest["item_ids"])
        table = pd.read_parquet(tmp_path / "home" / "semantics" / "tiny" / "descriptions.parquet")
        assert table["visual_status"].tolist().count("fallback:no_image") == len(WITHOUT_POSTER)
        visual = table.loc[table["item_id"] == with_poster[0], "visual"].item()
        assert "ImageNet categories" in visual and "dominant colours" in visual

        # rerun: everything from the cache; no CNN pass, no generation, no embedding call
        again = _describe_deriver(cache, tmp_path / "data", name="tiny")
        report2 = asyncio.run(again.run())
        assert report2.written
        assert (report2.model_calls, report2.images_analysed, report2.embed_calls) == (0, 0, 0)
        assert again.embedder._model is None  # the sentence-transformer was not even loaded
        second = load_file(str(tmp_path / "home" / "semantics" / "tiny" / "embeddings.safetensors"))
        for key, matrix in artefact.matrices.items():
            np.testing.assert_array_equal(second[key], matrix)


def test_describe_limit_and_normalize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    make_tiny_movielens(tmp_path / "data")
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(_describe_deriver(cache, tmp_path / "data", limit=3, normalize=True).run())
    assert report.name == "movielens-small-describe-limit3"
    artefact = load_artefact(report.name)
    assert artefact.matrices["hybrid"].shape[0] == 4
    np.testing.assert_allclose(np.linalg.norm(artefact.matrices["hybrid"][1:], axis=1), 1.0, rtol=1e-5)
    assert artefact.manifest["normalize"] is True and artefact.manifest["limit"] == 3
    assert Route.HYBRID.value in artefact.manifest["counts"]


def test_unreadable_poster_falls_back_to_text_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    root = make_tiny_movielens(tmp_path / "data")
    (root / "posters" / "5.jpg").write_bytes(b"not a jpeg at all")
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(_describe_deriver(cache, tmp_path / "data", name="broken-poster", limit=5).run())
    assert report.written and not report.failures
    assert report.counts["visual"]["fallback_unreadable_image"] == 1
    table = load_artefact("broken-poster").descriptions()
    row = table[table["external_id"] == "5"]
    assert row["visual_status"].item() == "fallback:unreadable_image"
    assert row["visual"].item() == row["original"].item()
