"""TAC: the minimum-norm latent shift (against a primal QP solve), the target test, the defense and `detect`."""

import json

import numpy as np
import pytest
import torch
from scipy import optimize

from downstream.classifier import Classifier, Head, fit_classifier, save_classifier
from downstream.linear import fit_linear_probe
from encoder_guard.cli import main
from encoder_guard.data import make_synthetic, take_subset
from encoder_guard.defenses.base import DownstreamData
from encoder_guard.defenses.tac import TAC, class_constraints, detect, min_shift, shifts, smallest_outlier_test
from encoder_guard.encoders import save_encoder
from encoder_guard.errors import EncoderGuardError


def slsqp_min_shift(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Reference: the primal ``min ½‖s‖² s.t. A s ≥ r`` by SLSQP."""
    res = optimize.minimize(lambda s: 0.5 * s @ s, np.zeros(a.shape[1]), jac=lambda s: s, method="SLSQP",
                            constraints=[{"type": "ineq", "fun": lambda s: a @ s - r, "jac": lambda s: a}],
                            options={"ftol": 1e-14, "maxiter": 1000})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", range(4))
def test_min_shift_matches_a_primal_slsqp_solve(seed):
    rng = np.random.default_rng(seed)
    m, d = [(3, 5), (4, 8), (6, 6), (9, 20)][seed]
    a = rng.normal(size=(m, d))
    r = rng.normal(size=m)  # some constraints active, some slack
    r[0] = abs(r[0]) + 0.5  # at least one violated at s = 0
    s = min_shift(a, r)
    ref = slsqp_min_shift(a, r)
    assert np.all(a @ s >= r - 1e-6)
    np.testing.assert_allclose(s, ref, atol=1e-5)
    assert np.linalg.norm(s) <= np.linalg.norm(ref) + 1e-6


def test_min_shift_is_zero_when_nothing_needs_moving():
    a = np.random.default_rng(0).normal(size=(3, 4))
    assert np.array_equal(min_shift(a, np.array([-1.0, 0.0, -0.2])), np.zeros(4))


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_after_the_shift_every_feature_lands_in_the_class(margin):
    g = torch.Generator().manual_seed(1)
    C, D = 5, 8
    w, b = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    feats = torch.randn(60, D, generator=g) * 2
    s = shifts(feats, w, b, margin)
    assert s.shape == (C, D)
    for k in range(C):
        logits = (feats + s[k]) @ w.T + b
        others = torch.cat([logits[:, :k], logits[:, k + 1 :]], 1)
        gap = (logits[:, k:k + 1] - others).min()
        assert gap >= margin - 1e-4 and gap <= margin + 1e-3  # the hardest reference sits at the margin
        if margin > 0:
            assert (logits.argmax(1) == k).all(), k  # (at margin 0 it sits on the boundary: a float32 tie)
        a, r = class_constraints(feats, w, b, k, margin)
        assert a.shape == (C - 1, D) and r.shape == (C - 1,)


def test_smallest_outlier_test_flags_an_obvious_small_outlier_only():
    homogeneous = torch.tensor([1.0, 1.1, 0.95, 1.05, 0.98, 1.02, 0.97, 1.03, 1.01, 0.99])
    found = smallest_outlier_test(homogeneous)
    assert not found.flagged and found.candidate == 2 and 0 < found.p_value <= 1
    assert found.as_dict()["target"] is None and found.as_dict()["norms"] == pytest.approx(homogeneous.tolist())
    outlier = homogeneous.clone()
    outlier[6] = 0.1
    found = smallest_outlier_test(outlier)
    assert found.flagged and found.candidate == 6 and found.p_value < 1e-3
    assert found.as_dict()["target"] == 6 and found.as_dict()["flagged"] is True
    with pytest.raises(EncoderGuardError, match="at least 4 classes"):
        smallest_outlier_test(torch.tensor([1.0, 0.5, 1.1]))


def _linear_task(seed: int = 0, C: int = 8, D: int = 12, n: int = 400):
    """Non-negative (ReLU-like) clean features in which the last dimension is never used, and a fitted head."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(C, D - 1, generator=g) * 4
    y = torch.arange(n) % C
    f = torch.relu(centers[y] + 0.5 * torch.randn(n, D - 1, generator=g))
    f = torch.cat([f, torch.zeros(n, 1)], 1)
    return f, y, Head.from_probe(fit_linear_probe(f, y, C))


@pytest.mark.parametrize("backdoor", ["unused-dimension", "bias"])
def test_detect_flags_the_class_with_a_backdoored_weight(encoder, backdoor):
    f, _, head = _linear_task()
    clf = Classifier(encoder, head)
    clean, s = detect(clf, f)
    assert not clean.flagged and s.shape == (8, 12)
    with torch.no_grad():
        if backdoor == "unused-dimension":
            head.linear.weight[3, -1] += 20.0  # a trigger direction clean features never exercise
        else:
            head.linear.bias[3] += 1e3
    found, s = detect(clf, f)
    assert found.flagged and found.candidate == 3 and found.p_value < 1e-3
    assert found.norms[3] == pytest.approx(float(s[3].norm()), rel=1e-5) and found.norms[3] < min(
        n for k, n in enumerate(found.norms) if k != 3)


@pytest.fixture(scope="module")
def downstream(encoder):
    train = make_synthetic(size=256, image_size=16, seed=0)
    clean = take_subset(train, 0.1, None, True, 1)
    return train, clean, fit_classifier(encoder, train, cache=False)


def test_tac_reports_detection_and_removes_when_asked(downstream, tmp_path):
    train, clean, clf = downstream
    data = DownstreamData(train, clean)
    quiet = TAC(epochs=2)(clf, data, tmp_path)
    det = quiet.report["detection"]
    assert set(det) == {"norms", "candidate", "p_value", "alpha", "flagged", "target"} and len(det["norms"]) == 4
    if not det["flagged"]:
        assert "removal" not in quiet.report
        assert torch.equal(quiet.model.head.linear.weight, clf.head.linear.weight)
    forced = TAC(epochs=2, always_remove=True)(clf, data, tmp_path)
    removal = forced.report["removal"]
    assert removal["target"] == det["candidate"] and len(removal["shift_norms"]) == 1
    assert "detection_after" in forced.report and forced.report["data"]["clean_images"] == len(clean)
    assert not torch.equal(forced.model.head.linear.weight, clf.head.linear.weight)
    assert not any(p.requires_grad for p in forced.model.parameters())
    assert forced.report["hparams"]["epochs"] == 2


def test_tac_needs_clean_reference_images_and_a_valid_alpha(downstream, tmp_path):
    train, _, clf = downstream
    with pytest.raises(EncoderGuardError, match="clean labelled reference"):
        TAC(epochs=1)(clf, DownstreamData(train, None), tmp_path)
    with pytest.raises(ValueError, match="alpha"):
        TAC(alpha=1.5)


def test_cli_detect_writes_detection_json(encoder, downstream, tmp_path, capsys):
    ckpt = save_encoder(encoder, tmp_path / "enc.safetensors")
    out = tmp_path / "det"
    assert main(["detect", "--encoder", str(ckpt), "--dataset", "synthetic", "--out", str(out)]) == 0
    result = json.loads((out / "detection.json").read_text())
    assert {"norms", "candidate", "p_value", "flagged"} <= set(result)
    assert len(result["norms"]) == 4 and 0 <= result["candidate"] < 4 and 0 <= result["p_value"] <= 1
    assert isinstance(result["flagged"], bool) and result["reference_images"] > 0 and result["head"] is None
    assert "smallest" in capsys.readouterr().out
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    # with a deployed head; and a head of another encoder is refused with one line
    d = save_classifier(downstream[2], tmp_path / "clf")
    out2 = tmp_path / "det2"
    assert main(["detect", "--encoder", str(ckpt), "--head", str(d / "head.safetensors"), "--dataset", "synthetic",
                 "--alpha", "0.01", "--out", str(out2)]) == 0
    result2 = json.loads((out2 / "detection.json").read_text())
    assert result2["alpha"] == 0.01 and result2["head"] == str(d / "head.safetensors")
    other = Classifier(encoder, Head(64, 4))
    save_classifier(other, tmp_path / "other")
    capsys.readouterr()
    assert main(["detect", "--encoder", str(ckpt), "--head", str(tmp_path / "other" / "head.safetensors"),
                 "--dataset", "synthetic", "--out", str(tmp_path / "det3")]) == 2
    assert "pair it with the encoder" in capsys.readouterr().err


def test_tac_removal_keeps_the_head_sane_on_dimensions_dead_in_the_clean_set(downstream, tmp_path):
    from downstream.features import cached_features

    train, clean, clf = downstream
    # the case under test: some feature dimensions are constant over the small clean set (the fixture has 4)
    assert (cached_features(clf.encoder, clean).std(0) == 0).any()
    out = TAC(epochs=2, always_remove=True)(clf, DownstreamData(train, clean), tmp_path)
    assert out.model.head.linear.weight.abs().max() < 10 * clf.head.linear.weight.abs().max()
    k = out.report["detection"]["candidate"]
    assert out.report["detection_after"]["norms"][k] >= out.report["detection"]["norms"][k]  # harder to reach, not easier
