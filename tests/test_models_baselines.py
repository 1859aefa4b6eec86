"""The item-side enhancer baselines (CPMM, QARM, X-REFLECT) on MovieLens-format data with small artefacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from prismrec.config import load_config
from prismrec.data import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.models import MODELS
from prismrec.models.enhancers.adapters import load_semantic_matrices
from prismrec.models.enhancers.base import consecutive_pairs, sample_pairs
from prismrec.models.enhancers.cpmm import CPMM, cpmm_losses
from prismrec.models.enhancers.qarm import QARM
from prismrec.models.enhancers.xreflect import XREFLECT
from prismrec.semantics.prompts import PROMPTS
from prismrec.training import Trainer
from semantics_fixtures import write_artefact

from conftest import write_movielens

REPO = Path(__file__).resolve().parents[1]
N_MOVIES = 39
TINY = {"hidden_size": 16, "num_blocks": 1, "max_len": 10, "dropout": 0.0}
QARM_TINY = {"aligned_dim": 8, "align_steps": 20, "align_batch": 32, "vq_codebook_size": 8, "vq_top_k": 2,
             "rq_codebook_size": 4, "rq_levels": 3}
CPMM_TINY = {"pretrain_steps": 5, "pretrain_batch": 16}


@pytest.fixture(scope="module")
def movielens_like(tmp_path_factory) -> tuple[Path, LeaveOneOutSplit, Path]:
    """40 users walking through the 39 movies in order from different starts (a learnable next item)."""
    root = tmp_path_factory.mktemp("baselines")
    rows = ["userId,movieId,rating,timestamp"]
    for user in range(1, 41):
        for step in range(14):
            movie = (user * 7 + step) % N_MOVIES + 1
            rows.append(f"{user},{movie},4,{1000 + 10 * step}")
    write_movielens(root, "\n".join(rows) + "\n")
    split = LeaveOneOutSplit(load_sequences("movielens-small", root))
    artefact = write_artefact(root / "artefact", [str(i) for i in split.dataset.item_ids[1:]], dim=12)
    return root, split, artefact


def _config(cls, artefact: Path, backbone: str = "sasrec", **extra):
    defaults = {QARM: QARM_TINY, CPMM: CPMM_TINY}.get(cls, {})
    return cls.Config(semantics=str(artefact), backbone=backbone, **{**TINY, **defaults, **extra})


def _train(model, split: LeaveOneOutSplit, steps: int, loss: str = "bce") -> list[float]:
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sequences = split.train_sequences
    losses = []
    model.train()
    for _ in range(steps):
        batch = model.training_batch([sequences[u] for u in rng.choice(len(sequences), 16, replace=False)], rng)
        value = model.training_loss(batch, loss)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    return losses


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
@pytest.mark.parametrize("cls", [CPMM, QARM, XREFLECT])
def test_baseline_trains_scores_and_rebuilds(cls, backbone, movielens_like):
    _, split, artefact = movielens_like
    torch.manual_seed(0)
    model = cls.build(_config(cls, artefact, backbone), split)
    batch = model.training_batch(split.train_sequences[:4], np.random.default_rng(0))
    if backbone == "bert4rec":
        assert (batch["inputs"] == split.dataset.n_items + 1).any()  # cloze batches carry the mask id
    losses = _train(model, split, steps=30, loss="ce" if backbone == "bert4rec" else "bce")
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    model.eval()
    inputs = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5, 6]])
    candidates = torch.tensor([[7, 1, 30]])
    with torch.no_grad():
        full = model.score(inputs, None)
        part = model.score(inputs, candidates)
    assert full.shape == (1, split.dataset.n_items + 1) and torch.isfinite(full).all()
    assert torch.allclose(full.gather(1, candidates), part, atol=1e-5)
    with torch.no_grad():  # the dot-product form an export can precompute
        assert torch.allclose(model.user_vectors(inputs) @ model.output_items().T, full, atol=1e-5)
    # Inference rebuild from config + weights alone (frozen tables and codes are buffers in the state).
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = cls.from_state(model.config, split.dataset.n_items, state).eval()
    with torch.no_grad():
        assert torch.allclose(again.score(inputs, None), full, atol=1e-6)


def test_qarm_codes_are_deterministic_and_complete(movielens_like):
    _, split, artefact = movielens_like
    config = _config(QARM, artefact)
    codes = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        codes.append(QARM.quantise_items(config, split))
    first, same, other = codes
    n = split.dataset.n_items
    for a, b in ((first.vq_codes, same.vq_codes), (first.rq_codes, same.rq_codes), (first.vq_codebook,
                                                                                       same.vq_codebook)):
        assert np.array_equal(a, b)
    assert not (np.array_equal(first.rq_codes, other.rq_codes) and np.array_equal(first.vq_codes, other.vq_codes))
    assert first.vq_codes.shape == (n + 1, config.vq_top_k) and first.rq_codes.shape == (n + 1, config.rq_levels)
    assert (first.vq_codes[0] == 0).all() and (first.rq_codes[0] == 0).all()  # padding row
    assert (first.vq_codes[1:] >= 1).all() and (first.vq_codes[1:] <= config.vq_codebook_size).all()
    assert (first.rq_codes[1:] >= 1).all() and (first.rq_codes[1:] <= config.rq_codebook_size).all()
    # top-k codes of one item are distinct centroids, nearest first
    assert (first.vq_codes[1:, 0] != first.vq_codes[1:, 1]).all()
    assert len(first.rq_codebooks) == config.rq_levels
    # RQ codes tell items apart much better than one level alone
    assert len({tuple(r) for r in first.rq_codes[1:]}) > len(set(first.rq_codes[1:, 0]))
    # the built model carries exactly these codes as buffers
    torch.manual_seed(3)
    model = QARM.build(config, split)
    assert np.array_equal(model.encoder.rq_codes.numpy(), first.rq_codes)
    assert "inner.item_encoder.vq_codebook" in model.state_dict()


def test_qarm_alignment_pulls_co_occurring_items_together(movielens_like):
    _, split, artefact = movielens_like
    from prismrec.models.enhancers.qarm import align_embeddings

    matrices = load_semantic_matrices(artefact, split.dataset, ["text", "visual", "hybrid"])
    x = np.concatenate([matrices[r] for r in ("text", "visual", "hybrid")], axis=1)
    pairs = consecutive_pairs(split.train_sequences)
    torch.manual_seed(0)
    config = _config(QARM, artefact, align_steps=150)
    aligned = align_embeddings(x, pairs, config, np.random.default_rng(0))
    raw = x[1:] / np.linalg.norm(x[1:], axis=1, keepdims=True)

    def pair_minus_random(vectors: np.ndarray) -> float:
        sims = vectors @ vectors.T
        return float(np.mean(sims[pairs[:, 0] - 1, pairs[:, 1] - 1]) - np.mean(sims))

    assert pair_minus_random(aligned) > pair_minus_random(raw) + 0.2


def test_cpmm_noise_only_while_training(movielens_like):
    _, split, artefact = movielens_like
    torch.manual_seed(0)
    model = CPMM.build(_config(CPMM, artefact, noise_std=0.5), split)
    encoder = model.encoder
    model.eval()
    with torch.no_grad():
        first, second = encoder.all_items(), encoder.all_items()
        ids = torch.arange(split.dataset.n_items + 1)
        clean = encoder.project_text(encoder.tables.table("text")[ids]) + encoder.project_visual(
            encoder.tables.table("visual")[ids])
        clean[0] = 0
        inputs = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
        assert torch.equal(model.score(inputs, None), model.score(inputs, None))
    assert torch.equal(first, second) and torch.allclose(first, clean, atol=1e-6)
    model.train()
    with torch.no_grad():
        noisy_a, noisy_b = encoder.all_items(), encoder.all_items()
    assert not torch.allclose(noisy_a, noisy_b)
    assert torch.all(noisy_a[0] == 0)  # padding stays zero
    relative = float((noisy_a - clean).norm() / clean.norm())
    assert 0.1 < relative < 1.5
    quiet = CPMM(_config(CPMM, artefact, noise_std=0.0), load_semantic_matrices(artefact, split.dataset,
                                                                               ["text", "visual"])).train()
    with torch.no_grad():
        assert torch.equal(quiet.encoder.all_items(), quiet.encoder.all_items())


def test_cpmm_auxiliary_losses_and_pretraining(movielens_like):
    _, split, artefact = movielens_like
    torch.manual_seed(0)
    config = _config(CPMM, artefact, pretrain_steps=0)
    model = CPMM.build(config, split)
    assert model.pretrain(consecutive_pairs(split.train_sequences)) == []  # pretrain_steps = 0: no stage
    model.config = config.model_copy(update={"pretrain_steps": 60, "noise_std": 0.0})
    norm_before = model._mean_item_norm()
    pretrain = model.pretrain(consecutive_pairs(split.train_sequences))
    assert len(pretrain) == 60 and np.mean(pretrain[-5:]) < np.mean(pretrain[:5])
    assert model._mean_item_norm() == pytest.approx(norm_before, rel=1e-4)  # scale restored after the stage
    probe_items, probe_pairs = torch.arange(1, 20), torch.tensor([[1, 2], [3, 4], [5, 6]])
    model.eval()  # no noise draws: compare the losses exactly
    with torch.no_grad():
        before_scaling = float(cpmm_losses(model.encoder, model.config, probe_items, probe_pairs))
        model._rescale(3.0)
        assert float(cpmm_losses(model.encoder, model.config, probe_items, probe_pairs)) == pytest.approx(
            before_scaling, abs=1e-5)  # the CPMM losses cannot see the scale
        model._rescale(1 / 3.0)
    batch = model.training_batch(split.train_sequences[:8], np.random.default_rng(1))
    pairs = batch["cooccurrence_pairs"]
    assert len(pairs) >= 2 and len(set(pairs[:, 0].tolist())) == len(pairs)
    without = CPMM(config.model_copy(update={"contrastive_weight": 0.0, "shift_weight": 0.0,
                                              "cooccurrence_weight": 0.0}),
                   load_semantic_matrices(artefact, split.dataset, ["text", "visual"]))
    without.load_state_dict(model.state_dict())
    # Same weights, no noise, no dropout: the two losses differ by exactly the auxiliary terms.
    model.eval()
    without.eval()
    with torch.no_grad():
        total, auxiliary = float(model.training_loss(batch, "bce")), float(model.auxiliary_loss(batch))
        assert float(without.auxiliary_loss(batch)) == 0.0
        assert auxiliary > 0.1 and total - float(without.training_loss(batch, "bce")) == pytest.approx(auxiliary, 1e-5)


def test_xreflect_uses_xreflect_matrix_only_when_present(movielens_like, tmp_path):
    _, split, artefact = movielens_like
    torch.manual_seed(0)
    plain = XREFLECT.build(_config(XREFLECT, artefact), split)
    assert plain.encoder.routes == ["text", "visual", "hybrid"]
    assert plain.encoder.adapter.fc1.in_features == 3 * 12
    with pytest.raises(ValueError, match="xreflect"):
        XREFLECT.build(_config(XREFLECT, artefact, xreflect="require"), split)

    richer = write_artefact(tmp_path / "with-xreflect", [str(i) for i in split.dataset.item_ids[1:]], dim=12)
    matrices = load_file(str(richer / "embeddings.safetensors"))
    matrices["xreflect"] = np.random.default_rng(1).normal(size=matrices["text"].shape).astype(np.float32)
    save_file(matrices, str(richer / "embeddings.safetensors"))
    full = XREFLECT.build(_config(XREFLECT, richer, include_original=True), split)
    assert full.encoder.routes == ["text", "visual", "hybrid", "xreflect", "original"]
    assert full.encoder.adapter.fc1.in_features == 5 * 12
    again = XREFLECT.from_state(full.config, split.dataset.n_items, full.state_dict())
    assert again.encoder.routes == full.encoder.routes
    off = XREFLECT.build(_config(XREFLECT, richer, xreflect="off"), split)
    assert off.encoder.routes == ["text", "visual", "hybrid"]
    # the loader's optional matrices: returned when present, skipped when absent, required ones still checked
    got = load_semantic_matrices(artefact, split.dataset, ["text"], optional_routes=["xreflect", "hybrid"])
    assert sorted(got) == ["hybrid", "text"]


def test_xreflect_prompt_is_registered():
    template = PROMPTS.get("xreflect")
    text = template.render(text_info="title: Heat; genres: Crime", image_path="the image attached to this message")
    assert template.modality == "text+image" and template.key == "xreflect@v1"
    assert "title: Heat" in text and "contradict" in text and "support" in text


def test_pair_sampling_is_distinct_per_side():
    pairs = consecutive_pairs([np.array([1, 2, 1, 3, 3, 4]), np.array([2, 5])], window=1)
    assert pairs.tolist() == [[1, 2], [2, 1], [1, 3], [3, 4], [2, 5]]  # (3, 3) dropped
    chosen = sample_pairs(pairs, 10, np.random.default_rng(0))
    assert len(set(chosen[:, 0].tolist())) == len(chosen) == len(set(chosen[:, 1].tolist()))
    assert consecutive_pairs([np.array([1, 2, 3])], window=2).tolist() == [[1, 2], [2, 3], [1, 3]]


@pytest.mark.parametrize("name", ["cpmm", "qarm", "xreflect"])
def test_shipped_config_trains_end_to_end(name, movielens_like, tmp_path):
    root, _, artefact = movielens_like
    tiny = {**TINY, **{QARM: QARM_TINY, CPMM: CPMM_TINY}.get(MODELS.get(name), {})}
    overrides = [f"data.data_dir='{root}'", f"model.semantics='{artefact}'", "training.max_epochs=2",
                 "training.batch_size=16", "evaluation.num_negatives=10", *(f"model.{k}={v}" for k, v in tiny.items())]
    config = load_config(REPO / f"configs/movielens_{name}_sasrec.toml", overrides)
    assert config.model.name == name
    outcome = Trainer(config, run_dir=tmp_path / name, quiet=True).fit()
    assert outcome.epochs_run == 2
    for key in ("test/sampled", "test/full"):
        assert 0.0 <= outcome.final[key]["hit@10"] <= 1.0
    assert (tmp_path / name / "model.safetensors").exists()


@pytest.mark.parametrize("cls", [CPMM, QARM, XREFLECT])
def test_id_embedding_option_adds_a_trained_id_vector(cls, movielens_like):
    _, split, artefact = movielens_like
    torch.manual_seed(0)
    plain = cls.build(_config(cls, artefact), split)
    assert plain.encoder.id_embedding is None
    assert not any("id_embedding" in name for name in plain.state_dict())
    torch.manual_seed(0)
    model = cls.build(_config(cls, artefact, id_embedding=True), split)
    table = model.encoder.id_embedding
    assert table is not None and table.weight.shape == (split.dataset.n_items + 1, TINY["hidden_size"])
    model.eval()
    with torch.no_grad():
        with_ids = model.item_encoder.all_items().clone()
        initial = table.weight.clone()
        table.weight.zero_()
        without_ids = model.item_encoder.all_items()
        table.weight.copy_(initial)
    # the item vectors are the semantic vectors plus the item's own ID row (padding stays zero)
    assert not torch.allclose(with_ids, without_ids)
    assert torch.allclose(with_ids[1:] - without_ids[1:], initial[1:], atol=1e-5)
    assert not with_ids[0].any()
    losses = _train(model, split, steps=20)
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not torch.allclose(table.weight, initial)  # the ID rows are learned
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = cls.from_state(model.config, split.dataset.n_items, state).eval()
    model.eval()
    inputs = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(again.score(inputs, None), model.score(inputs, None), atol=1e-6)
