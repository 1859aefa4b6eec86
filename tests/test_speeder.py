"""Speeder: MRC shapes and gate, MPO stages, SPAE switches, training, evaluation, validity-aware Hit@1, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llm_fixtures import save_tiny_causal_lm, tiny_causal_lm
from prismrec.data import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import FullRankingEvaluator, SampledRankingEvaluator
from prismrec.llmrec.causal_lm import LoRAOptions, add_lora
from prismrec.llmrec.speeder import (
    MODALITIES,
    MixtureOfModalityExperts,
    Speeder,
    SpeederError,
    SpeederOptions,
    SpeederTrainingOptions,
    StageOptions,
    collaborative_table_from_sasrec_run,
    default_stages,
    evaluate_choice,
    load_modality_features,
    sample_training_batch,
    train_speeder,
    validity_aware_hit_at_1,
)
from semantics_fixtures import write_artefact

N_USERS, N_MOVIES = 24, 40


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A MovieLens-format folder (24 users, 40 movies) and a matching random semantics artefact."""
    from conftest import write_movielens

    root = tmp_path_factory.mktemp("speeder-data")
    rng = np.random.default_rng(0)
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, N_USERS + 1):
        movies = rng.choice(np.arange(1, N_MOVIES), size=int(rng.integers(12, 20)), replace=False)
        lines += [f"{user},{movie},4.0,{1000 + step}" for step, movie in enumerate(movies)]
    write_movielens(root, "\n".join(lines) + "\n")
    dataset = load_sequences("movielens-small", root)
    artefact = write_artefact(root / "artefact", [str(i) for i in dataset.item_ids[1:]], dim=12)
    return root, LeaveOneOutSplit(dataset), artefact


def _options(artefact, **changes) -> SpeederOptions:
    base = dict(semantics=str(artefact), image_matrix="visual", collaborative="learned", collaborative_dim=8,
                expert_hidden=16, max_len=6, n_choices=6, train_negatives=8, expert_dropout=0.0)
    return SpeederOptions(**{**base, **changes})


def _model(tiny_data, lora: bool = True, seed: int = 0, **changes) -> Speeder:
    _, split, artefact = tiny_data
    options = _options(artefact, **changes)
    llm, tokenizer = tiny_causal_lm(seed)
    if lora:
        llm = add_lora(llm, LoRAOptions(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(seed)
    return Speeder(llm, tokenizer, load_modality_features(options, split.dataset, None), options)


def test_moe_output_shape_and_gate_weights():
    rng = np.random.default_rng(0)
    features = {"text": rng.normal(size=(11, 12)), "visual": rng.normal(size=(11, 20)),
                "collaborative": rng.normal(size=(11, 5))}
    mrc = MixtureOfModalityExperts(features, llm_dim=32, n_tokens=3, hidden=16, dropout=0.0, token_norm=2.0)
    torch.nn.init.normal_(mrc.gate.weight)  # a non-uniform gate, so the check is not trivially 1/3 each
    ids = torch.tensor([1, 4, 7, 10])
    tokens = mrc(ids)
    assert tokens.shape == (4, 3, 32)
    assert torch.allclose(tokens.norm(dim=-1), torch.full((4, 3), 2.0), atol=1e-5)  # on the embedding scale
    weights = mrc.gate_weights(ids)
    assert weights.shape == (4, len(MODALITIES))
    assert torch.allclose(weights.sum(-1), torch.ones(4))
    assert not torch.allclose(weights[0], weights[1])  # per-item gate
    mrc.set_active(["text", "visual"])
    weights = mrc.gate_weights(ids)
    assert torch.allclose(weights.sum(-1), torch.ones(4))
    assert torch.all(weights[:, MODALITIES.index("collaborative")] == 0)
    # An inactive modality's input cannot move the tokens.
    before = mrc(ids)
    mrc.features_collaborative.add_(5.0)
    assert torch.allclose(before, mrc(ids))
    with pytest.raises(SpeederError):
        mrc.set_active(["sound"])  # type: ignore[list-item]


def test_output_lives_in_the_llm_input_space(tiny_data):
    model = _model(tiny_data)
    hidden = model.llm.get_base_model().get_input_embeddings().weight.shape[1]
    assert model.item_tokens(torch.tensor([1, 2])).shape == (2, 1, hidden)
    model2 = _model(tiny_data, n_item_tokens=2)
    batch = model2.prompts.build([np.array([1, 2, 3])])
    assert int((batch.slot_item > 0).sum()) == 3 * 2  # two soft tokens per history item


def test_progressive_stages_freeze_and_unfreeze_the_right_parameters(tiny_data):
    model = _model(tiny_data)
    llm_base = [p for n, p in model.llm.named_parameters() if "lora_" not in n]
    text, visual, lora = default_stages()
    for stage, experts, with_lora in ((text, {"text"}, False), (visual, {"text", "visual"}, False),
                                      (lora, set(MODALITIES), True)):
        trainable = {id(p) for p in model.set_stage(stage)}
        assert model.mrc.active == tuple(m for m in MODALITIES if m in experts)
        for modality in MODALITIES:
            for param in model.mrc.experts[modality].parameters():
                assert param.requires_grad == (modality in experts)
                assert (id(param) in trainable) == (modality in experts)
        assert model.mrc.id_table.weight.requires_grad == ("collaborative" in experts)
        assert all(p.requires_grad == with_lora for p in model.lora_parameters())
        assert not any(p.requires_grad for p in llm_base)  # the LLM itself never trains
        assert all(p.requires_grad for p in model.score_head.parameters())
        assert model.positions is not None and model.positions.weight.requires_grad
    unadapted = _model(tiny_data, lora=False)
    with pytest.raises(SpeederError, match="LoRA"):
        unadapted.set_stage(lora)


def test_spae_switches_change_the_inputs(tiny_data):
    history = [np.array([3, 5, 7, 9])]
    with_cues, without_cues = _model(tiny_data), _model(tiny_data, relative_position_cues=False)
    cued = with_cues.prompts.build(history)
    plain = without_cues.prompts.build(history)
    assert cued.input_ids.tolist() != plain.input_ids.tolist()
    assert cued.slot_item.tolist() != plain.slot_item.tolist() or cued.n_tokens != plain.n_tokens
    text = with_cues.tokenizer.decode(cued.input_ids[0])
    assert "most recent:" in text and "3 interactions ago:" in text and "1 interaction ago:" in text
    assert "ago" not in without_cues.tokenizer.decode(plain.input_ids[0])
    # Absolute positions: end-aligned, so the most recent item always gets max_len - 1.
    positions = cued.slot_position[cued.slot_item > 0].tolist()
    assert positions == [2, 3, 4, 5]
    assert with_cues.prompts.build([np.array([8])]).slot_position.max().item() == 5
    # Position embeddings start at zero (no-op); once learned they change the embedded prompt, and off they cannot.
    torch.nn.init.normal_(with_cues.positions.weight)
    no_positions = _model(tiny_data, absolute_position_embeddings=False)
    assert no_positions.positions is None
    reference = _model(tiny_data)
    assert not torch.allclose(with_cues.embed(cued), reference.embed(cued))
    assert torch.allclose(no_positions.embed(cued), reference.embed(cued))


def test_training_reduces_the_loss_and_records_each_stage(tiny_data):
    _, split, _ = tiny_data
    model = _model(tiny_data)
    rng = np.random.default_rng(0)
    users = np.arange(6)
    batch = sample_training_batch(model, split.train_sequences, users, split.dataset.n_items, rng)
    assert batch.prompts.choice_index is not None
    model.set_stage(default_stages()[-1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = None
    for _ in range(25):
        losses = model.loss(batch.prompts, batch.targets, batch.negatives)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first if first is not None else {k: float(v.detach()) for k, v in losses.items()}
    with torch.no_grad():
        last = model.loss(batch.prompts, batch.targets, batch.negatives)
    assert float(last["retrieval"]) < 0.7 * first["retrieval"]
    assert float(last["choice"]) < 0.7 * first["choice"]

    # MPO on the split: every stage runs, starts from the previous weights and records validation metrics.
    fresh = _model(tiny_data, seed=1)
    stages = [StageOptions(name="text", modalities=["text"], steps=2, lr=1e-3),
              StageOptions(name="text+visual", modalities=["text", "visual"], steps=2, lr=1e-3),
              StageOptions(name="full", modalities=["text", "visual", "collaborative"], lora=True, steps=2, lr=1e-3)]
    evaluator = SampledRankingEvaluator(split, num_negatives=10, seed=3, ks=(10,))
    logged = []
    expert_before = [p.detach().clone() for p in fresh.mrc.experts["text"].parameters()]
    records = train_speeder(fresh, split, SpeederTrainingOptions(stages=stages, batch_size=4, valid_users=5),
                            seed=0, evaluator=evaluator, log=logged.append)
    assert [r.name for r in records] == ["text", "text+visual", "full"]
    assert [r["name"] for r in logged] == ["text", "text+visual", "full"]
    for record in records:
        assert set(record.valid) >= {"hit@10", "ndcg@10", "choice_hit@1", "choice_valid_answer_rate"}
        assert 0.0 <= record.valid["hit@10"] <= 1.0 and record.samples_per_s > 0
    assert records[0].trainable_parameters < records[1].trainable_parameters < records[2].trainable_parameters
    assert any(not torch.equal(a, b) for a, b in zip(expert_before, fresh.mrc.experts["text"].parameters(),
                                                     strict=True))


def test_scoring_through_our_evaluators(tiny_data):
    _, split, _ = tiny_data
    model = _model(tiny_data).eval()
    sampled = SampledRankingEvaluator(split, num_negatives=10, seed=3, ks=(5, 10), batch_size=5)
    result = sampled.evaluate(model, "test")
    assert len(result.users) == len(split.eval_users)
    assert all(0.0 <= v <= 1.0 for v in result.summary().values())
    full = FullRankingEvaluator(split, ks=(10,), batch_size=7).evaluate(model, "valid")
    assert all(0.0 <= v <= 1.0 for v in full.summary().values())
    # One prompt per user scores every candidate: batched scores equal one-by-one scores, and the two
    # scoring modes agree on the same items.
    inputs = torch.tensor([[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]])
    candidates = torch.tensor([[11, 12, 13], [14, 15, 16]])
    batched = model.score(inputs, candidates)
    single = torch.cat([model.score(inputs[i:i + 1], candidates[i:i + 1]) for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-4)
    every = model.score(inputs, None)
    assert torch.allclose(every.gather(1, candidates), batched, atol=1e-4)
    choice = evaluate_choice(model, split, "test", split.eval_users[:5], seed=3, batch_size=2)
    assert 0.0 <= choice["hit@1"] <= choice["valid_answer_rate"] <= 1.0


def test_validity_aware_hit_at_1_counts_an_answer_naming_no_candidate_as_a_miss():
    letters = [10, 11, 12, 13]
    logits = torch.full((4, 20), -5.0)
    logits[0, 11] = 3.0  # names B, the answer: hit
    logits[1, 12] = 3.0  # names C, answer is A: miss, but valid
    logits[2, 3] = 9.0  # arg-max is a non-letter token: invalid, a miss even though A (the answer) beats B, C, D
    logits[2, 10] = 8.0
    logits[3, 13] = 3.0  # names D, but only 3 candidates were listed: invalid, a miss
    answers = torch.tensor([1, 0, 0, 2])
    hit, valid = validity_aware_hit_at_1(logits, letters, answers, n_listed=3)
    assert hit.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert valid.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_collaborative_table_must_come_from_the_same_data(tiny_data, tmp_path):
    from safetensors.torch import save_file

    _, split, _ = tiny_data
    table = torch.randn(split.dataset.n_items + 1, 6)
    save_file({"item_encoder.embedding.weight": table}, str(tmp_path / "model.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps({"data_fingerprint": split.dataset.fingerprint}))
    loaded = collaborative_table_from_sasrec_run(tmp_path, split.dataset)
    assert loaded.shape == (split.dataset.n_items + 1, 6) and np.all(loaded[0] == 0)
    (tmp_path / "meta.json").write_text(json.dumps({"data_fingerprint": "other"}))
    with pytest.raises(SpeederError, match="not on this dataset"):
        collaborative_table_from_sasrec_run(tmp_path, split.dataset)


def test_cli_trains_in_stages_and_writes_the_run(tiny_data, tmp_path):
    from prismrec.cli.app import app

    root, split, artefact = tiny_data
    model_dir = save_tiny_causal_lm(tmp_path / "tiny-llm")
    run_dir = tmp_path / "run"
    overrides = [f'llm.model="{model_dir}"', f'model.semantics="{artefact}"', 'model.image_matrix="visual"',
                 'model.collaborative="learned"', "model.expert_hidden=16", "model.max_len=5", "model.n_choices=5",
                 "training.batch_size=4", "training.valid_users=4", "evaluation.num_negatives=10",
                 "evaluation.ks=[10]", "evaluation.users=6", "llm.lora_r=4"]
    # Stage lengths live in the [[training.stages]] tables: a copy of the shipped config with 1 step each.
    config = tmp_path / "speeder.toml"
    text = open("configs/movielens_speeder.toml", encoding="utf-8").read()
    config.write_text(text.replace("steps = 60", "steps = 1").replace("steps = 120", "steps = 1"))
    args = ["speeder", "train", "--config", str(config), "--data-dir", str(root), "--run-dir", str(run_dir), "--quiet"]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stages = [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines()]
    assert [s["name"] for s in stages] == ["text", "text+visual", "full"]
    assert all("hit@10" in s["valid"] for s in stages)
    final = json.loads((run_dir / "final.json").read_text())
    assert set(final["metrics"]) == {"valid/sampled", "test/sampled", "valid/choice", "test/choice"}
    assert (run_dir / "speeder.safetensors").exists() and (run_dir / "lora" / "adapter.safetensors").exists()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["data_fingerprint"] == split.dataset.fingerprint and "torch" in meta["packages"]

    bad = CliRunner().invoke(app, ["speeder", "train", "--set", "model.n_item_tokenz=2", "--quiet"])
    assert bad.exit_code == 2 and "n_item_tokenz" in bad.output
