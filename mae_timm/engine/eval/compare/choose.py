"""Every choice of a compare on the hold-out (features, kNN k and standardisation, probe lr and epochs, the
fine-tune's epoch), then one measurement of each choice on the test split. The protocols are the package's own
(:mod:`~mae_timm.engine.eval.knn`, :mod:`~mae_timm.engine.eval.linprobe`, :mod:`~mae_timm.engine.eval.finetune`)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import mae_timm
from mae_timm.engine.eval.features import PIXELS, Variant, normalizer, predict, select_blocks
from mae_timm.engine.eval.finetune import FinetuneConfig, create_classifier, finetune_evaluate
from mae_timm.engine.eval.knn import KnnConfig, knn_on_features
from mae_timm.engine.eval.linprobe import LinprobeConfig, linprobe_on_features
from mae_timm.engine.eval.optim import fit_warmup, topk_accuracy
from mae_timm.engine.eval.splits import Images, MemoryLoader

__all__ = ["choose_knn", "choose_linprobe", "finetune_on_holdout", "finetuned_top1", "knn_test", "linprobe_test",
           "variants"]


def variants(pools: list[str], model: nn.Module | None) -> list[Variant]:
    """The feature candidates: each pooling after the final norm; the patch-token poolings (and always ``avg``)
    also before it (the class token is read after it). ``token`` only where the encoder has a class token."""
    if model is None:
        return [PIXELS]
    has_token = mae_timm.create_timm_encoder(model).has_class_token
    pools = [p for p in pools if p != "token" or has_token]
    before_norm = [pool for pool in dict.fromkeys(["avg", *pools]) if pool != "token"]
    return [(pool, True) for pool in pools] + [(pool, False) for pool in before_norm]


def _block_counts(blocks: list[int], x: torch.Tensor) -> list[int]:
    return [b for b in blocks if b <= x.shape[1]] or [1]


def choose_knn(features: dict, labels: torch.Tensor, bank: torch.Tensor, holdout: torch.Tensor, num_classes: int,
               blocks: list[int], ks: list[int], device) -> tuple[dict, list[dict]]:
    """Every (variant, blocks, standardise) x k on the hold-out -> (the best choice, every row measured)."""
    rows = []
    for variant, x in features.items():
        for b in _block_counts(blocks, x):
            fx = select_blocks(x, b)
            for standardize in (False, True):
                cfg = KnnConfig(k=ks[0], report_k=tuple(ks), standardize=standardize)
                result = knn_on_features(fx[bank], labels[bank], fx[holdout], labels[holdout], num_classes, cfg,
                                         device)
                for k, top1 in result["top1_by_k"].items():
                    rows.append(dict(variant=list(variant), blocks=b, standardize=standardize, k=int(k), top1=top1))
    return max(rows, key=lambda r: r["top1"]), rows


def _probe_config(blr: float, epochs: int, seed: int) -> LinprobeConfig:
    return LinprobeConfig(epochs=epochs, blr=blr, warmup_epochs=fit_warmup(3, epochs), seed=seed)


def choose_linprobe(features: dict, labels: torch.Tensor, bank: torch.Tensor, holdout: torch.Tensor,
                    num_classes: int, blocks: list[int], blrs: list[float], epochs: list[int], seed: int,
                    device) -> tuple[dict, list[dict]]:
    """Features chosen at the first lr and epochs, then (lr, epochs) on those features -> (best, rows)."""
    rows = []

    def probe(x, blr, n_epochs):
        return linprobe_on_features(x[bank], labels[bank], x[holdout], labels[holdout], num_classes,
                                    _probe_config(blr, n_epochs, seed), device)["top1"]

    for variant, x in features.items():
        for b in _block_counts(blocks, x):
            top1 = probe(select_blocks(x, b), blrs[0], epochs[0])
            rows.append(dict(variant=list(variant), blocks=b, blr=blrs[0], epochs=epochs[0], top1=top1))
    best = max(rows, key=lambda r: r["top1"])
    x = select_blocks(features[tuple(best["variant"])], best["blocks"])
    for blr in blrs:
        for n_epochs in epochs:
            if (blr, n_epochs) != (blrs[0], epochs[0]):
                rows.append(dict(best, blr=blr, epochs=n_epochs, top1=probe(x, blr, n_epochs)))
    return max(rows, key=lambda r: r["top1"]), rows


def finetune_config(epochs: int, batch_size: int, seed: int, tune_last_blocks: int | None) -> FinetuneConfig:
    """The fine-tune of a compare: the package's recipe (scaled to the run's updates), five warmup epochs at most."""
    return FinetuneConfig(epochs=epochs, batch_size=batch_size, warmup_epochs=fit_warmup(5, epochs), seed=seed,
                          tune_last_blocks=tune_last_blocks)


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
    classifier = create_classifier(model, test.num_classes, cfg, 0.0)
    classifier.load_state_dict(state)
    scores, labels = predict(classifier.eval().to(device), MemoryLoader(test, 256, train=False),
                             normalizer(model, device), device)
    return topk_accuracy(scores, labels, ks=(1,))["top1"]


def knn_test(bank_x, bank_y, test_x, test_y, num_classes, choice: dict, device) -> float:
    """Test top-1 of the kNN choice made on the hold-out."""
    cfg = KnnConfig(k=choice["k"], report_k=(choice["k"],), standardize=choice["standardize"])
    return knn_on_features(bank_x, bank_y, test_x, test_y, num_classes, cfg, device)["top1"]


def linprobe_test(bank_x, bank_y, test_x, test_y, num_classes, choice: dict, seed: int, device) -> float:
    """Test top-1 of the linear-probe choice made on the hold-out."""
    return linprobe_on_features(bank_x, bank_y, test_x, test_y, num_classes,
                                _probe_config(choice["blr"], choice["epochs"], seed), device)["top1"]
