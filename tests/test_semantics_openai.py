"""The ``openai`` backend and embedder against a real local OpenAI-compatible HTTP server with fault injection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from fake_openai_server import FakeOpenAIServer
from prismrec.semantics import HybridMode, SemanticCache, load_artefact
from prismrec.semantics.embedders.openai import EmbeddingFailed, OpenAIEmbedder, OpenAIEmbeddingOptions
from prismrec.semantics.openai_http import OpenAIClient, OpenAIConnectionOptions, RequestFailed
from semantics_helpers import FAST_RETRY, WITHOUT_POSTER, make_tiny_movielens, openai_deriver, run_deriver

N_ITEMS = 12
N_POSTERS = N_ITEMS - len(WITHOUT_POSTER)


@pytest.fixture()
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    make_tiny_movielens(tmp_path / "data")
    return tmp_path / "data"


def test_openai_derivation_attaches_images_and_reruns_without_calls(data_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(latency_s=0.05) as server, SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="fake")))
        assert report.written and not report.failures
        # textual: 12; visual and hybrid: 10 with posters each; the 2 poster-less items reuse the textual answer
        chat = server.counts["/v1/chat/completions"]
        assert chat == N_ITEMS + 2 * N_POSTERS
        assert server.images_seen == 2 * N_POSTERS
        assert server.max_in_flight > 1  # requests really overlapped
        artefact = load_artefact("fake")
        assert artefact.matrices["text"].shape == (N_ITEMS + 1, 16)
        table = artefact.descriptions()
        with_poster = table[~table["visual_status"].str.startswith("fallback")]
        assert with_poster["visual"].str.contains("Saw an image of").all()
        assert "local path the image attached" in with_poster["visual"].iloc[0]
        assert artefact.manifest["tokens"]["prompt"] > 0 and artefact.manifest["tokens"]["completion"] > 0
        assert artefact.manifest["backend"]["api_key_set"] is False

        server.reset_counts()
        again = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="fake")))
        assert again.written and again.model_calls == 0 and again.embed_calls == 0
        assert server.counts["requests"] == 0


def test_transient_faults_are_retried(server: FakeOpenAIServer, data_dir: Path, tmp_path: Path) -> None:
    # (a truncation is permanent at temperature 0: tests/test_semantics_server_errors.py)
    for kind in ("429", "500", "503", "malformed", "empty", "refuse", "reset"):
        server.add_fault(kind, times=1)
    server.add_fault("delay", seconds=1.0, times=1)  # longer than the 0.5 s timeout below
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        deriver = openai_deriver(cache, data_dir, [server.url], limit=4, max_retries=12, timeout_s=0.5)
        report = asyncio.run(run_deriver(deriver))
    assert report.written and not report.failures
    assert server.stats()["faults_pending"] == 0
    for kind in ("429", "500", "503", "malformed", "empty", "refuse", "reset", "delay"):
        assert server.counts[f"fault:{kind}"] == 1, kind
    assert deriver.backend.client.retries + deriver.embedder.client.retries >= 8


def test_persistent_failure_is_recorded_never_embedded_and_fails_the_run(server: FakeOpenAIServer, data_dir: Path,
                                                                         tmp_path: Path) -> None:
    # every textual and hybrid request about "Heat" fails (its visual prompt does not name the movie)
    server.add_fault("500", match="attributes: title: Heat", times=-1)
    server.add_fault("500", match="info is: title: Heat", times=-1)
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="broken", max_retries=2)))
        assert not report.written
        assert not (tmp_path / "home" / "semantics" / "broken" / "embeddings.safetensors").exists()
        assert {(f.route, f.external_id) for f in report.failures} == {("textual", "6"), ("hybrid", "6")}
        textual_failure = next(f for f in report.failures if f.route == "textual")
        assert "HTTP 500" in (textual_failure.error or "") and "3 attempt" in (textual_failure.error or "")
        statuses = {r.route: r.status for r in cache.item_results("broken") if r.external_id == "6"}
        assert statuses == {"textual": "failed", "visual": "ok", "hybrid": "failed"}

        # with --allow-fallback original the artefact is written and the failed rows hold the original text
        fallback = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="broken", max_retries=0,
                                             allow_fallback="original")))
        assert fallback.written
        artefact = load_artefact("broken")
        row = artefact.item_ids.index("6")
        np.testing.assert_array_equal(artefact.matrices["text"][row], artefact.matrices["original"][row])
        assert artefact.manifest["counts"]["textual"]["fallback_original"] == 1
        table = artefact.descriptions()
        assert table.loc[table["external_id"] == "6", "textual_status"].item() == "failed:fallback_original"
        assert table.loc[table["external_id"] == "6", "textual"].isna().item()


def test_visual_prompt_failure_only_hits_items_it_matches(server: FakeOpenAIServer, data_dir: Path,
                                                          tmp_path: Path) -> None:
    server.add_fault("refuse", match="Analyze the provided image", times=-1)
    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="refused", max_retries=1)))
    assert not report.written
    assert {f.route for f in report.failures} == {"visual"}
    assert len(report.failures) == N_POSTERS  # poster-less items used the textual prompt and succeeded
    assert all("refused answer" in (f.error or "") for f in report.failures)


def test_multi_turn_refinement_stops_when_text_settles(data_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(refine_changes=1) as server, SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="mt", limit=3,
                                           hybrid_mode=HybridMode.MULTI_TURN, max_rounds=3)))
        results = {r.item_id: r for r in cache.item_results("mt", "hybrid")}
    assert report.written
    for result in results.values():
        # turn 1 adds a sentence, turn 2 repeats it (settled): 2 rounds, not max_rounds
        assert result.rounds == 2
        assert result.text is not None and result.text.endswith("Refinement 1 adds a detail.")
        assert result.template == "prismrec-hybrid-initial@v1+prismrec-hybrid-refine@v1"
    with FakeOpenAIServer(refine_changes=10) as server, SemanticCache(tmp_path / "cache2.sqlite") as cache:
        asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="mt2", limit=2,
                                  hybrid_mode=HybridMode.MULTI_TURN, max_rounds=2)))
        assert {r.rounds for r in cache.item_results("mt2", "hybrid")} == {2}  # capped by max_rounds


def test_fan_out_across_servers_and_api_key_is_sent_but_never_stored(data_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeOpenAIServer() as one, FakeOpenAIServer() as two, SemanticCache(tmp_path / "cache.sqlite") as cache:
        one.add_fault("500", times=-1, match="Jumanji")  # only server one fails for this item: fan-out retries on two
        deriver = openai_deriver(cache, data_dir, [one.url, two.url], name="fan", max_retries=6)
        report = asyncio.run(run_deriver(deriver))
        assert report.written and not report.failures
        assert one.counts["requests"] > 3 and two.counts["requests"] > 3
        assert set(one.authorization_headers + two.authorization_headers) == {f"Bearer {secret}"}
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    for path in [tmp_path / "cache.sqlite", *(tmp_path / "home").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    manifest = json.loads((tmp_path / "home" / "semantics" / "fan" / "items.json").read_text())
    assert manifest["backend"]["api_key_set"] is True and manifest["backend"]["api_key_env"] == "OPENAI_API_KEY"


def test_client_does_not_retry_client_errors_and_reports_connection_failures(server: FakeOpenAIServer) -> None:
    async def scenario() -> None:
        client = OpenAIClient(OpenAIConnectionOptions(base_urls=[server.url], max_retries=3, **FAST_RETRY))
        server.add_fault("400", times=1)
        with pytest.raises(RequestFailed, match="HTTP 400") as failure:
            await client.post("/chat/completions", {"model": "m", "messages": []})
        assert failure.value.attempts == 1
        await client.aclose()
        closed = OpenAIClient(OpenAIConnectionOptions(base_urls=["http://127.0.0.1:9/v1"], max_retries=1,
                                                      **FAST_RETRY))
        with pytest.raises(RequestFailed, match="ConnectError") as failure:
            await closed.post("/chat/completions", {})
        assert failure.value.attempts == 2
        await closed.aclose()

    asyncio.run(scenario())


def test_openai_embedder_batches_and_fails_loudly(server: FakeOpenAIServer) -> None:
    async def scenario() -> None:
        embedder = OpenAIEmbedder(OpenAIEmbeddingOptions(base_urls=[server.url], batch_size=4, max_retries=0,
                                                         **FAST_RETRY))
        vectors = await embedder.embed([f"text {i}" for i in range(10)])
        assert vectors.shape == (10, 16) and vectors.dtype == np.float32
        assert server.counts["/v1/embeddings"] == 3
        again = await embedder.embed(["text 3"])
        np.testing.assert_allclose(again[0], vectors[3], rtol=1e-6)
        server.add_fault("malformed", times=1)
        with pytest.raises(EmbeddingFailed, match="malformed JSON"):
            await embedder.embed(["x"])
        await embedder.aclose()

    asyncio.run(scenario())


def test_xreflect_route_is_opt_in_cached_and_feeds_the_xreflect_baseline(server: FakeOpenAIServer, data_dir: Path,
                                                                          tmp_path: Path) -> None:
    from prismrec.data import load_sequences
    from prismrec.models.enhancers.adapters import load_semantic_matrices
    from prismrec.models.enhancers.xreflect import XREFLECT, XREFLECTConfig

    with SemanticCache(tmp_path / "cache.sqlite") as cache:
        plain = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="xr")))
        assert plain.written and "xreflect" not in load_artefact("xr").matrices
        server.reset_counts()
        report = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="xr", xreflect=True)))
        assert report.written and not report.failures
        # the three DMESR routes come from the cache; only the cross-reflection prompts reach the server
        assert server.counts["/v1/chat/completions"] == N_POSTERS
        assert server.images_seen == N_POSTERS
        assert report.counts["xreflect"]["ok"] == N_ITEMS
        assert report.counts["xreflect"]["fallback_no_image"] == len(WITHOUT_POSTER)

        artefact = load_artefact("xr")
        assert artefact.matrices["xreflect"].shape == (N_ITEMS + 1, 16)
        assert not artefact.matrices["xreflect"][0].any()
        assert artefact.manifest["templates"]["xreflect"] == ["dmesr-textual@v1", "xreflect@v1"]
        assert artefact.manifest["xreflect"] is True
        table = artefact.descriptions()
        with_poster = table[table["xreflect_status"] == "ok"]
        assert len(with_poster) == N_POSTERS and with_poster["xreflect"].str.contains("Saw an image of").all()
        rows = with_poster["item_id"].to_numpy()
        # a different prompt than hybrid's, so a different answer and embedding for every item with a poster
        assert (with_poster["xreflect"] != with_poster["hybrid"]).all()
        assert not np.allclose(artefact.matrices["xreflect"][rows], artefact.matrices["hybrid"][rows])
        # poster-less items fall back to the textual prompt, whose answer is shared with the textual route
        fallback = table[table["xreflect_status"] == "fallback:no_image"]
        assert (fallback["xreflect"] == fallback["textual"]).all()
        records = {r.item_id: r for r in cache.item_results("xr", "xreflect")}
        assert {records[int(i)].template for i in rows} == {"xreflect@v1"}

        server.reset_counts()
        again = asyncio.run(run_deriver(openai_deriver(cache, data_dir, [server.url], name="xr", xreflect=True)))
        assert again.written and again.model_calls == 0 and server.counts["requests"] == 0

    seqs = load_sequences("movielens-small", data_dir)
    matrices = load_semantic_matrices("xr", seqs, ["text", "visual", "hybrid"], optional_routes=["xreflect"])
    assert np.array_equal(matrices["xreflect"], artefact.matrices["xreflect"])
    model = XREFLECT(XREFLECTConfig(semantics="xr"), matrices)
    assert model.encoder.routes == ["text", "visual", "hybrid", "xreflect"]
