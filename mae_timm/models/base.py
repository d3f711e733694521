"""The pretext-model contract: what every model that `mae-timm pretrain` trains provides.

The engine, the figures, the converters and the benchmarks know a model only through this module: they call
``forward`` and read the named output, read the capability flags, and take the encoder through
``encoder_kwargs`` / ``encoder_state_dict``. Nothing else is probed (no ``hasattr``, no signature inspection).

A pretext model is an ``nn.Module`` (usually a timm ``VisionTransformer`` subclass) that also subclasses
:class:`PretextModel` and
  * sets the class flags ``predicts_pixels`` and ``takes_mask_ratio`` (the callers branch on these, never on
    attributes or signatures);
  * implements ``forward`` returning a :class:`ReconstructionOutput` (pixel models) or a :class:`PuzzleOutput`
    (position models), or another ``NamedTuple`` with ``loss`` first and a ``metrics`` property;
    ``model(imgs, mask_ratio=r, noise=noise)`` when ``takes_mask_ratio``, else ``model(imgs)``;
  * has ``patch_embed`` (``img_size``, ``patch_size``, ``grid_size``, ``num_patches``: the token grid; ``noise``
    is (N, ``num_patches``)) and ``forward_features(imgs)``: the encoder's tokens of the whole image;
  * implements ``encoder_kwargs()`` and ``encoder_state_dict()``: the timm ``VisionTransformer`` that holds the
    encoder, and its weights (they load ``strict=True`` into it, and its ``forward_features`` equals the model's);
  * has timm's ``pretrained_cfg`` with the ``mean`` / ``std`` its inputs are normalised with.
What the engine reads besides: :meth:`PretextModel.input_size` and :meth:`PretextModel.input_channels` (the images
its loaders produce), both derived from ``encoder_kwargs()``. The engine admits any model that honours this
contract (:func:`is_pretext_model`), wherever it is defined.
Pixel models (``predicts_pixels = True``) also hold ``norm_pix_loss``, the one switch of the loss target, and
``predicts_visible_patches``: whether ``pred`` holds the visible patches too in evaluation mode (False for a
cross-attention decoder, which predicts removed patches only; its ``pred`` is 0 there).
``tests/models/test_models_registry.py`` checks every model a ``mae_timm`` module registers against this contract.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

__all__ = ["PretextModel", "PretextOutput", "PuzzleOutput", "ReconstructionOutput", "is_pretext_model"]


class ReconstructionOutput(NamedTuple):
    """What a pixel model returns; unpacks as the official ``loss, pred, mask = model(imgs, mask_ratio=0.75)``."""

    loss: torch.Tensor  # () mean loss over the predicted removed patches (or all patches, when the model says so)
    # (N, L, p*p*C) predicted pixels (normalised per patch under norm-pix loss); 0 at patches the decoder does not
    # predict (a sampled decoder's unsampled patches in training, a cross decoder's visible ones)
    pred: torch.Tensor
    mask: torch.Tensor  # (N, L) 1 = removed, 0 = kept

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Scalars worth logging beside the loss (none for pixel reconstruction)."""
        return {}


class PuzzleOutput(NamedTuple):
    """What a position-prediction model (APL) returns: ``loss, logits, targets = model(imgs)``."""

    loss: torch.Tensor  # () cross-entropy of the predicted positions
    logits: torch.Tensor  # (N, T', T) position logits of every kept token
    targets: torch.Tensor  # (N, T') true positions of the kept tokens

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Top-1 position accuracy (fraction of tokens whose predicted position is the true one; chance is 1 / T),
        a () tensor: read it with one-update lag, so that no host sync happens inside an update."""
        return {"position_accuracy": (self.logits.detach().argmax(-1) == self.targets).float().mean()}


PretextOutput = ReconstructionOutput | PuzzleOutput


class PretextModel:
    """Mixin that marks a model as a pretext model and states its capabilities (see the module docstring)."""

    predicts_pixels: ClassVar[bool] = False  # forward returns a ReconstructionOutput; the model has `norm_pix_loss`
    takes_mask_ratio: ClassVar[bool] = False  # forward takes `mask_ratio` and `noise` (the official ranking)

    def encoder_architecture(self) -> str:
        """The registered timm model name that, with ``encoder_kwargs()``, builds the encoder in timm."""
        raise NotImplementedError

    def encoder_kwargs(self) -> dict:
        """JSON-able kwargs that turn ``timm.create_model(encoder_architecture(), ...)`` into the encoder
        (``num_classes=0``)."""
        raise NotImplementedError

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ``VisionTransformer`` names; load ``strict=True`` into it."""
        raise NotImplementedError

    def input_size(self) -> int:
        """The side in pixels of the (square) images the encoder takes: ``encoder_kwargs()['img_size']``."""
        size = self.encoder_kwargs()["img_size"]
        return size if isinstance(size, int) else size[0]

    def input_channels(self) -> int:
        """The channels of the images the encoder takes: 3, or 1 for grayscale (``encoder_kwargs()['in_chans']``)."""
        return self.encoder_kwargs().get("in_chans", 3)  # timm's VisionTransformer default


def is_pretext_model(model: object) -> bool:
    """True for models built on the contract (what ``mae-timm pretrain`` accepts)."""
    return isinstance(model, PretextModel)
