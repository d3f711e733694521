"""The MAE decoder options: ``decoder`` ("self" / "cross") and ``predict_ratio`` (a sampled share of the removed
patches), on tiny models: what is predicted, the loss over it, the official decoder unchanged, export and figures."""

import pytest
import timm
import torch

import mae_timm
from mae_timm.layers import num_kept, patchify, predicted_ids, random_masking_ids
from mae_timm.models.convert import mae_timm_to_hf
from mae_timm.models.factory import create_pretext_model
from mae_timm.viz import reconstruct

MASK_RATIO = 0.75
LENGTH = 16  # mae_vit_test: 32 px in 8-px patches
LEN_KEEP = num_kept(LENGTH, MASK_RATIO)  # 4 kept, 12 removed


def build(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mae_vit_test", **kwargs)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, LENGTH, generator=g)


def hand_loss(imgs, pred, ids_pred, norm_pix):
    """The MSE over the predicted patches, one patch at a time."""
    target = patchify(imgs, 8)
    total, count = 0.0, 0
    for row in range(imgs.shape[0]):
        for patch in ids_pred[row].tolist():
            t = target[row, patch]
            if norm_pix:
                t = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
            total += ((pred[row, patch] - t) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("decoder", ["self", "cross"])
@pytest.mark.parametrize("predict_ratio", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_only_the_sampled_removed_patches_are_predicted_and_scored(decoder, predict_ratio, norm_pix):
    model = build(decoder=decoder, predict_ratio=predict_ratio, norm_pix_loss=norm_pix)
    imgs, noise = batch()
    loss, pred, mask = model(imgs, mask_ratio=MASK_RATIO, noise=noise)
    ids_pred = predicted_ids(random_masking_ids(3, LENGTH, MASK_RATIO, noise=noise)[2], LEN_KEEP, predict_ratio)
    predicted = torch.zeros_like(mask).scatter(1, ids_pred, 1.0)
    nonzero = (pred != 0).any(-1).float()
    if decoder == "self" and predict_ratio == 1.0:  # the official decoder: every patch, loss over removed ones
        assert torch.equal(nonzero, torch.ones_like(mask))
        ids_pred = torch.argsort(ids_restore_of(noise), dim=1)[:, LEN_KEEP:]
    else:
        assert torch.equal(nonzero, predicted)  # the sampled removed patches, and nothing else
        assert torch.all(mask[predicted.bool()] == 1)
        assert ids_pred.shape[1] == round(12 * predict_ratio)
    assert loss.item() == pytest.approx(hand_loss(imgs, pred, ids_pred, norm_pix), rel=1e-5)


def ids_restore_of(noise):
    return random_masking_ids(noise.shape[0], LENGTH, MASK_RATIO, noise=noise)[2]


def test_predict_ratio_one_self_decoder_is_todays_mae():
    """Stated explicitly, the default decoder is the official path: same keys, same loss and pred, bit for bit."""
    official, explicit = build(), build(decoder="self", predict_ratio=1.0)
    explicit.load_state_dict(official.state_dict())
    assert list(official.state_dict()) == list(build(decoder="self", predict_ratio=0.25).state_dict())
    imgs, noise = batch()
    for a, b in zip(official(imgs, noise=noise), explicit(imgs, noise=noise)):
        assert torch.equal(a, b)


def test_sampled_self_decoder_agrees_with_the_official_decoder_on_removed_patches():
    """The subset path decoding every removed patch computes what the official path does (token order aside)."""
    model = build(predict_ratio=0.5).eval()
    imgs, noise = batch()
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, MASK_RATIO, noise)
        full = model.forward_decoder(latent, ids_restore)
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        ids_pred = ids_shuffle[:, LEN_KEEP:]
        subset = model.forward_subset_decoder(latent, ids_shuffle[:, :LEN_KEEP], ids_pred)
        torch.testing.assert_close(subset, torch.gather(full, 1, ids_pred[..., None].expand_as(subset)))
        # evaluation mode decodes everything through the official path: the default model's output exactly
        default = build()
        default.load_state_dict(model.state_dict())
        for a, b in zip(model(imgs, noise=noise), default.eval()(imgs, noise=noise)):
            assert torch.equal(a, b)


def test_cross_decoder_predictions_do_not_depend_on_the_other_queries():
    """A cross decoder's prediction of a patch is the same whether a share or all removed patches are decoded:
    evaluation mode (all) agrees with training mode (a third) on the sampled third."""
    model = timm.create_model("mae_vit_test_cross")
    imgs, noise = batch()
    with torch.no_grad():
        train = model.train()(imgs, noise=noise)
        evaluated = model.eval()(imgs, noise=noise)
    sampled = (train.pred != 0).any(-1)
    assert sampled.sum() == 3 * 4  # 1/3 of the 12 removed patches in each of 3 images
    assert torch.equal((evaluated.pred != 0).any(-1).float(), evaluated.mask)  # every removed patch, nothing else
    torch.testing.assert_close(train.pred[sampled], evaluated.pred[sampled])


def test_cross_decoder_grad_checkpointing_gives_the_same_gradients():
    imgs, noise = batch()
    grads = []
    for checkpointing in (False, True):
        model = timm.create_model("mae_vit_test_cross", decoder_depth=2)
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.1)
        model.set_grad_checkpointing(checkpointing)
        model(imgs, noise=noise).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decoder="conv"), "decoder must be one of"),
        (dict(predict_ratio=0.0), "predict_ratio must be in"),
        (dict(predict_ratio=1.5), "predict_ratio must be in"),
        (dict(decoder="cross", loss_on_all_patches=True), "loss_on_all_patches needs"),
        (dict(predict_ratio=0.5, loss_on_all_patches=True), "loss_on_all_patches needs"),
        (dict(decoder="cross", decoder_embed_dim=30, decoder_num_heads=4), "not divisible"),
    ],
)
def test_bad_decoder_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_create_pretext_model_takes_the_decoder_and_exports_a_plain_vit():
    model = create_pretext_model("mae", "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1),
                                 decoder="cross", predict_ratio=0.25, decoder_embed_dim=32, decoder_num_heads=2,
                                 decoder_depth=1)
    assert [type(b).__name__ for b in model.decoder_blocks] == ["CrossAttentionBlock"]
    vit = mae_timm.create_timm_encoder(model).eval()
    assert type(vit) is timm.models.vision_transformer.VisionTransformer
    assert not any(k.startswith(("decoder", "mask_token")) for k in mae_timm.export_encoder(model))
    imgs, noise = batch()
    assert torch.equal(vit.forward_features(imgs), model.eval().forward_features(imgs))
    with pytest.raises(ValueError, match="has no option"):
        create_pretext_model("early_mask", "vit_tiny_patch16_224", dict(img_size=32, patch_size=8), decoder="cross")


def test_hf_conversion_refuses_a_cross_decoder():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="self-attention decoder only"):
        mae_timm_to_hf(timm.create_model("mae_vit_test_cross"))


def test_figure_of_a_sampled_decoder_is_a_whole_reconstruction():
    """Figures decode every removed patch, whatever share training samples; a cross decoder's visible patches are
    marked as not predicted, and the model's mode is left as it was."""
    imgs, _ = batch()
    for name, predicts_visible in (("mae_vit_test_cross", False), ("mae_vit_test", True)):
        model = timm.create_model(name, predict_ratio=0.25)
        out = reconstruct(model, imgs)
        assert model.training
        assert torch.equal(out["predicted"], torch.ones_like(out["mask"]) if predicts_visible else out["mask"])
        removed = out["mask"].bool()
        reconstruction = patchify(out["reconstruction"], 8)
        assert (reconstruction[removed] != 0).any(-1).all()  # every removed patch is predicted
