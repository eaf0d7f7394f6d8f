"""MI estimators against the analytic MI of correlated Gaussians, and per-layer MI of an encoder."""

import math

import pytest
import torch

from encoder_guard.encoders import Encoder, make_spec
from encoder_guard.mi import MINE, GaussianMI, InfoNCE, build_estimator, layer_mutual_information
from encoder_guard.mi.layers import mi_weights


def gaussian_pairs(d: int, rho: float, n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x ~ N(0, I_d), y = ρx + √(1−ρ²)ε: I(x; y) = −d/2 · log(1 − ρ²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y, -d / 2 * math.log(1 - rho**2)


@pytest.mark.parametrize("d, rho", [(1, 0.0), (2, 0.8), (4, 0.5)])
def test_gaussian_estimator_is_exact_up_to_sampling(d, rho):
    x, y, true = gaussian_pairs(d, rho)
    assert GaussianMI().estimate(x, y) == pytest.approx(true, abs=0.03)


# stated tolerances: 0.15 nats below or 0.1 above the truth with 3,000 pairs and 600 critic steps
@pytest.mark.parametrize("estimator", [MINE(steps=600, hidden=64), MINE(steps=600, hidden=64, ema=0.0),
                                       InfoNCE(steps=600, hidden=64)], ids=["mine-ema", "mine-plain", "infonce"])
@pytest.mark.parametrize("d, rho", [(2, 0.8), (4, 0.5)])
def test_neural_estimators_recover_analytic_mi(estimator, d, rho):
    x, y, true = gaussian_pairs(d, rho)
    value = estimator.estimate(x, y)
    assert true - 0.15 <= value <= true + 0.1


def test_neural_estimators_read_independence_as_zero_and_are_seeded():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 3, generator=g), torch.randn(2000, 3, generator=g)
    for est in (MINE(steps=300, hidden=32), InfoNCE(steps=300, hidden=32)):
        assert abs(est.estimate(x, y)) < 0.1  # held-out bounds scatter around 0 on independent data
        assert est.estimate(x, y) == est.estimate(x, y)


def test_estimators_refuse_unpaired_or_flat_samples():
    with pytest.raises(ValueError, match="pair row by row"):
        GaussianMI().estimate(torch.randn(50, 2), torch.randn(40, 2))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        MINE().estimate(torch.randn(50, 2, 2), torch.randn(50, 2))
    with pytest.raises(Exception, match="unknown MI estimator 'nope'"):
        build_estimator("nope")


def test_layer_mi_reports_every_tap_and_weights_have_mean_one():
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
    images = torch.rand(200, 1, 16, 16)
    rows = layer_mutual_information(enc, images, GaussianMI(ridge=1e-2), pool=1)
    assert [r.tap for r in rows] == ["layer1", "layer2", "layer3", "layer4"]
    assert [r.inputs for r in rows] == [16, 32, 64, 128]
    assert all(r.mi >= 0 for r in rows)
    # layer4 pooled to 1x1 is the final feature itself: the largest MI of all
    assert rows[-1].mi == max(r.mi for r in rows)
    w = mi_weights([r.mi for r in rows])
    assert sum(w) / len(w) == pytest.approx(1.0)
    assert mi_weights([0.0, 0.0]) == [1.0, 1.0] and mi_weights([1.0, 3.0], "uniform") == [1.0, 1.0]
    assert mi_weights([1.0, 3.0]) == [0.5, 1.5]
