import torch

from encoder_guard.augment import ViewConfig, augment
from encoder_guard.utils import step_generator


def test_views_are_deterministic_in_the_generator_and_stay_in_range():
    x = torch.rand(8, 3, 16, 16)
    cfg = ViewConfig(blur_p=0.5, solarize_p=0.2)
    a = augment(x, cfg, step_generator(0, 5))
    b = augment(x, cfg, step_generator(0, 5))
    c = augment(x, cfg, step_generator(0, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_full_crop_without_other_augmentations_is_identity():
    x = torch.rand(4, 1, 12, 12)
    cfg = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    assert torch.allclose(augment(x, cfg, step_generator(1)), x, atol=1e-5)


def test_flip_only_mirrors():
    x = torch.rand(4, 1, 12, 12)
    cfg = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=1.0, jitter_p=0.0, grayscale_p=0.0)
    assert torch.allclose(augment(x, cfg, step_generator(1)), x.flip(-1), atol=1e-5)


def test_grayscale_and_solarize_apply_when_forced():
    x = torch.rand(4, 3, 8, 8)
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0)
    g = augment(x, ViewConfig(**base, grayscale_p=1.0), step_generator(2))
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    s = augment(x, ViewConfig(**base, grayscale_p=0.0, solarize_p=1.0), step_generator(2))
    assert torch.allclose(s, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)
