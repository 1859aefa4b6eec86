"""GRU4Rec: padding never reaches the recurrence, causal by construction, SASRec's output head."""

from __future__ import annotations

import numpy as np
import torch

from prismrec.models.backbones.gru4rec import GRU4Rec, GRU4RecConfig, shift_left_padding


def _model(**kw) -> GRU4Rec:
    torch.manual_seed(0)
    return GRU4Rec(GRU4RecConfig(hidden_size=16, max_len=8, **kw), n_items=30).eval()


def test_left_padding_does_not_change_the_real_positions():
    model = _model(num_layers=2)
    padded = torch.tensor([[0, 0, 0, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        batch = model.encode(padded)
        alone = model.encode(torch.tensor([[4, 5, 6, 7, 8]]))
        full_alone = model.encode(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
    assert torch.allclose(batch[0, 3:], alone[0], atol=1e-6)
    assert torch.allclose(batch[1], full_alone[0], atol=1e-6)
    assert torch.equal(batch[0, :3], torch.zeros_like(batch[0, :3]))


def test_future_items_do_not_change_the_past():
    model = _model()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([11, 12, 13])
    with torch.no_grad():
        a, b = model.encode(seq), model.encode(changed)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not torch.allclose(a[0, 5:], b[0, 5:], atol=1e-4)


def test_shift_round_trip():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    lengths = torch.tensor([2, 5])
    front = shift_left_padding(x, lengths, to_front=True)
    assert front[0, :2, 0].tolist() == [3.0, 4.0]
    assert torch.equal(shift_left_padding(front, lengths, to_front=False), x)


def test_score_modes_agree_and_training_lowers_the_loss():
    model = _model()
    seq = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 9, 8, 7, 6]])
    with torch.no_grad():
        full = model.score(seq, None)
        cands = torch.tensor([[1, 5, 29], [2, 3, 4]])
        assert torch.allclose(full.gather(1, cands), model.score(seq, cands), atol=1e-5)
    model.train()
    rng = np.random.default_rng(0)
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9, 10])]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for loss_name in ("bce", "ce"):
        losses = []
        for _ in range(40):
            loss = model.training_loss(model.training_batch(seqs, rng), loss_name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
