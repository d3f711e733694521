"""The engine: pretraining (``engine.train``), evaluation (``engine.eval``), checkpoints and export.

- ``engine.train``: the settings of a run (``config``), the update (``trainer.Trainer.step``), the run loop
  (``loop``), the setup that reads top to bottom (``pretrain``), and what a run writes and resumes from;
- ``engine.eval``: one evaluation layer (``splits``, ``features``: the one extractor, ``optim``, the protocols
  ``knn`` / ``linprobe`` / ``finetune``), the CLI's entry points (``evaluate``) and ``compare`` on top of it;
- ``checkpoint``: atomic checkpoints and rebuilding a model from one; ``export``: timm / HF folders;
  ``flops``: the one FLOP counter of the benchmarks and compare.

Plumbing (user errors, devices, seeds, atomic files, the settings system) is on the ground floor, ``mae_timm.utils``.
"""

from mae_timm.engine.checkpoint import find_latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from mae_timm.engine.train.config import PretrainConfig

__all__ = ["PretrainConfig", "find_latest_checkpoint", "load_checkpoint", "load_model", "save_checkpoint"]
