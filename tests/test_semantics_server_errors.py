"""Real servers' refusals, against the local fake speaking as llama-server, vLLM and Ollama do: text-only models
given images, prompts over the context, unknown models, truncation. Permanent failures are sent once and never
retried; ``image_input = auto`` stops sending images after the first refusal and uses the poster analysis."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fake_openai_server import FakeOpenAIServer, server_refusal
from prismrec.cli.app import app
from prismrec.semantics import Deriver, SemanticCache, load_artefact
from prismrec.semantics.backends.openai import OpenAIBackend, OpenAIChatOptions
from prismrec.semantics.openai_http import OpenAIClient, OpenAIConnectionOptions, RequestFailed, classify_error
from prismrec.semantics.types import ChatMessage, GenerationFailure, GenerationRequest, ItemRecord
from semantics_helpers import FAST_RETRY, WITHOUT_POSTER, make_tiny_movielens, openai_deriver, run_deriver

N_ITEMS = 12
N_POSTERS = N_ITEMS - len(WITHOUT_POSTER)
TEXT_ONLY = [("llama-server", None), ("vllm", {"fake-vl"}), ("ollama", {"fake-vl"})]


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    make_tiny_movielens(tmp_path / "data")
    return tmp_path / "data"


def _deriver(cache: SemanticCache, data_dir: Path, url: str, console: Console | None = None,
             **options: object) -> Deriver:
    return openai_deriver(cache, data_dir, [url], console=console, **options)  # type: ignore[arg-type]


def _quiet() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=400), buffer


@pytest.mark.parametrize(("flavour", "models"), TEXT_ONLY)
def test_auto_stops_sending_images_after_the_first_refusal(flavour: str, models: set[str] | None, data_dir: Path,
                                                           tmp_path: Path) -> None:
    console, said = _quiet()
    with FakeOpenAIServer(flavour=flavour, vision=False, models=models) as server, \
            SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, console, name="text-only")))
        assert report.written and not report.failures
        # one image request is refused, once (never retried); every other request is text: the textual route,
        # and the visual and hybrid routes with the poster analysis in place of each poster
        assert server.counts["refused:image"] == 1 and server.images_seen == 0
        assert server.counts["/v1/chat/completions"] == 1 + N_ITEMS + 2 * N_POSTERS
        assert report.images_analysed == N_POSTERS
        message = said.getvalue()
        assert message.count("does not take images") == 1 and "--image-input analysis" in message
        artefact = load_artefact("text-only")
        assert artefact.manifest["backend"]["image_input"] == "analysis"
        assert artefact.manifest["backend"]["image_input_option"] == "auto"
        visual = {r.external_id: r for r in cache.item_results("text-only", "visual")}
        assert all(r.fallback is None for k, r in visual.items() if int(k) not in WITHOUT_POSTER)

        # a rerun asks the server nothing: the refusal is remembered for this server and model, answers cached
        server.reset_counts()
        console, said = _quiet()
        again = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, console, name="text-only")))
        assert again.written and again.model_calls == 0 and server.counts["requests"] == 0
        assert "earlier run" in said.getvalue()


def test_auto_keeps_attaching_images_on_a_vision_server(data_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(flavour="vllm", vision=True) as server, SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, _quiet()[0], name="vision")))
        assert report.written and not report.failures
        # the probe is the first visual request: its answer is cached and used, nothing is asked twice
        assert server.counts["/v1/chat/completions"] == N_ITEMS + 2 * N_POSTERS
        assert server.images_seen == 2 * N_POSTERS and report.images_analysed == 0
        assert load_artefact("vision").manifest["backend"]["image_input"] == "attached"


@pytest.mark.parametrize(("flavour", "models"), TEXT_ONLY)
def test_attached_on_a_text_only_server_fails_each_image_item_once(flavour: str, models: set[str] | None,
                                                                   data_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(flavour=flavour, vision=False, models=models) as server, \
            SemanticCache(tmp_path / "cache.sqlite") as cache:
        deriver = _deriver(cache, data_dir, server.url, _quiet()[0], name="insist", max_retries=4,
                           chat={"image_input": "attached"})
        report = asyncio.run(run_deriver(deriver))
    assert not report.written
    assert len(report.failures) == 2 * N_POSTERS  # visual and hybrid of every item with a poster
    # each refused request was sent exactly once: no retry of a permanent refusal
    assert server.counts["refused:image"] == 2 * N_POSTERS
    assert server.counts["/v1/chat/completions"] == N_ITEMS + 2 * N_POSTERS
    assert all("permanent (image_unsupported, not retried)" in (f.error or "") for f in report.failures)


def test_image_input_none_sends_the_textual_prompt(data_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(flavour="llama-server", vision=False) as server, \
            SemanticCache(tmp_path / "cache.sqlite") as cache:
        report = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, _quiet()[0], name="none",
                                           chat={"image_input": "none"})))
        assert report.written and not report.failures
        assert server.counts["/v1/chat/completions"] == N_ITEMS and server.counts["refused:image"] == 0
        assert report.counts["visual"]["fallback_image_input_none"] == N_POSTERS
        visual = {r.external_id: r.fallback for r in cache.item_results("none", "visual")}
        with_poster = set(visual) - {str(movie) for movie in WITHOUT_POSTER}
        assert {k for k, v in visual.items() if v == "image_input_none"} == with_poster


def _client(url: str, max_retries: int = 3) -> OpenAIClient:
    return OpenAIClient(OpenAIConnectionOptions(base_urls=[url], max_retries=max_retries, concurrency=1,
                                                **FAST_RETRY))


async def _post(client: OpenAIClient, words: int = 4, model: str = "fake-vl") -> None:
    try:
        await client.post("/chat/completions", {"model": model, "max_tokens": 16, "messages": [
            {"role": "user", "content": " ".join(["word"] * words)}]})
    finally:
        await client.aclose()


@pytest.mark.parametrize(("flavour", "problem", "kind"), [
    ("llama-server", "context", "context_length"),
    ("vllm", "context", "context_length"),
    ("vllm", "model", "client_error"),
    ("ollama", "model", "client_error"),
])
def test_what_cannot_change_is_sent_once(flavour: str, problem: str, kind: str) -> None:
    models = {"fake-vl"} if problem == "model" else None
    with FakeOpenAIServer(flavour=flavour, n_ctx=8 if problem == "context" else None, models=models) as server:
        with pytest.raises(RequestFailed) as failure:
            asyncio.run(_post(_client(server.url), words=20, model="other-model" if problem == "model" else "fake-vl"))
        assert failure.value.permanent and failure.value.kind == kind and failure.value.attempts == 1
        assert server.counts["requests"] == 1 and server.counts[f"refused:{problem}"] == 1


@pytest.mark.parametrize(("fault", "permanent"), [("400", True), ("404", True), ("422", True),
                                                  ("500", False), ("503", False), ("429", False), ("reset", False)])
def test_status_codes_are_classified(fault: str, permanent: bool) -> None:
    with FakeOpenAIServer() as server:
        server.add_fault(fault, times=-1)
        with pytest.raises(RequestFailed) as failure:
            asyncio.run(_post(_client(server.url, max_retries=2)))
        assert failure.value.permanent is permanent
        assert server.counts["requests"] == (1 if permanent else 3) == failure.value.attempts


def test_ollama_cuts_a_long_prompt_instead_of_refusing_it() -> None:
    with FakeOpenAIServer(flavour="ollama", n_ctx=8) as server:
        asyncio.run(_post(_client(server.url), words=20))
        assert server.counts["requests"] == 1 and server.counts["refused:context"] == 0


def test_the_classifier_reads_each_servers_own_words() -> None:
    for flavour in ("llama-server", "vllm", "ollama"):
        status, body = server_refusal(flavour, "image", model="m")  # type: ignore[misc]
        assert classify_error(status, json.dumps(body)).kind == "image_unsupported", flavour
    status, body = server_refusal("llama-server", "context", model="m", prompt_tokens=9, n_ctx=8)  # type: ignore[misc]
    assert status == 400 and classify_error(status, json.dumps(body)).kind == "context_length"
    assert classify_error(500, '{"error": {"message": "slot busy"}}').permanent is False
    assert classify_error(502, "bad gateway").permanent is False
    assert classify_error(401, '{"error": "invalid api key"}').permanent is True


@pytest.mark.parametrize(("temperature", "requests"), [(0.0, 1), (0.7, 3)])
def test_truncation_is_permanent_only_when_sampling_is_deterministic(temperature: float, requests: int,
                                                                     tmp_path: Path) -> None:
    item = ItemRecord(item_id=1, external_id="1", attributes={"title": "Heat"}, image_path=None, image_sha=None)
    request = GenerationRequest(item=item, route="textual", template_key="t", modality="text",  # type: ignore[arg-type]
                                messages=(ChatMessage("user", "describe Heat"),))
    with FakeOpenAIServer() as server, SemanticCache(tmp_path / "cache.sqlite") as cache:
        server.add_fault("length", times=-1)
        backend = OpenAIBackend(OpenAIChatOptions(base_urls=[server.url], model="fake-vl", max_retries=2,
                                                  temperature=temperature, **FAST_RETRY), cache)

        async def ask() -> list:
            try:
                return await backend.generate_batch([request])
            finally:
                await backend.aclose()

        [answer] = asyncio.run(ask())
    assert isinstance(answer, GenerationFailure) and "truncated" in answer.reason
    assert answer.permanent is (temperature == 0.0) and server.counts["requests"] == requests == answer.attempts


def test_cli_failure_table_and_status_show_kinds_tokens_and_wall_time(data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cache = str(tmp_path / "cli.sqlite")
    with FakeOpenAIServer(flavour="llama-server", vision=False) as server:
        common = ["derive", "movielens-small", "--data-dir", str(data_dir), "--backend", "openai", "--base-url",
                  server.url, "--model", "fake-vl", "--embedder", "openai", "--embedder-base-url", server.url,
                  "--cache", cache, "--name", "cli", "--max-retries", "1"]
        insisted = runner.invoke(app, [*common, "--image-input", "attached"])
        assert insisted.exit_code == 1, insisted.output
        said = " ".join(insisted.output.split())
        assert "permanent: image_unsupported" in said and "--image-input analysis" in said
        assert f"{2 * N_POSTERS} permanent: image_unsupported" in said
        finished = runner.invoke(app, [*common, "--image-input", "auto"])
        assert finished.exit_code == 0, finished.output
        bad = runner.invoke(app, [*common, "--image-input", "sometimes"])
        assert bad.exit_code == 2 and "image_input" in bad.output
    status = runner.invoke(app, ["semantics", "status", "cli", "--cache", cache])
    assert status.exit_code == 0, status.output
    said = " ".join(status.output.split())  # rich wraps long lines
    assert "2 run(s): wall time" in said and "completion tokens answered by the model" in said
    assert "prompt tokens" in said and "completion tokens/s" in said


def test_a_truncation_at_temperature_zero_is_not_asked_again_by_a_rerun(data_dir: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer() as server, SemanticCache(tmp_path / "cache.sqlite") as cache:
        server.add_fault("length", match="attributes: title: Heat", times=-1)  # Heat's textual prompt
        first = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, _quiet()[0], name="cut")))
        assert [(f.route, f.external_id) for f in first.failures] == [("textual", "6")]
        assert server.counts["fault:length"] == 1  # sent once, not retried
        server.reset_counts()
        again = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, _quiet()[0], name="cut")))
        assert [(f.route, f.external_id) for f in again.failures] == [("textual", "6")]
        assert server.counts["requests"] == 0 and again.model_calls == 0
        assert "earlier run" in (again.failures[0].error or "")
        # a larger max_tokens is another request: it is asked (and here truncated again by the fault)
        bigger = asyncio.run(run_deriver(_deriver(cache, data_dir, server.url, _quiet()[0], name="cut",
                                           chat={"max_tokens": 1024})))
        assert server.counts["fault:length"] == 1 and bigger.model_calls > 0
