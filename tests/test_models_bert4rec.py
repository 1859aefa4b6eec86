"""BERT4Rec: cloze batches, bidirectional attention, scoring at the appended mask, pluggable item vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prismrec.models import BACKBONES, BackboneOptions, ItemEncoder, build_recommender
from prismrec.models.backbones.bert4rec import BERT4Rec, BERT4RecConfig, MaskedItemRecommender, cloze_mask
from prismrec.registry import UnknownComponentError


def _model(**kw) -> BERT4Rec:
    torch.manual_seed(0)
    return BERT4Rec(BERT4RecConfig(hidden_size=16, num_blocks=2, num_heads=2, max_len=8, **kw), n_items=30)


class FeatureEncoder(ItemEncoder):
    """Item vectors from a fixed feature table (like DMESR's adapted MLLM semantics); knows ids 0..n only."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("features", torch.randn(n_items + 1, 24, generator=generator))
        self.adapter = torch.nn.Linear(24, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if int(ids.max()) > self.n_items:
            raise IndexError(f"item id {int(ids.max())} is not an item")
        return self.adapter(self.features[ids]) * (ids > 0).unsqueeze(-1)


def test_cloze_batch_masks_only_real_items_and_at_least_one_per_sequence():
    model = _model(mask_prob=0.5)
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, 21), np.array([4, 5]), np.array([7])]
    batch = model.training_batch(seqs, rng)
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape == targets.shape == (3, 9)  # max_len history + the mask slot
    masked = inputs == model.mask_id
    assert torch.equal(masked, targets > 0)  # a target exactly where the input is hidden
    assert masked.sum(dim=1).min() >= 1
    assert torch.equal(targets[0][masked[0]], torch.arange(12, 21)[masked[0]])  # the hidden items themselves
    assert not masked[1, :7].any() and not masked[2, :8].any()  # padding is never masked
    lengths = np.array([200] * 400)
    share = cloze_mask(lengths, 200, 0.6, np.random.default_rng(1)).mean()
    assert share == pytest.approx(0.6, abs=0.01)


def test_attention_is_bidirectional():
    model = _model().eval()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = seq.clone()
    changed[0, 6] = 11
    with torch.no_grad():
        a, b = model.encode(seq), model.encode(changed)
    assert not torch.allclose(a[0, :6], b[0, :6], atol=1e-5)  # later items change earlier positions


def test_score_reads_the_appended_mask_and_modes_agree():
    model = _model().eval()
    seq = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 9, 8, 7, 6]])
    with torch.no_grad():
        full = model.score(seq, None)
        cands = torch.tensor([[1, 5, 29], [2, 3, 4]])
        part = model.score(seq, cands)
        appended = torch.cat([seq, torch.full((2, 1), model.mask_id)], dim=1)
        direct = model.encode(appended)[:, -1] @ model.item_encoder.all_items().T
    assert full.shape == (2, 31)
    assert torch.allclose(full.gather(1, cands), part, atol=1e-5)
    assert torch.allclose(full, direct, atol=1e-5)


@pytest.mark.parametrize("loss_name", ["ce", "bce"])
def test_training_lowers_the_loss(loss_name):
    torch.manual_seed(0)
    model = BERT4Rec(BERT4RecConfig(hidden_size=16, num_blocks=1, max_len=8, dropout=0.0), n_items=30)
    rng = np.random.default_rng(0)
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9, 10])]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss = model.training_loss(model.training_batch(seqs, rng), loss_name)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_mask_token_lives_in_the_backbone_so_any_item_encoder_plugs_in():
    torch.manual_seed(0)
    encoder = FeatureEncoder(n_items=30, dim=16)
    model = build_recommender("bert4rec", encoder, BackboneOptions(hidden_size=16, max_len=8, num_heads=2))
    assert isinstance(model, MaskedItemRecommender) and model.item_encoder is encoder
    rng = np.random.default_rng(0)
    batch = model.training_batch([np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9])], rng)
    assert (batch["inputs"] == 31).any()  # the mask id is past every item the encoder knows
    loss = model.training_loss(batch, "ce")
    loss.backward()
    assert model.backbone.mask_token.grad is not None and model.backbone.mask_token.grad.abs().sum() > 0
    assert encoder.adapter.weight.grad is not None
    with torch.no_grad():
        assert model.score(torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]]), None).shape == (1, 31)


def test_backbone_registry_builds_every_backbone_under_a_foreign_encoder():
    assert set(BACKBONES.names()) >= {"sasrec", "bert4rec", "gru4rec"}
    for name in ("sasrec", "bert4rec", "gru4rec"):
        torch.manual_seed(0)
        options = BackboneOptions(hidden_size=16, max_len=8, dropout=0.1)
        model = build_recommender(name, FeatureEncoder(30, 16), options)
        batch = model.training_batch([np.arange(1, 11), np.array([3, 4, 5])], np.random.default_rng(0))
        assert torch.isfinite(model.training_loss(batch, "bce"))
        model.eval()
        with torch.no_grad():
            scores = model.score(torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]]), torch.tensor([[1, 2, 3]]))
        assert scores.shape == (1, 3) and torch.isfinite(scores).all()
    with pytest.raises(UnknownComponentError, match=r"known: .*bert4rec.*gru4rec.*sasrec"):
        BACKBONES.get("transformerxl")
    with pytest.raises(ValueError, match="hidden_size"):
        build_recommender("sasrec", FeatureEncoder(30, 8), BackboneOptions(hidden_size=16, max_len=8))
