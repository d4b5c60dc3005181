"""Model zoo: TSHSR, SGRAF (SGR, SAF, ensemble), SHAN and HJE behind one interface.

>>> from thsrn_lib import models
>>> models.available()          # doctest: +SKIP
['hje', 'saf', 'sgr', 'sgraf', 'shan', 'tshsr']
>>> m = models.create("tshsr", vocab_size=100, img_dim=64, embed_size=32, sim_dim=16)  # doctest: +SKIP
"""
from .base import Embeddings, Explanation, MatchingModel, ModelConfig, concat, embeddings_to, select
from .ensemble import Ensemble
from .registry import available, build_config, create, from_config, get_model_class, register_model

__all__ = [
    "MatchingModel",
    "ModelConfig",
    "Explanation",
    "Embeddings",
    "Ensemble",
    "available",
    "create",
    "build_config",
    "from_config",
    "get_model_class",
    "register_model",
    "select",
    "concat",
    "embeddings_to",
]
