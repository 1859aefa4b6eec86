"""MLLM-MSR: recurrent user summaries (real OpenAI-protocol server on 127.0.0.1, real SQLite cache), LoRA
training and yes/no scoring on a tiny random Llama, the run directory and CLI. Tiny models only (< 60 s)."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fake_openai_server import FakeOpenAIServer
from llm_fixtures import save_tiny_causal_lm, tiny_causal_lm
from prismrec.data import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.llmrec.causal_lm import (
    CausalLMOptions,
    LoRAOptions,
    add_lora,
    load_causal_lm,
    load_image_processor,
    load_lora_adapter,
    save_lora_adapter,
)
from prismrec.llmrec.mllm_msr import (
    MLLMMSR,
    SUMMARY_PREFIX,
    USER_SUMMARY_FIRST,
    USER_SUMMARY_UPDATE,
    ItemTextOptions,
    ItemTexts,
    MLLMMSROptions,
    MLLMMSRTrainingOptions,
    PromptSample,
    RecommenderPrompt,
    SummaryOptions,
    UserSummariser,
    build_summariser,
    load_mllm_msr_config,
    train_and_score,
)
from prismrec.options import ConfigError
from prismrec.semantics.backends.local_llm import LocalLLMBackend, LocalLLMOptions
from prismrec.semantics.backends.openai import OpenAIBackend, OpenAIChatOptions
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.types import ChatMessage, Generation, GenerationRequest, ItemRecord

from conftest import write_movielens

N_USERS, PER_USER, N_MOVIES = 8, 9, 39


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """8 users x 9 movies, together all 39, so 30 never-seen items remain per user for sampled negatives."""
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, N_USERS + 1):
        for step in range(PER_USER):
            lines.append(f"{user},{(user * 5 + step * 7) % N_MOVIES + 1},4.0,{1000 * user + step}")
    write_movielens(tmp_path / "data", "\n".join(lines) + "\n")
    return tmp_path / "data"


@pytest.fixture
def split(data_dir: Path) -> LeaveOneOutSplit:
    return LeaveOneOutSplit(load_sequences("movielens-small", data_dir))


def _openai_options(server: FakeOpenAIServer) -> dict:
    return {"base_urls": [server.url], "max_retries": 0, "concurrency": 2}


def test_recursion_over_seven_items_makes_three_calls_and_passes_each_summary_on(split: LeaveOneOutSplit,
                                                                                  tmp_path: Path) -> None:
    items = ItemTexts(split.dataset, ItemTextOptions())
    window = tuple(int(i) for i in split.dataset.sequences[0][:7])
    options = SummaryOptions(block_size=3, backend="openai")
    with FakeOpenAIServer() as server, SemanticCache(tmp_path / "cache.sqlite") as cache:

        async def run(summariser: UserSummariser, windows: dict[str, tuple[int, ...]]) -> dict:
            try:
                return await summariser.summarise_async(windows)
            finally:
                await summariser.backend.aclose()

        backend = OpenAIBackend(OpenAIChatOptions(**_openai_options(server)), cache)
        steps = asyncio.run(run(UserSummariser(options, backend, cache, items), {"u1": window}))["u1"]
        assert backend.calls == 3 and server.stats()["counts"]["/v1/chat/completions"] == 3
        assert [s.block for s in steps] == [window[0:3], window[3:6], window[6:7]]
        # the first block has no previous summary; every next prompt carries the previous answer verbatim
        assert steps[0].prompt == USER_SUMMARY_FIRST.render(items=UserSummariser(
            options, backend, cache, items)._items_text(window[0:3]))
        for previous, step in itertools.pairwise(steps):
            assert step.prompt.startswith(USER_SUMMARY_UPDATE.text.split("{summary}")[0] + previous.summary)
        assert len({s.summary for s in steps}) == 3 and not any(s.cached for s in steps)
        assert all(items.title(i) in steps[k].prompt for k in range(3) for i in steps[k].block)
        assert SUMMARY_PREFIX in steps[0].prompt

        # a new summariser on the same SQLite cache: the 7-item window costs nothing, one more item one call
        backend = OpenAIBackend(OpenAIChatOptions(**_openai_options(server)), cache)
        longer = (*window, int(split.dataset.sequences[0][7]))
        again = asyncio.run(run(UserSummariser(options, backend, cache, items), {"same": window, "longer": longer}))
        assert backend.calls == 1
        assert [s.summary for s in again["same"]] == [s.summary for s in steps]
        assert [s.cached for s in again["longer"]] == [True, True, False]
        assert again["longer"][2].prompt.startswith(USER_SUMMARY_UPDATE.text.split("{summary}")[0]
                                                    + steps[1].summary)


def test_windows_are_anchored_at_the_training_sequence(split: LeaveOneOutSplit, tmp_path: Path) -> None:
    """Validation and test windows extend the training window (same start), so their blocks are reused."""
    with SemanticCache(tmp_path / "c.sqlite") as cache:
        items = ItemTexts(split.dataset, ItemTextOptions())
        with pytest.raises(ValueError, match="no generative model"):
            build_summariser(SummaryOptions(backend="describe"), cache, items)
        summariser = build_summariser(SummaryOptions(block_size=3, max_history=4, backend="openai"), cache, items)
        train = split.train_sequence(0)  # 7 items
        valid, _ = split.inputs_and_target(0, "valid")
        test, _ = split.inputs_and_target(0, "test")
        assert summariser.window(valid, len(train)) == tuple(train[-4:])
        assert summariser.window(test, len(train)) == (*train[-4:], int(test[-1]))
        assert summariser.blocks(summariser.window(test, len(train)))[0] == tuple(train[-4:-1])


def test_local_llm_backend_runs_through_shared_loader(tmp_path: Path) -> None:
    """The refactored local-llm backend loads a Hugging Face folder via llmrec.causal_lm and generates."""
    folder = save_tiny_causal_lm(tmp_path / "tiny")
    with SemanticCache(tmp_path / "c.sqlite") as cache:
        backend = LocalLLMBackend(LocalLLMOptions(model=str(folder), max_tokens=4, min_tokens=4), cache)
        record = ItemRecord(item_id=0, external_id="user:1", attributes={}, image_path=None, image_sha=None)
        request = GenerationRequest(item=record, route="textual", template_key="x@v1", modality="text",
                                    messages=(ChatMessage("user", "Summarise the user's preferences."),))
        answers = asyncio.run(backend.generate_batch([request, request]))
    assert backend.calls == 2 and backend.model == str(folder.resolve())
    assert all(isinstance(a, Generation) and a.completion_tokens == 4 for a in answers)
    assert answers[0].text == answers[1].text


def _recommender(split: LeaveOneOutSplit, seed: int = 0, lora: LoRAOptions | None = None) -> MLLMMSR:
    model, tokenizer = tiny_causal_lm(seed)
    options = MLLMMSROptions(recent_items=3)
    torch.manual_seed(seed)
    return MLLMMSR(options, add_lora(model, lora or options.lora), tokenizer, ItemTexts(split.dataset,
                                                                                        ItemTextOptions()))


def test_scores_are_probabilities_and_batching_does_not_change_them(split: LeaveOneOutSplit) -> None:
    recommender = _recommender(split)
    sequence = [int(i) for i in split.dataset.sequences[1]]
    # prompts of different lengths, so batches are left-padded
    prompts = [recommender.prompt("The user appears to have a preference for " + "drama " * (k % 4),
                                  sequence[:3 + k % 5], candidate) for k, candidate in enumerate(range(1, 21))]
    assert len({len(p.text) for p in prompts}) > 3 and not recommender.uses_images
    batched = recommender.score_prompts(prompts, batch_size=7)
    one_by_one = torch.cat([recommender.score_prompts([p], batch_size=1) for p in prompts])
    assert batched.shape == (20,) and torch.all((batched > 0) & (batched < 1))
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    assert batched.std() > 0  # the candidate changes the score


def test_lora_training_moves_yes_probability_of_training_positives_up(split: LeaveOneOutSplit,
                                                                      tmp_path: Path) -> None:
    recommender = _recommender(split, seed=0, lora=LoRAOptions(dropout=0.0))
    samples = []
    for user in range(N_USERS):
        sequence = [int(i) for i in split.train_sequence(user)]
        summary = f"{SUMMARY_PREFIX} movies like {recommender.items.title(sequence[0])}."
        unseen = sorted(set(range(1, split.dataset.n_items + 1)) - set(split.dataset.sequences[user]))
        samples.append(PromptSample(recommender.prompt(summary, sequence[:-1], sequence[-1]), True))
        samples.append(PromptSample(recommender.prompt(summary, sequence[:-1], unseen[user]), False))
    positives = [s.prompt for s in samples if s.label]
    negatives = [s.prompt for s in samples if not s.label]
    before = recommender.score_prompts(positives).mean()
    timings = recommender.fit(samples, MLLMMSRTrainingOptions(lr=5e-3, epochs=20, batch_size=4), seed=0)
    after = recommender.score_prompts(positives)
    # seeded: p(yes) of the positives goes from about 0.22 to about 0.69, and above the negatives' (about 0.30)
    assert after.mean() > before + 0.3, (float(before), float(after.mean()))
    assert after.mean() > recommender.score_prompts(negatives).mean() + 0.2
    assert timings["train_samples"] == 20 * len(samples) and timings["train_samples_per_s"] > 0

    # the adapter round-trips through safetensors: a fresh base model + the adapter scores the same
    recommender.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.json", "adapter.safetensors"]
    base, _ = tiny_causal_lm(seed=0)
    reloaded = MLLMMSR(recommender.options, load_lora_adapter(base, tmp_path / "adapter"), recommender.tokenizer,
                       recommender.items)
    torch.testing.assert_close(reloaded.score_prompts(positives), after, atol=1e-6, rtol=1e-5)


def test_causal_lm_loads_folders_and_refuses_bad_adapters(tmp_path: Path) -> None:
    folder = save_tiny_causal_lm(tmp_path / "tiny", seed=3)
    model, tokenizer = load_causal_lm(CausalLMOptions(model=str(folder)))
    assert tokenizer.padding_side == "left" and not model.training
    reference, _ = tiny_causal_lm(seed=3)
    ids = tokenizer(["yes no"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_causal_lm(CausalLMOptions(model=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_lora_adapter(model, tmp_path)
    other = add_lora(tiny_causal_lm(seed=3)[0], LoRAOptions(r=4))
    save_lora_adapter(other, tmp_path / "r4", LoRAOptions(r=4))
    assert json.loads((tmp_path / "r4" / "adapter.json").read_text())["lora"]["r"] == 4
    assert load_lora_adapter(tiny_causal_lm(seed=3)[0], tmp_path / "r4").peft_config["default"].r == 4


def test_train_and_score_and_the_cli_run_directory(split: LeaveOneOutSplit, data_dir: Path, tmp_path: Path) -> None:
    model_dir = save_tiny_causal_lm(tmp_path / "tiny")
    with FakeOpenAIServer() as server:
        summaries = {"block_size": 3, "max_history": 5, "backend": "openai", "backend_options": _openai_options(server),
                     "cache": str(tmp_path / "cache.sqlite")}
        options = MLLMMSROptions.model_validate({"llm": {"model": str(model_dir)}, "summaries": summaries})
        training = MLLMMSRTrainingOptions(lr=1e-3, epochs=1, batch_size=4, score_batch_size=8)
        users = split.eval_users[:3]
        unseen = [sorted(set(range(1, split.dataset.n_items + 1)) - set(split.dataset.sequences[u]))[:4] for u in users]
        candidates = np.stack([[split.inputs_and_target(int(u), "test")[1], *rest] for u, rest in zip(users, unseen,
                                                                                                      strict=True)])
        with SemanticCache(tmp_path / "cache.sqlite") as cache:
            _, result = train_and_score(split, split.eval_users, users, candidates, options, training, cache,
                                        quiet=True)
        assert result.scores.shape == (3, 5) and torch.all((result.scores > 0) & (result.scores < 1))
        assert result.timings["score_candidates"] == 15 and result.timings["train_samples"] == 2 * N_USERS
        assert result.timings["prompt_tokens_per_candidate"] > 20
        assert 0 <= result.metrics["hit@5"] <= 1

        config = tmp_path / "run.toml"
        config.write_text(
            'name = "tiny-mllm-msr"\n[data]\ndataset = "movielens-small"\n'
            f'[model.llm]\nmodel = "{model_dir}"\n'
            '[model.summaries]\nblock_size = 3\nmax_history = 5\nbackend = "openai"\n'
            f'cache = "{tmp_path / "cache.sqlite"}"\n'
            f'[model.summaries.backend_options]\nbase_urls = ["{server.url}"]\nmax_retries = 0\n'
            '[training]\nlr = 0.001\nepochs = 1\nbatch_size = 4\neval_users = 4\n'
            '[evaluation]\nnum_negatives = 20\nfull_ranking = false\n')
        from prismrec.cli.app import app

        runner = CliRunner()
        trained = runner.invoke(app, ["mllm-msr", "train", "--config", str(config), "--data-dir", str(data_dir),
                                      "--quiet"])
        assert trained.exit_code == 0, trained.output
        run_dir = Path(trained.output.split("saved:")[1].split()[0])
        final = json.loads((run_dir / "final.json").read_text())
        meta = json.loads((run_dir / "meta.json").read_text())
        assert set(final["metrics"]) == {"valid/sampled", "test/sampled"} and final["num_negatives"] == 20
        assert len(meta["eval_users"]) == 4 and "peft" in meta["packages"] and meta["data_fingerprint"]
        assert (run_dir / "adapter" / "adapter.safetensors").exists() and (run_dir / "config.toml").exists()
        calls = server.stats()["counts"]["/v1/chat/completions"]
        evaluated = runner.invoke(app, ["mllm-msr", "evaluate", str(run_dir), "--data-dir", str(data_dir), "--quiet"])
        assert evaluated.exit_code == 0, evaluated.output
        assert "largest difference from the recorded final.json: 0.00e+00" in evaluated.output
        assert server.stats()["counts"]["/v1/chat/completions"] == calls  # every summary came from the cache


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="full ranking"):
        load_mllm_msr_config(None, ["evaluation.full_ranking=true"])
    with pytest.raises(ConfigError, match=r"model\.lora\.rr: unknown option"):
        load_mllm_msr_config(None, ["model.lora.rr=3"])
    with pytest.raises(ConfigError, match="max_tokenz"):
        load_mllm_msr_config(None, ["model.summaries.backend_options.max_tokenz=3"])
    with pytest.raises(ConfigError, match="semantic backend"):
        load_mllm_msr_config(None, ["model.summaries.backend=nope"])
    config = load_mllm_msr_config(Path(__file__).parents[1] / "configs" / "movielens_mllm_msr.toml")
    assert config.model.summaries.block_size == 3 and config.model.lora.r == 16


def test_a_qwen2_5_vl_folder_is_a_recommender_llm(split: LeaveOneOutSplit, tmp_path: Path) -> None:
    """A local Qwen2.5-VL folder loads through the same code (here with text prompts only: candidate_image off);
    LoRA leaves its vision tower alone."""
    from semantics_helpers import make_tiny_qwen2_5_vl

    folder = tmp_path / "qwen"
    folder.mkdir()
    make_tiny_qwen2_5_vl(folder)
    model, tokenizer = load_causal_lm(CausalLMOptions(model=str(folder)))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with pytest.raises(ValueError, match="needs its image processor"):
        MLLMMSR(MLLMMSROptions(), model, tokenizer, ItemTexts(split.dataset, ItemTextOptions()))
    recommender = MLLMMSR(MLLMMSROptions(candidate_image=False), add_lora(model, LoRAOptions()), tokenizer,
                          ItemTexts(split.dataset, ItemTextOptions()))
    assert not [n for n, p in recommender.model.named_parameters() if p.requires_grad and "visual" in n]
    prompts = [recommender.prompt(f"{SUMMARY_PREFIX} comedies.", [1, 2, 3][:k], 4 + k) for k in range(3)]
    batched = recommender.score_prompts(prompts, batch_size=3)
    torch.testing.assert_close(batched, torch.cat([recommender.score_prompts([p]) for p in prompts]),
                               atol=1e-5, rtol=1e-4)
    assert torch.all((batched > 0) & (batched < 1))


# --- candidate images in the prompt of a multimodal (Qwen2.5-VL) recommender -------------------------------
@pytest.fixture(scope="module")
def qwen_and_posters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Qwen2.5-VL folder and a 12-movie MovieLens folder (10 posters, 2 movies without)."""
    from semantics_helpers import make_tiny_movielens, make_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("qwen-posters")
    (root / "qwen").mkdir()
    make_tiny_qwen2_5_vl(root / "qwen")
    make_tiny_movielens(root / "data")
    return root / "qwen", root / "data"


def _vl_recommender(folder: Path, dataset, candidate_image: bool = True, lora: LoRAOptions | None = None,
                    seed: int = 0) -> MLLMMSR:
    """Like MLLMMSR.create, on an already loaded dataset; the LoRA weights are seeded."""
    options = MLLMMSROptions(llm=CausalLMOptions(model=str(folder)), candidate_image=candidate_image,
                             recent_items=2, lora=lora or LoRAOptions())
    model, tokenizer = load_causal_lm(options.llm)
    torch.manual_seed(seed)
    return MLLMMSR(options, add_lora(model, options.lora), tokenizer, ItemTexts(dataset, ItemTextOptions()),
                   load_image_processor(folder, options.image_max_side ** 2))


def _poster_dataset(data_dir: Path):
    return load_sequences("movielens-small", data_dir, min_user_interactions=1, min_item_interactions=1)


def test_candidate_images_reach_a_qwen2_5_vl_recommender_and_batching_keeps_scores(
        qwen_and_posters: tuple[Path, Path]) -> None:
    folder, data_dir = qwen_and_posters
    dataset = _poster_dataset(data_dir)
    options = MLLMMSROptions(llm=CausalLMOptions(model=str(folder)))
    recommender = MLLMMSR.create(options, ItemTexts(dataset, ItemTextOptions()), seed=0)
    assert recommender.uses_images and recommender.image_processor is not None
    summary = f"{SUMMARY_PREFIX} comedies."
    candidates = list(range(1, dataset.n_items + 1))
    prompts = [recommender.prompt(summary, [1, 2, 3][:1 + k % 3], c) for k, c in enumerate(candidates)]
    with_poster = [c for c in candidates if dataset.image_path(c) is not None]
    assert len(with_poster) == 10
    assert [p.image_item for p in prompts] == [c if c in with_poster else None for c in candidates]
    assert recommender.image_report()["missing"] == {str(dataset.item_ids[c]): "no image" for c in candidates
                                                     if c not in with_poster}
    assert prompts[0].text.count("<|image_pad|>") == 1 and "<|image_pad|>" not in prompts[0].text_only

    # the image is shrunk to image_max_side (224) and expanded to one token per merged patch
    inputs = recommender._encode([prompts[0]])
    grid = inputs["image_grid_thw"][0]
    assert max(int(grid[1]), int(grid[2])) * 14 <= 224
    assert int((inputs["input_ids"] == recommender.image_token_id).sum()) == int(grid.prod()) // 4
    assert recommender.prompt_tokens(prompts) == [int(recommender._encode([p])["attention_mask"].sum())
                                                  for p in prompts]

    # batches mix image and text-only prompts of different lengths; batched == one by one
    batched = recommender.score_prompts(prompts, batch_size=5)
    one_by_one = torch.cat([recommender.score_prompts([p], batch_size=1) for p in prompts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    assert torch.all((batched > 0) & (batched < 1))

    # same weights, candidate_image off: the candidates with a poster score differently, the others the same
    text_only = MLLMMSR(options.model_copy(update={"candidate_image": False}), recommender.model,
                        recommender.tokenizer, recommender.items)
    assert not text_only.uses_images
    plain = [text_only.prompt(summary, [1, 2, 3][:1 + k % 3], c) for k, c in enumerate(candidates)]
    assert [p.text for p in plain] == [p.text_only or p.text for p in prompts]
    without = text_only.score_prompts(plain, batch_size=5)
    rows = torch.tensor([c in with_poster for c in candidates])
    assert (batched[rows] - without[rows]).abs().min() > 1e-5, (batched, without)
    torch.testing.assert_close(batched[~rows], without[~rows])
    # the pixels matter: the same text with another item's image scores differently
    swapped = RecommenderPrompt(prompts[0].text, image_item=prompts[1].image_item, text_only=prompts[0].text_only)
    assert abs(float(recommender.score_prompts([swapped])[0]) - float(batched[0])) > 1e-5  # about 8e-4

    # a text-only LLM ignores the switch; the switch is part of the run's configuration
    assert not _recommender(_split_of(dataset)).uses_images
    config = load_mllm_msr_config(None, ["model.candidate_image=false", "model.image_max_side=112"])
    assert config.model.candidate_image is False and config.model.model_dump()["image_max_side"] == 112


def _split_of(dataset) -> LeaveOneOutSplit:
    return LeaveOneOutSplit(dataset)


def test_lora_training_with_candidate_images_leaves_the_vision_tower_untouched(
        qwen_and_posters: tuple[Path, Path]) -> None:
    folder, data_dir = qwen_and_posters
    dataset = _poster_dataset(data_dir)
    recommender = _vl_recommender(folder, dataset, lora=LoRAOptions(dropout=0.0))
    base = recommender.model.get_base_model()
    vision = {name: p.detach().clone() for name, p in base.model.visual.named_parameters()}
    lora = {name: p.detach().clone() for name, p in recommender.model.named_parameters() if p.requires_grad}
    assert lora and not [n for n in lora if "visual" in n]
    vision_calls: list[int] = []
    hook = base.model.visual.register_forward_hook(lambda *_: vision_calls.append(1))
    summary = f"{SUMMARY_PREFIX} adventure films."
    samples = [PromptSample(recommender.prompt(summary, [1, 2], c), c % 2 == 0) for c in range(3, 11)]
    assert all(s.prompt.image_item is not None for s in samples)
    before = recommender.score_prompts([s.prompt for s in samples])
    try:
        timings = recommender.fit(samples, MLLMMSRTrainingOptions(lr=1e-2, epochs=2, batch_size=4), seed=0)
    finally:
        hook.remove()
    assert timings["train_samples"] == 16 and np.isfinite(timings["train_loss"])
    # the vision tower ran on the scoring batch and on every training batch (2 epochs x 2 batches)
    assert len(vision_calls) == 5
    for name, p in base.model.visual.named_parameters():
        assert not p.requires_grad and torch.equal(p, vision[name]), name
    moved = [name for name, p in recommender.model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), lora[name])]
    assert moved and all("lora_" in name for name in moved)
    after = recommender.score_prompts([s.prompt for s in samples])
    assert not torch.allclose(before, after)


def test_a_missing_or_broken_poster_falls_back_to_text_with_a_warning(
        qwen_and_posters: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil
    import warnings

    folder, data_dir = qwen_and_posters
    shutil.copytree(data_dir, tmp_path / "data")
    dataset = _poster_dataset(tmp_path / "data")
    gone, broken, later = [c for c in range(1, dataset.n_items + 1) if dataset.image_path(c) is not None][:3]
    dataset.image_path(gone).unlink()
    dataset.image_path(broken).write_bytes(b"not a jpeg")
    recommender = _vl_recommender(folder, dataset)
    text_only = MLLMMSR(recommender.options.model_copy(update={"candidate_image": False}), recommender.model,
                        recommender.tokenizer, recommender.items)
    summary = f"{SUMMARY_PREFIX} comedies."
    for item in (gone, broken):
        name = dataset.image_path(item).name
        with pytest.warns(UserWarning, match=rf"item {dataset.item_ids[item]} \(id {item}\): cannot read its "
                          rf"image .*{name}"):
            prompt = recommender.prompt(summary, [1], item)
        assert prompt.image_item is None and prompt.text == text_only.prompt(summary, [1], item).text
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per file, not per prompt
            recommender.prompt(summary, [2], item)
    report = recommender.image_report()
    assert set(report["missing"]) == {str(dataset.item_ids[gone]), str(dataset.item_ids[broken])}
    assert all(reason.startswith("unreadable") for reason in report["missing"].values())

    # a poster that disappears after its prompt was built: another recommender scoring it falls back to text
    prompt = recommender.prompt(summary, [1], later)
    assert prompt.image_item == later
    dataset.image_path(later).unlink()
    fresh = _vl_recommender(folder, dataset)
    with pytest.warns(UserWarning, match="cannot read its image"):
        scores = fresh.score_prompts([prompt, recommender.prompt(summary, [1], gone)], batch_size=2)
    expected = text_only.score_prompts([prompt.text_only, text_only.prompt(summary, [1], gone)], batch_size=2)
    torch.testing.assert_close(scores, expected)


def test_a_multimodal_run_attaches_candidate_images_and_records_them(qwen_and_posters: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """run_mllm_msr end to end with a Qwen2.5-VL recommender: config.toml and final.json record the images."""
    import shutil

    from prismrec.llmrec.mllm_msr import MLLMMSRConfig, run_mllm_msr
    from semantics_helpers import MOVIES

    folder, data_dir = qwen_and_posters
    shutil.copytree(data_dir, tmp_path / "data")
    # 4 users x 7 of the 12 movies, so every user has never-seen movies left for sampled negatives
    ratings = ["userId,movieId,rating,timestamp"] + [
        f"{user},{MOVIES[(user * 3 + step) % len(MOVIES)][0]},4.0,{1000 * user + step}"
        for user in range(1, 5) for step in range(7)]
    (tmp_path / "data" / "movielens-small" / "ratings.csv").write_text("\n".join(ratings) + "\n")
    with FakeOpenAIServer() as server:
        config = MLLMMSRConfig.model_validate({
            "name": "tiny-vl", "data": {"data_dir": str(tmp_path / "data")},
            "model": {"llm": {"model": str(folder)}, "recent_items": 2,
                      "summaries": {"backend": "openai", "backend_options": _openai_options(server),
                                    "cache": str(tmp_path / "cache.sqlite")}},
            "training": {"lr": 1e-3, "epochs": 1, "batch_size": 4, "negatives_per_positive": 2},
            "evaluation": {"num_negatives": 4, "full_ranking": False}})
        (tmp_path / "run").mkdir()
        run_dir, result = run_mllm_msr(config, run_dir=tmp_path / "run", quiet=True)
    images = result["candidate_images"]
    # 4 x (1 + 2) training prompts and 4 users x 5 candidates x 2 stages
    assert images["enabled"] and images["prompts_with_image"] + images["prompts_text_only"] == 12 + 40
    assert images["prompts_with_image"] > images["prompts_text_only"] > 0
    assert set(images["missing"]) <= {"12", "13"} and set(images["missing"].values()) == {"no image"}
    assert "candidate_image = true" in (run_dir / "config.toml").read_text()
    assert json.loads((run_dir / "final.json").read_text())["candidate_images"] == images
    assert set(result["metrics"]) == {"valid/sampled", "test/sampled"}


def test_shared_prefix_kv_cache_gives_the_same_scores(split: LeaveOneOutSplit) -> None:
    """Scoring one user's candidates from the KV cache of their shared prompt prefix changes no score."""
    recommender = _recommender(split, seed=1)
    prompts = []
    for user in range(4):  # 4 users x 9 candidates, candidate texts of different lengths, shuffled together
        sequence = [int(i) for i in split.dataset.sequences[user]]
        summary = f"{SUMMARY_PREFIX} {'drama ' * user}films."
        prompts += [recommender.prompt(summary, sequence[:4 + user], c) for c in range(1 + user, 40, 4)]
    order = np.random.default_rng(0).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    assert recommender.reuses_prefix(prompts) and len(recommender.prefix_groups(prompts)) == 4
    plain = recommender.score_prompts(prompts, batch_size=5, reuse_prefix=False)
    reused = recommender.score_prompts(prompts, batch_size=5)
    torch.testing.assert_close(reused, plain, atol=1e-5, rtol=1e-4)
    assert plain.std() > 0


def test_training_through_the_prefix_cache_gives_the_same_loss_and_gradients(split: LeaveOneOutSplit) -> None:
    """A group's logits through the cached prefix, and the LoRA gradients they give, equal whole prompts'."""
    recommender = _recommender(split, seed=2, lora=LoRAOptions(dropout=0.0))
    sequence = [int(i) for i in split.dataset.sequences[2]]
    texts = [recommender.prompt(f"{SUMMARY_PREFIX} comedies.", sequence[:5], c).text for c in (3, 11, 17, 26)]
    target = torch.tensor([recommender.yes_id, recommender.no_id, recommender.no_id, recommender.yes_id])
    lora = [p for p in recommender.model.parameters() if p.requires_grad]
    recommender.model.train()
    results = []
    for grouped in (False, True):
        recommender.model.zero_grad()
        if grouped:
            rows, logits = next(recommender._group_logits(texts, len(texts)))
            logits = logits[torch.argsort(torch.tensor(rows))]
        else:
            logits = recommender._logits(recommender._encode(texts))
        torch.nn.functional.cross_entropy(logits.float(), target).backward()
        results.append((logits.detach(), [p.grad.clone() for p in lora]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for grouped, plain in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(grouped, plain, atol=1e-6, rtol=1e-3)
    assert any(float(g.abs().sum()) > 0 for g in results[1][1])
