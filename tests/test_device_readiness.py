"""GPU readiness without a GPU: every model trains a step and is evaluated with all its tensors on the meta device.

A meta tensor has a shape and a dtype but no data, and torch refuses to mix it with a CPU tensor, so a tensor a
forward pass creates on the CPU (``torch.arange(n)`` without ``device=``, ``torch.tensor(...)``, a ``.cpu()``)
fails here exactly as it would on a CUDA device. Two data-dependent operators have no meta kernel in torch:
``nonzero`` (boolean-mask indexing) is switched to torch's own "assume every element is non-zero" meta
implementation, and ``_unique2`` gets one here that assumes every element distinct; shapes then differ from a
real run, devices do not. ``benchmarks/gpu_check.sh`` runs this file, with ``PRISMREC_TEST_DEVICE=cuda``, on a
real GPU too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prismrec.config import load_config
from prismrec.data import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation import FullRankingEvaluator, SampledRankingEvaluator, chunked_full_ranking
from prismrec.models import MODELS
from prismrec.models.backbones.gru4rec import GRU4RecEncoder
from prismrec.models.backbones.sasrec import SASRec
from prismrec.models.base import IdItemEmbedding, SequentialRecommender
from prismrec.models.losses import NegativeSampler
from prismrec.training import Trainer
from semantics_fixtures import write_artefact

from conftest import write_walk_movielens

DEVICE = os.environ.get("PRISMREC_TEST_DEVICE", "meta")
TINY = {"hidden_size": 16, "max_len": 10, "dropout": 0.0}
BASELINE_OPTIONS = {
    "cpmm": {"pretrain_steps": 2, "pretrain_batch": 16},
    "qarm": {"aligned_dim": 8, "align_steps": 2, "align_batch": 32, "vq_codebook_size": 8, "vq_top_k": 2,
             "rq_codebook_size": 4, "rq_levels": 3},
    "xreflect": {},
    "dmesr": {"id_embedding": True},
}
CASES = [("sasrec", None), ("gru4rec", None), ("bert4rec", None), ("popularity", None)] + [
    (name, backbone) for name in ("dmesr", "cpmm", "qarm", "xreflect")
    for backbone in ("sasrec", "bert4rec", "gru4rec")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[LeaveOneOutSplit, Path]:
    root = tmp_path_factory.mktemp("device")
    write_walk_movielens(root, users=40, movies=39)
    split = LeaveOneOutSplit(load_sequences("movielens-small", root))
    artefact = write_artefact(root / "artefact", [str(i) for i in split.dataset.item_ids[1:]], dim=12)
    return split, artefact


@pytest.fixture(scope="module", autouse=True)
def meta_kernels() -> Iterator[None]:
    """The two data-dependent operators the models use, made runnable on meta (only for the meta device)."""
    if DEVICE != "meta":
        yield
        return
    import torch.fx.experimental._config as fx_config

    previous = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    library = torch.library.Library("aten", "IMPL", "Meta")

    def unique2(self: torch.Tensor, sorted: bool = True, return_inverse: bool = False,
                return_counts: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = self.reshape(-1)
        return (torch.empty_like(flat), torch.empty(self.shape, dtype=torch.long, device="meta"),
                torch.empty(flat.shape, dtype=torch.long, device="meta"))

    library.impl("_unique2", unique2)
    yield
    fx_config.meta_nonzero_assume_all_nonzero = previous
    del library  # drops the registration


def _build(name: str, backbone: str | None, split: LeaveOneOutSplit, artefact: Path):
    cls = MODELS.get(name)
    if name == "popularity":
        return cls.build(cls.Config(), split)
    options = dict(TINY)
    if backbone is not None:
        options.update({"semantics": str(artefact), "backbone": backbone, **BASELINE_OPTIONS[name]})
    torch.manual_seed(0)
    return cls.build(cls.Config(**options), split)


def _step_and_evaluate(model: nn.Module, split: LeaveOneOutSplit, device: str) -> None:
    """One training step per loss (backward included) and one evaluation of each kind, all on ``device``."""
    rng = np.random.default_rng(0)
    sampler = NegativeSampler(split.dataset.n_items)
    model = model.to(device)
    if model.trainable:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for loss in ("bce", "ce", "sampled_ce"):
            batch = model.training_batch(split.train_sequences[:4], rng)
            batch["sampled_ids"], batch["sampled_logq"] = sampler.draw(8, rng)
            batch = {k: v.to(device) for k, v in batch.items()}
            value = model.training_loss(batch, loss)
            assert value.device.type == torch.device(device).type and value.dim() == 0
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    model.eval()
    inputs = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 0, 9, 10, 11]], device=device)
    with torch.no_grad():
        sampled = model.score(inputs, torch.tensor([[7, 1, 30], [12, 2, 3]], device=device))
        assert sampled.shape == (2, 3) and sampled.device.type == torch.device(device).type
        factors = model.score_factors(inputs)
        assert factors is not None, "full ranking would fall back to scoring candidate chunks"
        ranking = chunked_full_ranking(factors, split.dataset.n_items, np.array([7, 12]),
                                       [np.array([1, 2, 3, 4, 5, 6]), np.array([9, 10, 11])], 10, 5, device)
        assert ranking.ranks.shape == (2,) and ranking.top_items.shape == (2, 5)
        assert ranking.ranks.device.type == torch.device(device).type


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=[f"{n}-{b}" if b else n for n, b in CASES])
def test_every_model_trains_and_evaluates_off_the_cpu(name, backbone, data):
    split, artefact = data
    _step_and_evaluate(_build(name, backbone, split, artefact), split, DEVICE)


class CpuInForward(SequentialRecommender):
    """A model that builds a position tensor on the CPU inside its forward pass (the bug to catch)."""

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs.shape[1])  # no device=: a CPU tensor
        return super().encode(inputs) + positions.view(1, -1, 1).to(torch.float32)


def test_a_cpu_tensor_created_in_forward_fails(data):
    split, _ = data
    if DEVICE == "cpu":
        pytest.skip("on the CPU itself a CPU tensor is not a mistake")
    base = SASRec(SASRec.Config(**TINY), split.dataset.n_items)
    broken = CpuInForward(IdItemEmbedding(split.dataset.n_items, 16), base.backbone, 10)
    with pytest.raises((RuntimeError, NotImplementedError), match=r"device|meta|cpu"):
        _step_and_evaluate(broken, split, DEVICE)


def test_gru4rec_unpacked_path_equals_packed():
    """Off the CPU GRU4Rec does not pack (packing copies the lengths to the host); same outputs as packed."""
    torch.manual_seed(0)
    encoder = GRU4RecEncoder(8, 6, 0.0).eval()
    vectors = torch.randn(3, 6, 8)
    padding = torch.tensor([[True, True, False, False, False, False], [False] * 6, [True] * 5 + [False]])
    with torch.no_grad():
        packed = encoder(vectors, padding)
        encoder.pack = False
        unpacked = encoder(vectors, padding)
    assert torch.allclose(packed, unpacked, atol=1e-6)
    assert (unpacked[padding] == 0).all()


def test_bf16_training_learns_on_held_out_targets(data, tmp_path):
    """``training.precision = "bf16"`` (autocast) trains SASRec to a held-out accuracy near fp32's."""
    split, _ = data
    results = {}
    for precision in ("fp32", "bf16"):
        config = load_config(None, ["model.name='sasrec'", "model.hidden_size=16", "model.max_len=10",
                                    "model.dropout=0.0", "training.max_epochs=15", "training.lr=0.01",
                                    "training.batch_size=16", "evaluation.full_ranking=false",
                                    "evaluation.num_negatives=20",
                                    f"training.precision='{precision}'", "training.num_threads=1",
                                    f"name='bf16-{precision}'"])
        outcome = Trainer(config, split=split, run_dir=tmp_path / precision, quiet=True).fit()
        results[precision] = outcome.final["test/sampled"]["hit@10"]
    assert results["fp32"] > 0.5  # the walk through the catalogue is learnable
    assert results["bf16"] > 0.5 and abs(results["bf16"] - results["fp32"]) < 0.25, results


def test_evaluators_run_on_the_device_when_it_is_real(data):
    """With a real accelerator (gpu_check.sh), the evaluators score on it and agree with the CPU."""
    if DEVICE == "meta":
        pytest.skip("meta tensors carry no values to compare")
    split, _ = data
    torch.manual_seed(0)
    model = SASRec(SASRec.Config(**TINY), split.dataset.n_items).eval()
    cpu_full = FullRankingEvaluator(split).evaluate(model, "test").summary()
    cpu_sampled = SampledRankingEvaluator(split, num_negatives=20).evaluate(model, "test").summary()
    model = model.to(DEVICE)
    dev_full = FullRankingEvaluator(split, device=DEVICE).evaluate(model, "test").summary()
    dev_sampled = SampledRankingEvaluator(split, num_negatives=20, device=DEVICE).evaluate(model, "test").summary()
    assert dev_full["ndcg@10"] == pytest.approx(cpu_full["ndcg@10"], abs=0.02)
    assert dev_sampled["ndcg@10"] == pytest.approx(cpu_sampled["ndcg@10"], abs=0.02)
