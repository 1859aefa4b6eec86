"""Recommenders trained by the :class:`~prismrec.training.Trainer`, one model per module, all in :data:`MODELS`.

Two families, each a package, over a shared interface:

* :mod:`prismrec.models.backbones`: the ID-based sequence backbones (SASRec, BERT4Rec, GRU4Rec), their
  layers, and :data:`~prismrec.models.backbones.BACKBONES`, which builds any of them over any item vectors;
* :mod:`prismrec.models.enhancers`: the semantic enhancers that wrap a backbone (DMESR, the paper's
  method, and the baselines CPMM, QARM, X-REFLECT) with what they share (adapters, alignment loss,
  cross-attention, :class:`~prismrec.models.enhancers.base.EnhancerConfig`).

Here: the interface every model implements (:mod:`prismrec.models.base`: ``ItemEncoder`` ->
``SequenceBackbone`` -> ``Recommender``), the training losses (:mod:`prismrec.models.losses`), the
registry (:mod:`prismrec.models.registry`) and the most-popular floor (:mod:`prismrec.models.popularity`).
The LLM-as-recommender paradigms (MLLM-MSR, Speeder) do not use this interface: they are
:mod:`prismrec.llmrec`.
"""

from prismrec.models.backbones import BACKBONES, BackboneOptions, BackboneSpec, build_backbone, build_recommender
from prismrec.models.backbones.bert4rec import BERT4Rec
from prismrec.models.backbones.gru4rec import GRU4Rec
from prismrec.models.backbones.sasrec import SASRec
from prismrec.models.base import IdItemEmbedding, ItemEncoder, Recommender, SequenceBackbone, SequentialRecommender
from prismrec.models.enhancers.cpmm import CPMM
from prismrec.models.enhancers.dmesr import DMESR
from prismrec.models.enhancers.qarm import QARM
from prismrec.models.enhancers.xreflect import XREFLECT
from prismrec.models.popularity import Popularity
from prismrec.models.registry import MODELS

__all__ = [
    "BACKBONES",
    "CPMM",
    "DMESR",
    "MODELS",
    "QARM",
    "XREFLECT",
    "BERT4Rec",
    "BackboneOptions",
    "BackboneSpec",
    "GRU4Rec",
    "IdItemEmbedding",
    "ItemEncoder",
    "Popularity",
    "Recommender",
    "SASRec",
    "SequenceBackbone",
    "SequentialRecommender",
    "build_backbone",
    "build_recommender",
]
