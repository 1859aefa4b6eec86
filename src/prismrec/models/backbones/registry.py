"""Sequence backbones by name, for models that bring their own item vectors (DMESR, the baselines).

An enhancer's config says ``backbone = "sasrec"`` (or ``"bert4rec"``, ``"gru4rec"``) and the model does::

    options = BackboneOptions(hidden_size=128, max_len=200, dropout=0.2)
    model = build_recommender("bert4rec", my_item_encoder, options)   # a Recommender, ready to train

or, to assemble things itself, ``spec = BACKBONES.get(name)``, ``backbone = spec.build(options)`` and train
it the way ``spec.objective`` says: ``"next_item"`` (every position predicts the following item,
:class:`~prismrec.models.base.SequentialRecommender`) or ``"cloze"`` (masked items predicted from both
sides, scored at an appended mask, :class:`~prismrec.models.backbones.bert4rec.MaskedItemRecommender`). Every
backbone takes (B, L, d) item vectors and a (B, L) padding mask and returns (B, L, d) hidden states, so
the item vectors may come from any :class:`~prismrec.models.base.ItemEncoder`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prismrec.models.backbones.bert4rec import BERT4RecEncoder, MaskedItemRecommender
from prismrec.models.backbones.gru4rec import GRU4RecEncoder
from prismrec.models.backbones.sasrec import SASRecEncoder, xavier_init
from prismrec.models.base import ItemEncoder, SequenceBackbone, SequentialRecommender
from prismrec.registry import Registry

Objective = Literal["next_item", "cloze"]


class BackboneOptions(BaseModel):
    """The options every backbone understands (each uses those that apply to it)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(128, ge=1)
    max_len: int = Field(200, ge=1, description="longest history read at scoring time")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    num_blocks: int = Field(2, ge=1, description="Transformer blocks (sasrec, bert4rec)")
    num_heads: int = Field(1, ge=1, description="attention heads (sasrec, bert4rec)")
    gru_layers: int = Field(1, ge=1, description="GRU layers (gru4rec; as the plain GRU4Rec model's default)")
    mask_prob: float = Field(0.6, gt=0.0, le=1.0, description="cloze masking probability (bert4rec)")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and how it must be trained."""

    build: Callable[[BackboneOptions], SequenceBackbone]
    objective: Objective


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _sasrec(o: BackboneOptions) -> SequenceBackbone:
    backbone = SASRecEncoder(o.hidden_size, o.num_blocks, o.num_heads, o.max_len, o.dropout)
    xavier_init(backbone)
    return backbone


def _bert4rec(o: BackboneOptions) -> SequenceBackbone:
    return BERT4RecEncoder(o.hidden_size, o.num_blocks, o.num_heads, o.max_len + 1, o.dropout)  # + mask slot


def _gru4rec(o: BackboneOptions) -> SequenceBackbone:
    return GRU4RecEncoder(o.hidden_size, o.max_len, o.dropout, num_layers=o.gru_layers)


BACKBONES.register("sasrec")(BackboneSpec(_sasrec, "next_item"))
BACKBONES.register("bert4rec")(BackboneSpec(_bert4rec, "cloze"))
BACKBONES.register("gru4rec")(BackboneSpec(_gru4rec, "next_item"))


def build_backbone(name: str, options: BackboneOptions) -> SequenceBackbone:
    return BACKBONES.get(name).build(options)


def build_recommender(name: str, item_encoder: ItemEncoder, options: BackboneOptions) -> SequentialRecommender:
    """``item_encoder`` + the named backbone, wrapped in the recommender that trains it the right way."""
    spec = BACKBONES.get(name)
    backbone = spec.build(options)
    if item_encoder.dim != options.hidden_size:
        raise ValueError(f"item encoder gives {item_encoder.dim}-d vectors but the {name} backbone has "
                         f"hidden_size {options.hidden_size}")
    if spec.objective == "cloze":
        return MaskedItemRecommender(item_encoder, backbone, options.max_len, options.mask_prob)
    return SequentialRecommender(item_encoder, backbone, options.max_len)
