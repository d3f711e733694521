"""The engine: settings (``config``), shared plumbing (``runtime``: user errors, devices, autocast, seeds, atomic
files, the warmup rule), checkpoints (``checkpoint``), the pretraining loop (``pretrain``) with its run folder
(``run_output``) and resume choice (``resume``), evaluation (``evaluate``), export (``export``) and process-group
helpers (``distributed``).

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
