"""Pretraining: ``pretrain(PretrainConfig)`` sets a run up (``pretrain.py``), ``loop.run`` drives it and
``Trainer.step`` is one update (``trainer.py``)."""
