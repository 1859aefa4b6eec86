"""Recommenders: one model per module, all registered in ``MODELS``; backbones by name in ``BACKBONES``."""

from prismrec.models import bert4rec as _bert4rec  # noqa: F401  (registers "bert4rec")
from prismrec.models import cpmm as _cpmm  # noqa: F401  (registers "cpmm")
from prismrec.models import dmesr as _dmesr  # noqa: F401  (registers "dmesr")
from prismrec.models import gru4rec as _gru4rec  # noqa: F401  (registers "gru4rec")
from prismrec.models import popularity as _popularity  # noqa: F401  (registers "popularity")
from prismrec.models import qarm as _qarm  # noqa: F401  (registers "qarm")
from prismrec.models import sasrec as _sasrec  # noqa: F401  (registers "sasrec")
from prismrec.models import xreflect as _xreflect  # noqa: F401  (registers "xreflect")
from prismrec.models.backbones import BACKBONES, BackboneOptions, BackboneSpec, build_backbone, build_recommender
from prismrec.models.base import IdItemEmbedding, ItemEncoder, Recommender, SequenceBackbone, SequentialRecommender
from prismrec.models.registry import MODELS

__all__ = [
    "BACKBONES",
    "MODELS",
    "BackboneOptions",
    "BackboneSpec",
    "IdItemEmbedding",
    "ItemEncoder",
    "Recommender",
    "SequenceBackbone",
    "SequentialRecommender",
    "build_backbone",
    "build_recommender",
]
