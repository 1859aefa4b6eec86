"""``training.loss = "sampled_ce"``: the logQ-corrected sampled softmax approaches full CE as N grows, and learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prismrec.config import load_config
from prismrec.data import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.models.enhancers.dmesr import DMESR
from prismrec.models.losses import NegativeSampler, full_softmax_ce, sampled_softmax_ce
from prismrec.options import ConfigError
from prismrec.training import Trainer
from semantics_fixtures import write_artefact

from conftest import write_walk_movielens


def _gap(kind: str, num: int, repeats: int = 20) -> float:
    """|mean sampled CE - full CE| on a 60-item catalogue with fixed random vectors."""
    torch.manual_seed(0)
    n, d = 60, 8
    table = torch.randn(n + 1, d)
    hidden = torch.randn(3, 7, d)
    targets = torch.randint(1, n + 1, (3, 7))
    mask = torch.rand(3, 7) > 0.2
    full = float(full_softmax_ce(hidden, table, targets, mask))
    counts = np.r_[0, np.random.default_rng(1).integers(0, 200, size=n)]
    sampler = NegativeSampler(n, kind, counts)
    rng = np.random.default_rng(2)
    values = []
    for _ in range(repeats):
        ids, logq = sampler.draw(num, rng)
        values.append(float(sampled_softmax_ce(hidden, table[targets], table[ids], targets, ids, logq, mask)))
    return abs(float(np.mean(values)) - full)


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_sampled_ce_approaches_full_ce_as_negatives_grow(kind):
    gaps = [_gap(kind, num) for num in (4, 40, 400, 20000)]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3], gaps
    assert gaps[3] < 0.01 and gaps[0] > 0.1, gaps


def test_accidental_hits_leave_the_denominator():
    hidden = torch.tensor([[[1.0, 0.0]]])
    table = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1]])
    mask = torch.tensor([[True]])
    ids = torch.tensor([1, 1, 1])  # every draw is the target itself
    loss = sampled_softmax_ce(hidden, table[targets], table[ids], targets, ids, torch.zeros(3), mask)
    assert float(loss) == pytest.approx(0.0)  # only the positive is left: softmax of one logit
    ids = torch.tensor([2])
    logq = torch.tensor([float(np.log(1 * 0.5))])  # q = 1/2 for each of the two items, N = 1
    loss = sampled_softmax_ce(hidden, table[targets], table[ids], targets, ids, logq, mask)
    # exp(2) / (exp(2) + exp(0) / 0.5): the draw stands for the whole rest of the catalogue
    assert float(loss) == pytest.approx(-np.log(np.exp(2) / (np.exp(2) + 2.0)), rel=1e-5)


def test_popularity_sampler_draws_in_proportion_and_reports_log_nq():
    counts = np.array([0, 9, 0, 29, 59])  # + 1 smoothing: weights 10, 1, 30, 60
    sampler = NegativeSampler(4, "popularity", counts)
    ids, logq = sampler.draw(200_000, np.random.default_rng(0))
    assert ids.min() >= 1 and ids.max() <= 4
    freq = np.bincount(ids.numpy(), minlength=5)[1:] / 200_000
    q = np.array([10, 1, 30, 60]) / 101
    assert np.allclose(freq, q, atol=0.005)
    expected = np.log(200_000 * q)[ids.numpy() - 1]
    assert np.allclose(logq.numpy(), expected, atol=1e-4)
    uniform_ids, uniform_logq = NegativeSampler(4).draw(1000, np.random.default_rng(0))
    assert set(uniform_ids.tolist()) == {1, 2, 3, 4}
    assert np.allclose(uniform_logq.numpy(), np.log(1000 / 4))
    with pytest.raises(ValueError, match=r"counts for ids 0\.\.4"):
        NegativeSampler(4, "popularity", counts[:3])
    with pytest.raises(ValueError, match="unknown negative sampler 'zipf'"):
        NegativeSampler(4, "zipf")


def test_config_names_the_bad_sampled_ce_options():
    with pytest.raises(ConfigError, match=r"training\.negative_sampler"):
        load_config(None, ["model.name='sasrec'", "training.negative_sampler='zipf'"])
    with pytest.raises(ConfigError, match=r"training\.num_negatives"):
        load_config(None, ["model.name='sasrec'", "training.num_negatives=0"])
    with pytest.raises(ConfigError, match=r"training\.loss"):
        load_config(None, ["model.name='sasrec'", "training.loss='sampled'"])


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> tuple[LeaveOneOutSplit, Path]:
    """60 users walking through 59 movies in order from different starts: the next item is learnable."""
    root = tmp_path_factory.mktemp("walk")
    write_walk_movielens(root, users=60, movies=59)
    split = LeaveOneOutSplit(load_sequences("movielens-small", root))
    return split, write_artefact(root / "artefact", [str(i) for i in split.dataset.item_ids[1:]], dim=12)


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sasrec_learns_with_sampled_ce_on_held_out_targets(sampler, walk, tmp_path):
    split, _ = walk
    config = load_config(None, ["model.name='sasrec'", "model.hidden_size=16", "model.max_len=10",
                                "model.dropout=0.0", "training.max_epochs=20", "training.lr=0.01",
                                "training.batch_size=16", "training.loss='sampled_ce'", "training.num_negatives=8",
                                f"training.negative_sampler='{sampler}'", "training.num_threads=1",
                                "evaluation.num_negatives=20", f"name='sce-{sampler}'"])
    outcome = Trainer(config, split=split, run_dir=tmp_path / "run", quiet=True).fit()
    popularity = Trainer(load_config(None, ["model.name='popularity'", "evaluation.num_negatives=20",
                                            "name='pop'"]), split=split, run_dir=tmp_path / "pop", quiet=True).fit()
    assert outcome.final["test/full"]["hit@10"] > 0.6, outcome.final["test/full"]
    assert outcome.final["test/full"]["hit@10"] > popularity.final["test/full"]["hit@10"] + 0.4


def test_dmesr_trains_with_sampled_ce(walk):
    split, artefact = walk
    torch.manual_seed(0)
    model = DMESR.build(DMESR.Config(semantics=str(artefact), hidden_size=16, max_len=10, dropout=0.0,
                                     id_embedding=True), split)
    sampler = NegativeSampler(split.dataset.n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        users = rng.choice(len(split.train_sequences), 16, replace=False)
        batch = model.training_batch([split.train_sequences[u] for u in users], rng)
        batch["sampled_ids"], batch["sampled_logq"] = sampler.draw(16, rng)
        loss = model.training_loss(batch, "sampled_ce")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
