"""Evaluation of a pretrained encoder: splits, one feature extractor, the protocols (kNN, linear probe, fine-tune)
and their optimisation helpers, shared by ``mae-timm knn / linprobe / finetune`` (``evaluate``) and by ``compare``."""
