"""GRU4Rec: a recurrent network over the item sequence (Hidasi et al., ICLR 2016; the RecBole variant).

Item vectors go through dropout, ``num_layers`` GRU layers and a linear map back to the item dimension;
the hidden state at position t scores the item at t + 1 by a dot product with the shared item vectors:
the same output head, losses and evaluators as SASRec.

Left padding and recurrence do not mix (a GRU would run over the padding and carry a state into the
first real item), so the sequences are right-aligned and packed before the GRU and shifted back after.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from prismrec.data.split import LeaveOneOutSplit
from prismrec.models.base import IdItemEmbedding, ItemEncoder, SequenceBackbone, SequentialRecommender
from prismrec.models.registry import MODELS
from prismrec.options import ModelConfig


class GRU4RecConfig(ModelConfig):
    name: Literal["gru4rec"] = "gru4rec"
    hidden_size: int = Field(128, ge=1, description="item vector size (and GRU state size by default)")
    gru_size: int | None = Field(None, ge=1, description="GRU state size (default: hidden_size)")
    num_layers: int = Field(1, ge=1)
    max_len: int = Field(200, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


def shift_left_padding(x: torch.Tensor, lengths: torch.Tensor, to_front: bool) -> torch.Tensor:
    """Move each row's last ``lengths`` steps to the front (``to_front``) or back to the end.

    ``x``: (B, L, d). Left-padded rows become right-padded and vice versa (padding is assumed contiguous
    at the start, as :func:`prismrec.evaluation.pad_left` produces).
    """
    length = x.shape[1]
    offset = (length - lengths).unsqueeze(1)  # (B, 1)
    steps = torch.arange(length, device=x.device).unsqueeze(0)
    index = (steps + offset) % length if to_front else (steps - offset) % length
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class GRU4RecEncoder(SequenceBackbone):
    causal: ClassVar[bool] = True

    def __init__(self, hidden_size: int, max_len: int, dropout: float, num_layers: int = 1,
                 gru_size: int | None = None) -> None:
        super().__init__()
        gru_size = gru_size or hidden_size
        self.max_len = max_len
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden_size, gru_size, num_layers=num_layers, batch_first=True, bias=False)
        self.pack = True  # pack the sequences on the CPU (skips the padding); never on other devices
        self.output = nn.Linear(gru_size, hidden_size)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        for name, param in self.gru.named_parameters():
            (nn.init.xavier_uniform_ if "weight_ih" in name else nn.init.orthogonal_)(param)

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        length = item_vectors.shape[1]
        lengths = (~padding_mask).sum(dim=1)
        x = shift_left_padding(self.input_dropout(item_vectors), lengths, to_front=True)
        if self.pack and x.device.type == "cpu":
            packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        else:
            # On an accelerator, packing would copy the lengths to the host every step (a sync). The rows are
            # right-padded now, and a GRU's output at a real position never depends on the padding after it,
            # so the whole padded length goes through (the padded outputs are masked below).
            out, _ = self.gru(x)
        out = shift_left_padding(self.output(out), lengths, to_front=False)
        return out * (~padding_mask).unsqueeze(-1).to(out.dtype)


@MODELS.register("gru4rec")
class GRU4Rec(SequentialRecommender):
    Config = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig, n_items: int, item_encoder: ItemEncoder | None = None) -> None:
        encoder = item_encoder or IdItemEmbedding(n_items, config.hidden_size)
        backbone = GRU4RecEncoder(config.hidden_size, config.max_len, config.dropout, config.num_layers,
                                  config.gru_size)
        super().__init__(encoder, backbone, config.max_len)
        self.config = config
        if isinstance(encoder, IdItemEmbedding):
            with torch.no_grad():
                nn.init.xavier_normal_(encoder.embedding.weight)
                encoder.embedding.weight[0].zero_()

    @classmethod
    def build(cls, config: GRU4RecConfig, split: LeaveOneOutSplit) -> GRU4Rec:
        return cls(config, split.dataset.n_items)

    @classmethod
    def from_state(cls, config: GRU4RecConfig, n_items: int, state: dict[str, torch.Tensor]) -> GRU4Rec:
        model = cls(config, n_items)
        model.load_state_dict(state)
        return model
