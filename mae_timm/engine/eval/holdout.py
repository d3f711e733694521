"""Choices made on a hold-out carved from the training split, then one evaluation on the test split.

A split is decoded once into memory (:class:`Images`: uint8 (N, C, H, W) + labels). The hold-out is a fixed draw of
the training images; the rest (the "bank") is the kNN memory bank, the probe's training set and the fine-tune's
training set while choices are made. Frozen features come from one pass of the encoder (:func:`block_features`):
every candidate pooling, with and without the final norm, for the last ``max(blocks)`` blocks. The test split is an
:class:`SealedSplit`: reading it before :meth:`SealedSplit.unseal` raises.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

import mae_timm
from mae_timm.data import create_loader
from mae_timm.engine.eval.common import normalizer, predict, progress
from mae_timm.engine.eval.finetune import FinetuneConfig, create_classifier, finetune_evaluate
from mae_timm.engine.eval.knn import KnnConfig, knn_on_features, standardized
from mae_timm.engine.eval.linprobe import LinprobeConfig, linprobe_on_features

__all__ = ["Images", "MemoryLoader", "SealedSplit", "block_features", "choose_knn", "choose_linprobe",
           "finetune_on_holdout", "load_split", "select_features"]


@dataclass
class Images:
    """A decoded split: images uint8 (N, C, H, W), labels (N,), the number of classes."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def subset(self, index: torch.Tensor) -> Images:
        return Images(self.images[index], self.labels[index], self.num_classes)

    def __len__(self) -> int:
        return len(self.labels)


def load_split(data: str, split: str, img_size: int, in_chans: int, num_workers: int) -> Images:
    """Decode a labelled split of a shard directory into memory (the whole image resized to ``img_size``), in an
    order set by the images and labels alone: the loader's order depends on its number of workers (they take turns
    by batch) and on the sharding, and the hold-out is a draw over positions in this order."""
    loader = create_loader(data, split, 512, train=False, img_size=img_size, in_chans=in_chans,
                           num_workers=num_workers, crop_pct=1.0)
    batches = list(progress(loader, f"decoding {split}"))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    if (labels < 0).any():
        raise mae_timm.utils.UserError(f"the {split} split of {data} holds unlabelled samples; compare needs labels")
    digests = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16, salt=int(label).to_bytes(8, "little")).digest()
               for image, label in zip(images, labels)]
    order = torch.tensor(sorted(range(len(digests)), key=digests.__getitem__), dtype=torch.long)
    return Images(images[order], labels[order], loader.num_classes or int(labels.max()) + 1)


class SealedSplit:
    """The test split: :meth:`read` raises until :meth:`unseal` (every choice is fixed), then decodes it once."""

    def __init__(self, read: Callable[[], Images]):
        self._read, self._images, self.sealed = read, None, True

    def unseal(self) -> None:
        self.sealed = False

    def read(self) -> Images:
        if self.sealed:
            raise RuntimeError("the test split was asked for before every choice was fixed on the hold-out")
        if self._images is None:
            self._images = self._read()
        return self._images


class MemoryLoader:
    """Batches (uint8 images, labels) of an :class:`Images`: shuffled per epoch (seeded) and full for training."""

    def __init__(self, split: Images, batch_size: int, *, train: bool, seed: int = 0):
        self.split, self.batch_size, self.train, self.seed, self.epoch = split, batch_size, train, seed, 0
        self.num_classes = split.num_classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return max(n // self.batch_size, 1) if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.split.images[index], self.split.labels[index]


# a feature variant: (pooling, final norm); raw pixels are ("pixels", False)
Variant = tuple[str, bool]


@torch.no_grad()
def block_features(model: nn.Module | None, split: Images, variants: list[Variant], blocks: int, norm: nn.Module,
                   device: torch.device, batch_size: int = 256) -> dict[Variant, torch.Tensor]:
    """One pass: per variant, features (N, blocks, D) of the last ``blocks`` blocks (raw pixels: (N, 1, C*H*W)).
    Poolings: ``avg`` (mean of the patch tokens), ``token`` (the class token), ``flat`` (the patch tokens one after
    another in grid order, D = patches x width: the spatial layout kept, as raw pixels keep it)."""
    loader = MemoryLoader(split, batch_size, train=False)
    if model is None:
        pixels, _ = predict(lambda x: x.flatten(1), loader, norm, device)
        return {("pixels", False): pixels[:, None]}
    encoder = mae_timm.create_timm_encoder(model, fc_norm=False).eval().to(device)
    widths = [encoder.embed_dim * (encoder.patch_embed.num_patches if pool == "flat" else 1) for pool, _ in variants]

    def pooled(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, sum over variants of blocks * width)
        outs = encoder.forward_intermediates(x, indices=blocks, norm=False, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        per_variant = []
        for pool, final_norm in variants:
            vectors = []
            for out in outs:  # (patch tokens (N, L, D), prefix tokens (N, P, D)) or patch tokens alone
                patches, prefix = out if isinstance(out, tuple) else (out, None)
                tokens = torch.cat([prefix, patches], 1) if prefix is not None else patches
                tokens = encoder.norm(tokens) if final_norm else tokens
                start = 0 if prefix is None else prefix.shape[1]
                vectors.append(tokens[:, 0] if pool == "token" else
                               tokens[:, start:].flatten(1) if pool == "flat" else tokens[:, start:].mean(1))
            per_variant.append(torch.cat(vectors, 1))  # (N, blocks * width)
        return torch.cat(per_variant, 1)

    flat, _ = predict(pooled, progress(loader, "features"), norm, device)
    parts = flat.split([blocks * width for width in widths], dim=1)
    return {variant: part.view(len(split), blocks, width) for variant, part, width in zip(variants, parts, widths)}


def select_features(features: dict[Variant, torch.Tensor], variant: Variant, blocks: int) -> torch.Tensor:
    """The last ``blocks`` blocks of a variant, concatenated: (N, blocks * D)."""
    return features[tuple(variant)][:, -blocks:].flatten(1)


def choose_knn(features: dict, labels: torch.Tensor, bank: torch.Tensor, holdout: torch.Tensor, num_classes: int,
               blocks: list[int], ks: list[int], device) -> tuple[dict, list[dict]]:
    """Every (variant, blocks, standardise) x k on the hold-out -> (the best choice, every row measured)."""
    rows = []
    for variant, x in features.items():
        for b in [b for b in blocks if b <= x.shape[1]] or [1]:
            fx = x[:, -b:].flatten(1)
            for standardize in (False, True):
                cfg = KnnConfig(k=ks[0], report_k=tuple(ks), standardize=standardize)
                result = knn_on_features(fx[bank], labels[bank], fx[holdout], labels[holdout], num_classes, cfg,
                                         device)
                for k, top1 in result["top1_by_k"].items():
                    rows.append(dict(variant=list(variant), blocks=b, standardize=standardize, k=int(k), top1=top1))
    return max(rows, key=lambda r: r["top1"]), rows


def choose_linprobe(features: dict, labels: torch.Tensor, bank: torch.Tensor, holdout: torch.Tensor,
                    num_classes: int, blocks: list[int], blrs: list[float], epochs: list[int], seed: int,
                    device) -> tuple[dict, list[dict]]:
    """Features chosen at the first lr and epochs, then (lr, epochs) on those features -> (best, rows)."""
    rows = []

    def probe(x, blr, n_epochs):
        cfg = LinprobeConfig(epochs=n_epochs, blr=blr, warmup_epochs=min(3, n_epochs - 1), seed=seed)
        return linprobe_on_features(x[bank], labels[bank], x[holdout], labels[holdout], num_classes, cfg,
                                    device)["top1"]

    for variant, x in features.items():
        for b in [b for b in blocks if b <= x.shape[1]] or [1]:
            top1 = probe(x[:, -b:].flatten(1), blrs[0], epochs[0])
            rows.append(dict(variant=list(variant), blocks=b, blr=blrs[0], epochs=epochs[0], top1=top1))
    best = max(rows, key=lambda r: r["top1"])
    x = select_features(features, tuple(best["variant"]), best["blocks"])
    for blr in blrs:
        for n_epochs in epochs:
            if (blr, n_epochs) != (blrs[0], epochs[0]):
                rows.append(dict(best, blr=blr, epochs=n_epochs, top1=probe(x, blr, n_epochs)))
    return max(rows, key=lambda r: r["top1"]), rows


def finetune_on_holdout(model: nn.Module, train: Images, holdout: Images, cfg: FinetuneConfig,
                        device) -> tuple[dict, dict]:
    """Fine-tune on ``train``, measure the hold-out after every epoch -> (record of the best epoch, its state)."""
    best: dict = dict(top1=-1.0)
    state: dict = {}

    def keep(classifier: nn.Module, record: dict) -> None:
        if record["top1"] > best["top1"]:
            best.clear()
            best.update(record)
            state.update(copy.deepcopy({k: v.cpu() for k, v in classifier.state_dict().items()}))

    loader = MemoryLoader(train, cfg.batch_size, train=True, seed=cfg.seed)
    result = finetune_evaluate(model, loader, MemoryLoader(holdout, 256, train=False), train.num_classes, cfg,
                               device, log=lambda record: None, on_epoch=keep)
    history = [dict(epoch=h["epoch"], top1=h["top1"]) for h in result["history"]]
    return dict(epoch=best["epoch"], top1=best["top1"], history=history, updates=result["updates"]), state


@torch.no_grad()
def finetuned_top1(model: nn.Module, state: dict, cfg: FinetuneConfig, test: Images, device) -> float:
    """Top-1 of the kept fine-tuned state on ``test``."""
    from mae_timm.engine.eval.common import topk_accuracy

    classifier = create_classifier(model, test.num_classes, cfg, 0.0)
    classifier.load_state_dict(state)
    scores, labels = predict(classifier.eval().to(device), MemoryLoader(test, 256, train=False),
                             normalizer(model, device), device)
    return topk_accuracy(scores, labels, ks=(1,))["top1"]


def knn_test(bank_x, bank_y, test_x, test_y, num_classes, choice: dict, device) -> float:
    cfg = KnnConfig(k=choice["k"], report_k=(choice["k"],), standardize=choice["standardize"])
    return knn_on_features(bank_x, bank_y, test_x, test_y, num_classes, cfg, device)["top1"]


def linprobe_test(bank_x, bank_y, test_x, test_y, num_classes, choice: dict, seed: int, device) -> float:
    cfg = LinprobeConfig(epochs=choice["epochs"], blr=choice["blr"], warmup_epochs=min(3, choice["epochs"] - 1),
                         seed=seed)
    return linprobe_on_features(bank_x, bank_y, test_x, test_y, num_classes, cfg, device)["top1"]


__all__ += ["finetuned_top1", "knn_test", "linprobe_test", "standardized"]
