"""Each loss against an independent reference (smp, torchvision) where the definitions coincide."""
import pytest
import segmentation_models_pytorch as smp
import torch
from torchvision.ops import sigmoid_focal_loss

from config import get_cfg_defaults
from utils.losses import LOSSES, build_loss, focal_loss, lovasz_hinge, soft_dice_loss, symmetric_lovasz


def _batch(seed, n=3, size=16, empty=(1,)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, size, size, generator=g) * 3
    target = (torch.rand(n, 1, size, size, generator=g) < 0.3).float()
    for i in empty:
        if i < n:
            target[i] = 0  # empty masks included
    return logits, target


@pytest.mark.parametrize("seed", range(5))
def test_lovasz_matches_smp_per_image(seed):
    logits, target = _batch(seed)
    reference = smp.losses.LovaszLoss("binary", per_image=True, from_logits=True)(logits, target)
    assert torch.allclose(lovasz_hinge(logits, target), reference, atol=1e-5)
    # the symmetric form is the mean of the foreground and background hinges
    back = smp.losses.LovaszLoss("binary", per_image=True, from_logits=True)(-logits, 1 - target)
    assert torch.allclose(symmetric_lovasz(logits, target), 0.5 * (reference + back), atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 2.0), (0.5, 0.0), (0.8, 1.5)])
def test_focal_matches_torchvision(seed, alpha, gamma):
    logits, target = _batch(seed)
    reference = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="mean")
    assert torch.allclose(focal_loss(logits, target, alpha, gamma), reference, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_soft_dice_matches_smp(seed):
    logits, target = _batch(seed, empty=())  # smp zeroes the loss of an absent class
    for smooth in (0.0, 1.0):
        reference = smp.losses.DiceLoss("binary", from_logits=True, smooth=smooth)(logits, target)
        # smp 0.6 computes Dice as Tversky(0.5, 0.5), whose smoothing counts twice
        assert torch.allclose(soft_dice_loss(logits, target, smooth=2 * smooth), reference, atol=1e-5)


def test_dice_uses_the_target_as_is():
    # perfect prediction -> 0; the original's sigmoid(target) would make this > 0
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 50
    assert soft_dice_loss(logits, target, smooth=0.0) < 1e-6
    assert soft_dice_loss(logits, target, smooth=1.0) < 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_loss_any_batch_empty_masks_low_precision(name, dtype):
    cfg = get_cfg_defaults()
    cfg.SOLVER.LOSS_FUNCTION_NAME = name
    loss_fn = build_loss(cfg)
    for n in (1, 4):
        logits, target = _batch(n, n=n, empty=range(n))  # all empty
        logits = logits.to(dtype).requires_grad_()
        loss = loss_fn(logits, target[:, 0])  # (N, H, W) targets too
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(logits.grad.float()).all()
    # the combinations are the sums of their parts
    logits, target = _batch(7)
    parts = {"symmetric_lovasz": symmetric_lovasz(logits, target),
             "dice": soft_dice_loss(logits, target), "focal": focal_loss(logits, target)}
    expected = {
        "sym_lovasz_dice": parts["symmetric_lovasz"] + parts["dice"],
        "loss_sym_lovasz_focal_corrected": parts["symmetric_lovasz"] + parts["focal"],
        "sym_lovasz_focal_dice": parts["symmetric_lovasz"] + parts["focal"] + parts["dice"],
    }.get(name)
    if expected is not None:
        assert torch.allclose(loss_fn(logits, target), expected, atol=1e-6)


def test_unknown_loss_lists_the_valid_ones():
    cfg = get_cfg_defaults()
    cfg.SOLVER.LOSS_FUNCTION_NAME = "lovasz"
    with pytest.raises(ValueError, match="valid: .*symmetric_lovasz"):
        build_loss(cfg)


def test_deep_supervision_is_the_weighted_mean_of_each_output_against_its_block_averaged_mask():
    from utils.losses import DEEP_SUPERVISION_WEIGHTS, DeepSupervision

    cfg = get_cfg_defaults()
    cfg.SOLVER.LOSS_FUNCTION_NAME = "bce_dice"
    plain = build_loss(cfg)
    cfg.MODEL.DEEP_SUPERVISION = True
    wrapped = build_loss(cfg)
    assert isinstance(wrapped, DeepSupervision)
    g = torch.Generator().manual_seed(3)
    target = (torch.rand(2, 1, 32, 32, generator=g) < 0.3).float()
    logits = torch.randn(2, 1, 32, 32, generator=g)
    heads = [torch.randn(2, 1, 32 // s, 32 // s, generator=g) for s in (4, 8, 16)]  # UneXt's strides 4, 8, 16
    # the reference: each head's target is the mean of the full mask over its s x s blocks (by reshape)
    expected = plain(logits, target)
    for weight, head, s in zip(DEEP_SUPERVISION_WEIGHTS, heads, (4, 8, 16)):
        blocks = target.reshape(2, 1, 32 // s, s, 32 // s, s).mean(dim=(3, 5))
        expected = expected + weight * (torch.nn.functional.binary_cross_entropy_with_logits(head, blocks)
                                        + soft_dice_loss(head, blocks, smooth=cfg.SOLVER.DICE_SMOOTH))
    expected = expected / (1 + sum(DEEP_SUPERVISION_WEIGHTS))
    assert torch.allclose(wrapped((logits, heads), target), expected, atol=1e-6)
    assert torch.allclose(wrapped((logits, heads), target[:, 0]), expected, atol=1e-6)  # (N, H, W) masks too
    # a plain tensor (the model in eval mode: validation) is scored by the loss alone
    assert torch.equal(wrapped(logits, target), plain(logits, target))
