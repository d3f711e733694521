"""The engine: settings (``config``), checkpoints (``checkpoint``), the pretraining loop (``pretrain``),
evaluation (``evaluate``) and process-group helpers (``distributed``).

``from mae_timm.engine.pretrain import pretrain`` runs pretraining; the function is not re-exported here, where
it would hide its module of the same name.
"""

from mae_timm.engine.checkpoint import find_latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from mae_timm.engine.config import PretrainConfig, load_config

__all__ = [
    "PretrainConfig",
    "find_latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_model",
    "save_checkpoint",
]
