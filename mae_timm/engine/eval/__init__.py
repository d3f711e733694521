"""Evaluation of a pretrained encoder: kNN, linear probe and fine-tuning beside the raw-pixel and scratch
baselines; ``evaluate.py`` holds the entry points."""
