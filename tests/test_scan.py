"""Encoder scanners (DECREE, SSL-Cleanse): contract, helpers against naive references, and detection of a toy backdoor.

The toy backdoor wraps an encoder with a gate on the mean of the bottom-right ``PATCH×PATCH`` corner: a bright corner
sends any input to a fixed target embedding (the centroid of class 0), a dark one leaves the encoder as it was. The
clean scan images have a black corner, so the gate is shut on them and the toy behaves like the plain encoder until
a trigger lights the corner.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoder_guard.data.synthetic import make_synthetic
from encoder_guard.encoders import Encoder, make_spec
from encoder_guard.errors import EncoderGuardError
from encoder_guard.scan import SCANNERS, BudgetCollapse, Decree, Inversion, ScanResult, SSLCleanse, anomaly_index, build_scanner, knn_labels
from encoder_guard.scan.base import mean_pairwise_cosine
from encoder_guard.scan.decree import _LambdaController

PATCH = 4


class Centered(nn.Module):
    """An encoder minus the mean feature of ``ref``: an untrained ResNet's ReLU features all share the positive
    orthant (mean pairwise cosine ≈ 0.97 on any images), centring gives them the spread a trained encoder has."""

    def __init__(self, base: nn.Module, ref: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        with torch.no_grad():
            self.register_buffer("mu", base(ref).mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) - self.mu


class CornerBackdoor(nn.Module):
    """``(1 − g)·base(x) + g·target`` with ``g = sigmoid(10·(mean of the corner − 0.4))``: shut (0.02) on a black
    corner, open (0.998) on a white one, and half open at the mean a random trigger starts from, so that gradients
    reach it."""

    def __init__(self, base: nn.Module, target: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("target", 5 * target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(10 * (x[..., -PATCH:, -PATCH:].mean(dim=(1, 2, 3)) - 0.4)).unsqueeze(1)
        return (1 - gate) * self.base(x) + gate * self.target


class TemplateEncoder(nn.Module):
    """``f(x) = T·vec(x − 0.5)``: correlations with orthonormal blocky class templates. Every class is as far from
    every other, so the clean clusters need triggers of one size: the regime the MAD outlier test assumes."""

    def __init__(self, templates: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("t", templates.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - 0.5) @ self.t.T


class Constant(nn.Module):
    """Every input to one vector."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("v", torch.randn(8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.expand(len(x), -1) + 0 * x.sum()


def corner_share(mask: torch.Tensor) -> float:
    """The share of the mask's mass inside the corner patch."""
    return float(mask[-PATCH:, -PATCH:].sum() / mask.sum())


def peak_in_corner(mask: torch.Tensor) -> bool:
    """Whether the mask's largest entry lies in the corner patch."""
    h, w = mask.shape
    row, col = divmod(int(mask.argmax()), w)
    return row >= h - PATCH and col >= w - PATCH


@pytest.fixture(scope="module")
def resnet_toy() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(plain, backdoored, images, labels): an untrained ResNet-10 on 96 synthetic 16×16 images of 4 classes."""
    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
    data = make_synthetic(size=96, num_classes=4)
    images = data.images.float() / 255
    images[..., -PATCH:, -PATCH:] = 0
    plain = Centered(enc, images)
    with torch.no_grad():
        target = plain(images[data.labels == 0]).mean(0)
    return plain, CornerBackdoor(plain, target), images, data.labels


@pytest.fixture(scope="module")
def template_toy() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(plain, backdoored, images, labels): a template encoder on 96 16×16 images of 6 classes."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    templates = F.interpolate(q[:, :6].T.reshape(6, 1, 4, 4), scale_factor=4, mode="nearest") / 4  # unit norm
    labels = torch.arange(96) % 6
    contrast = 0.8 + 0.4 * torch.rand(96, 1, 1, 1, generator=g)
    images = 0.5 + 0.35 / templates.abs().amax() * templates[labels] * contrast + 0.05 * torch.randn(96, 1, 16, 16, generator=g)
    images = images.clamp(0, 1)
    images[..., -PATCH:, -PATCH:] = 0
    plain = TemplateEncoder(templates)
    with torch.no_grad():
        target = plain(images[labels == 0]).mean(0)
    return plain, CornerBackdoor(plain, target), images, labels


# ---------------------------------------------------------------- contract and helpers


def test_registry_has_both_scanners_and_unknown_names_list_the_choices():
    assert {"decree", "ssl-cleanse"} <= set(SCANNERS.names())
    assert SCANNERS.get("decree") is Decree and SCANNERS.get("ssl-cleanse") is SSLCleanse
    with pytest.raises(EncoderGuardError, match="decree.*ssl-cleanse"):
        SCANNERS.get("neural-cleanse")
    assert Decree.higher_is_suspicious is False and SSLCleanse.higher_is_suspicious is True


def test_settings_are_typed_keywords_with_the_papers_defaults():
    d = build_scanner("decree", seed=3, max_seconds=None, samples=200)
    assert isinstance(d, Decree) and d.samples == 200 and d.max_seconds is None and d.seed == 3
    assert (d.batch_size, d.lr, d.lr_milestones, d.thres, d.lambda_min, d.max_epochs) == (128, 0.5, (30, 50), 0.99, 1e-5, 1000)
    s = SSLCleanse()
    assert (s.clusters, s.samples, s.lr, s.batch_size, s.epochs, s.threshold, s.lam, s.lam_factor, s.patience,
            s.knn_samples, s.kmeans_inits, s.regularizer) == (10, 1000, 0.1, 32, 1000, 0.99, 0.1, 1.5, 5, 1000, 30, "mask-pattern")
    rebuilt = type(d)(seed=d.seed, **d.settings())
    assert rebuilt.settings() == d.settings() and "samples=200" in repr(d)
    with pytest.raises(EncoderGuardError, match="valid: .*samples"):
        build_scanner("decree", sample=10)
    for bad in ({"batch_size": 1}, {"thres": 1.5}, {"lr": -1.0}, {"lr_milestones": (50, 30)}):
        with pytest.raises(ValueError):
            Decree(**bad)
    for bad in ({"clusters": 1}, {"knn_metric": "manhattan"}, {"regularizer": "l2"}, {"lam_factor": 1.0}):
        with pytest.raises(ValueError):
            SSLCleanse(**bad)


def test_mean_pairwise_cosine_matches_a_loop_over_pairs():
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    pairs = [F.cosine_similarity(z[i], z[j], dim=0) for i in range(7) for j in range(7) if i != j]
    assert float(mean_pairwise_cosine(z)) == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-6)
    assert float(mean_pairwise_cosine(torch.ones(4, 3))) == pytest.approx(1.0)


def test_anomaly_index_is_neural_cleanses_mad_index():
    r = torch.tensor([0.02, 0.20, 0.22, 0.25, 0.30, 0.31])
    med = (0.22 + 0.25) / 2  # an even count: the mean of the two middle values
    deviations = sorted(abs(v - med) for v in r.tolist())
    mad = 1.4826 * (deviations[2] + deviations[3]) / 2
    index, median, got_mad = anomaly_index(r)
    assert median == pytest.approx(med) and got_mad == pytest.approx(mad) and index == pytest.approx((med - 0.02) / mad)
    assert anomaly_index(torch.ones(5))[0] == 0.0
    assert math.isinf(anomaly_index(torch.tensor([0.1, 1.0, 1.0, 1.0]))[0])


def test_knn_labels_match_a_naive_nearest_neighbour():
    g = torch.Generator().manual_seed(2)
    bank, query, labels = torch.randn(20, 4, generator=g), torch.randn(6, 4, generator=g), torch.arange(20) % 3
    for metric, score in (("cosine", lambda q, b: F.cosine_similarity(q, b, dim=0)), ("euclidean", lambda q, b: -(q - b).norm())):
        naive = [labels[max(range(20), key=lambda j: float(score(q, bank[j])))] for q in query]
        assert knn_labels(query, bank, labels, metric).tolist() == [int(v) for v in naive]


def test_lambda_controller_follows_decrees_step_rules():
    lam = _LambdaController(lambda_min=1e-5)
    for _ in range(6):
        lam.update(True)
    assert lam.value == pytest.approx(5e-3) and lam.up == 0
    for _ in range(6 * 4):
        lam.update(False)
    assert lam.value == pytest.approx(5e-3 / 5**4)  # 8e-6 < lambda_min: no further decrease
    for _ in range(6):
        lam.update(False)
    assert lam.value == pytest.approx(8e-6)
    for _ in range(5):
        lam.update(True)
    lam.update(True)  # the 6th success raises λ (still below lambda_min, the reset needs more than 10 in a row)
    assert lam.value == pytest.approx(4e-5)


def test_inversion_apply_keeps_shape_and_range():
    inv = Inversion(mask=torch.zeros(16, 16), pattern=torch.ones(1, 16, 16), size=0.0, success=1.0, target=torch.ones(8),
                    steps=0)
    inv.mask[-PATCH:, -PATCH:] = 1
    x = (torch.rand(5, 1, 16, 16) * 255).to(torch.uint8)
    out = inv.apply(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out[..., -PATCH:, -PATCH:], torch.ones(5, 1, PATCH, PATCH))
    assert torch.equal(out[..., :-PATCH, :], x[..., :-PATCH, :].float() / 255)
    with pytest.raises(ValueError, match="divide by 255"):
        inv.apply(torch.full((1, 1, 16, 16), 3.0))


def test_scan_rejects_images_the_encoder_cannot_take():
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16))
    with pytest.raises(ValueError, match="1-channel"):
        Decree(max_epochs=1).scan(enc, torch.rand(4, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 2"):
        Decree(max_epochs=1).scan(enc, torch.rand(1, 1, 16, 16))


# ---------------------------------------------------------------- DECREE


def test_decree_collapses_a_constant_encoder_with_an_empty_mask():
    result = Decree(samples=32, batch_size=16, max_epochs=15).scan(Constant(), torch.rand(32, 1, 16, 16))
    assert result.details["found"] and result.trigger.success > 0.99
    assert result.score < 0.01 and result.details["lambda"]["raises"] >= 2


def test_decree_inverts_the_corner_backdoor_and_scores_it_below_the_plain_encoder(resnet_toy):
    plain, backdoored, images, _ = resnet_toy
    settings = dict(samples=96, batch_size=32, max_epochs=60, early_stop_patience=30)
    clean = Decree(**settings).scan(plain, images)
    bad = Decree(**settings).scan(backdoored, images)
    assert bad.details["found"] and bad.trigger.success > 0.99
    assert peak_in_corner(bad.trigger.mask) and corner_share(bad.trigger.mask) > 0.9  # the trigger is the corner
    assert bad.score < 0.05 < 0.1 < clean.score  # PL1: about the 16 px of 256 against a fifth of the image
    assert F.cosine_similarity(bad.trigger.target, backdoored.target, dim=0) > 0.99


def test_decree_is_deterministic_leaves_the_encoder_alone_and_reports_json():
    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).train()
    before = copy.deepcopy(enc.state_dict())
    images = (torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    a = Decree(seed=5, samples=24, batch_size=12, max_epochs=3).scan(enc, images)
    b = Decree(seed=5, samples=24, batch_size=12, max_epochs=3).scan(enc, images)
    assert a.score == b.score and torch.equal(a.trigger.mask, b.trigger.mask)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())  # BatchNorm statistics included
    assert enc.training and all(p.requires_grad for p in enc.parameters()) and all(p.grad is None for p in enc.parameters())
    record = json.loads(json.dumps(a.to_dict()))
    assert record["method"] == "decree" and record["details"]["stopped"] == "epochs" and record["details"]["epochs"] == 3
    assert record["trigger"]["mask_shape"] == [16, 16] and record["details"]["settings"]["samples"] == 24
    assert isinstance(a, ScanResult) and a.trigger.mask.shape == (16, 16) and a.trigger.pattern.shape == (1, 16, 16)
    assert 0 <= float(a.trigger.mask.min()) and float(a.trigger.mask.max()) <= 1 and a.trigger.target.norm() == pytest.approx(1)


def test_decree_stops_on_its_time_budget():
    result = Decree(samples=32, batch_size=16, max_epochs=1000, max_seconds=1e-9).scan(Constant(), torch.rand(32, 1, 16, 16))
    assert result.details["stopped"] == "budget" and result.details["epochs"] == 1


# ---------------------------------------------------------------- fixed-budget collapse

FAST_COLLAPSE = dict(window=0.25, stride=0.25, samples=64, holdout=32, batch_size=32, screen_batch=16, screen_steps=10,
                     steps=40, refine=2)


def test_collapse_finds_the_corner_window_and_scores_the_backdoor_below_the_plain_encoder(resnet_toy):
    plain, backdoored, images, _ = resnet_toy
    clean = BudgetCollapse(**FAST_COLLAPSE).scan(plain, images)
    bad = BudgetCollapse(**FAST_COLLAPSE).scan(backdoored, images)
    assert bad.details["probe"].startswith("window@12,12/")  # the window over the corner trigger
    assert corner_share(bad.trigger.mask) == 1.0 and bad.trigger.size == pytest.approx(16 / 256)
    assert bad.score < 0.01 < 0.1 < clean.score  # 1 − S: the backdoor collapses, the plain encoder does not
    assert F.cosine_similarity(bad.trigger.target, backdoored.target, dim=0) > 0.99


def test_collapse_windows_cover_the_edges_and_settings_are_checked():
    scanner = BudgetCollapse(window=0.32, stride=0.11, starts=("ones",))
    masks = scanner.masks(28, 28)
    assert masks["blend"].unique().tolist() == [pytest.approx(0.1)]
    origins = sorted({tuple(map(int, k.split("@")[1].split("/")[0].split(","))) for k in masks if k != "blend"})
    assert origins[-1] == (19, 19) and (0, 0) in origins and len(origins) == 8 * 8
    assert all(float(masks[k].sum()) == 81 for k in masks if k != "blend")
    for bad in ({"window": 0.0, "blend_alpha": 0.0}, {"starts": ("zeros",)}, {"screen_steps": 100}, {"batch_size": 1}):
        with pytest.raises(ValueError):
            BudgetCollapse(**bad)


def test_collapse_is_deterministic_and_reports_json():
    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
    images = (torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    a, b = (BudgetCollapse(seed=2, **FAST_COLLAPSE).scan(enc, images) for _ in range(2))
    assert a.score == b.score and torch.equal(a.trigger.pattern, b.trigger.pattern)
    record = json.loads(json.dumps(a.to_dict()))
    assert record["method"] == "collapse" and record["score"] == pytest.approx(1 - a.trigger.success)
    assert set(record["details"]["similarity"]) >= {"blend", a.details["probe"]}


# ---------------------------------------------------------------- SSL-Cleanse

FAST_SSL = dict(samples=96, epochs=20, batch_size=16, knn_samples=64, warmup_epochs=15, kmeans_inits=5,
                regularizer="mask")


def test_ssl_cleanse_flags_the_backdoor_with_a_large_anomaly_index(template_toy):
    plain, backdoored, images, labels = template_toy
    clean = SSLCleanse(clusters=6, **FAST_SSL).scan(plain, images)
    bad = SSLCleanse(clusters=6, **FAST_SSL).scan(backdoored, images)
    assert bad.score > 5 and bad.score > 2 * clean.score  # Neural Cleanse's cut-off is 2
    suspect = bad.details["suspect_cluster"]
    assert min(bad.details["sizes"]) == bad.trigger.size < 0.1 < 0.3 < min(clean.details["sizes"])
    assert peak_in_corner(bad.trigger.mask) and corner_share(bad.trigger.mask) > 0.6 and bad.trigger.success > 0.99
    assert all(bad.details["found"]) and bad.details["cluster_sizes"] == [16] * 6 and 0 <= suspect < 6


def test_ssl_cleanse_finds_the_target_cluster_on_the_resnet_toy(resnet_toy):
    plain, backdoored, images, labels = resnet_toy
    clean = SSLCleanse(clusters=4, lam=2.0, patience=1, **FAST_SSL).scan(plain, images)
    bad = SSLCleanse(clusters=4, lam=2.0, patience=1, **FAST_SSL).scan(backdoored, images)
    with torch.no_grad():  # the cluster of the clean image nearest the target is the target cluster
        nearest = int(F.cosine_similarity(plain(images), backdoored.target[None], dim=1).argmax())
    ids = SSLCleanse(clusters=4, **FAST_SSL).cluster(backdoored(images).detach())
    assert bad.details["suspect_cluster"] == int(ids[nearest])
    assert peak_in_corner(bad.trigger.mask) and corner_share(bad.trigger.mask) > 0.6
    assert bad.trigger.size < min(clean.details["sizes"])


def test_ssl_cleanse_is_deterministic_and_reports_json(template_toy):
    _, backdoored, images, _ = template_toy
    settings = dict(FAST_SSL, clusters=3, epochs=3, samples=48)
    a, b = SSLCleanse(seed=1, **settings).scan(backdoored, images), SSLCleanse(seed=1, **settings).scan(backdoored, images)
    assert a.score == b.score and a.details["sizes"] == b.details["sizes"]
    record = json.loads(json.dumps(a.to_dict()))
    assert record["method"] == "ssl-cleanse" and len(record["details"]["sizes"]) == 3
    assert record["details"]["higher_is_suspicious"] is True and record["details"]["stopped"] == ["epochs"] * 3


# ---------------------------------------------------------------- the scan command and its verdict


def test_verdict_uses_the_methods_own_cutoff_without_a_reference_and_a_z_score_with_one():
    from encoder_guard.scan.runner import verdict

    assert verdict(0.05, "decree", None, 3.0)["flagged"] and not verdict(0.2, "decree", None, 3.0)["flagged"]
    assert verdict(2.5, "ssl-cleanse", None, 3.0)["flagged"] and not verdict(1.5, "ssl-cleanse", None, 3.0)["calibrated"]
    collapse = verdict(0.05, "collapse", None, 3.0)
    assert collapse["flagged"] and collapse["threshold"] == 0.09 and "dev population" in collapse["rule"]
    assert not verdict(0.12, "collapse", None, 3.0)["flagged"]
    ref = {"scores": [0.30, 0.25, 0.35, 0.28]}  # clean encoders' PL1
    small, usual = verdict(0.02, "decree", ref, 3.0), verdict(0.29, "decree", ref, 3.0)
    assert small["calibrated"] and small["flagged"] and small["z"] > 3  # a much smaller trigger than any clean one
    assert not usual["flagged"] and abs(usual["z"]) < 1
    assert 0.02 < small["threshold"] < 0.25  # the z threshold, back on the PL1 scale
    high = verdict(9.0, "ssl-cleanse", {"scores": [1.0, 1.5, 0.8]}, 3.0)
    assert high["flagged"] and high["threshold"] > 1.5


def test_scan_command_writes_report_trigger_and_suspected_target(tmp_path, capsys):
    from encoder_guard.cli import main
    from encoder_guard.encoders import save_encoder
    from encoder_guard.triggers import load_trigger

    enc = save_encoder(Encoder(make_spec("resnet10-tiny", input_size=16)), tmp_path / "enc.safetensors")
    out = tmp_path / "scan"
    fast = ["--method", "decree", "--set", "settings.max_epochs=2", "--set", "settings.samples=64", "--set",
            "settings.batch_size=32"]
    assert main(["scan", "--encoder", str(enc), "--dataset", "synthetic", "--out", str(out), *fast]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "decree" and 0 < report["score"] <= 1 and report["calibrated"] is False
    assert report["flagged"] == (report["score"] < 0.1) and report["images"] == 256 and report["details"]["images"] == 64
    assert report["suspected_target"]["class"] in range(10) and "found" in report["details"]
    trigger = load_trigger(out / "trigger.safetensors")
    assert trigger.apply(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    assert (out / "trigger.png").is_file() and (out / "target_embedding.safetensors").is_file()
    assert "report:" in capsys.readouterr().out

    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"method": "decree", "scores": [0.3, 0.25, 0.35]}))
    assert main(["scan", "--encoder", str(enc), "--dataset", "synthetic", "--out", str(tmp_path / "cal"),
                 "--reference", str(ref), *fast]) == 0
    cal = json.loads((tmp_path / "cal" / "report.json").read_text())
    assert cal["calibrated"] is True and isinstance(cal["z"], float)

    ref.write_text(json.dumps({"method": "ssl-cleanse", "scores": [1.0, 1.2, 0.9]}))
    for argv, message in [(["--reference", str(ref)], "holds 'ssl-cleanse' scores"),
                          (["--reference", str(tmp_path / "none.json")], "not found"),
                          (["--method", "neural-cleanse"], "unknown scanner"),
                          (["--set", "settings.epochz=3"], "epochz")]:
        assert main(["scan", "--encoder", str(enc), "--dataset", "synthetic", "--out", str(tmp_path / "bad"),
                     *argv]) == 2
        assert message in capsys.readouterr().err


def test_population_fixes_reference_and_threshold_on_dev_and_reports_test(tmp_path):
    import yaml

    from encoder_guard.cli import main
    from encoder_guard.encoders import save_encoder
    from encoder_guard.scan.population import load_population_config, report, run_population

    encoders = {}
    for i, (split, bad) in enumerate([("dev", False)] * 3 + [("test", False), ("dev", True), ("test", True)]):
        torch.manual_seed(i)
        path = save_encoder(Encoder(make_spec("resnet10-tiny", input_size=16)), tmp_path / f"e{i}.safetensors")
        encoders[f"e{i}"] = {"encoder": str(path), "backdoored": bad, "target": 1 if bad else None, "split": split}
    config = tmp_path / "population.yaml"
    config.write_text(yaml.safe_dump({"title": "tiny", "data": {"dataset": "synthetic"}, "encoders": encoders,
                                      "methods": {"decree": {"max_epochs": 1, "samples": 32, "batch_size": 16}}}))
    cfg, out = load_population_config(config), tmp_path / "population"
    paths = report(cfg, run_population(cfg, out), out)
    summary = json.loads(paths["json"].read_text())["summary"]["decree"]
    assert summary["dev"]["clean"] == 3 and summary["test"]["backdoored"] == 1
    assert 0 <= summary["test"]["auroc"] <= 1 and summary["dev"]["fpr"] <= 0.1  # the threshold keeps the dev budget
    reference = json.loads(paths["reference_decree"].read_text())
    assert reference["encoders"] == ["e0", "e1", "e2"] and len(reference["scores"]) == 3
    assert "| decree | test |" in paths["markdown"].read_text()

    stamp = (out / "cells" / "e0" / "decree" / "report.json").stat().st_mtime_ns
    run_population(cfg, out)  # finished cells are reused
    assert (out / "cells" / "e0" / "decree" / "report.json").stat().st_mtime_ns == stamp

    assert main(["scan", "--encoder", encoders["e3"]["encoder"], "--dataset", "synthetic", "--out", str(tmp_path / "s"),
                 "--method", "decree", "--reference", str(paths["reference_decree"]), "--set", "settings.max_epochs=1",
                 "--set", "settings.samples=32", "--set", "settings.batch_size=16"]) == 0
    scanned = json.loads((tmp_path / "s" / "report.json").read_text())
    assert scanned["calibrated"] and f"z ≥ {reference['z_threshold']:g}" in scanned["rule"]

    encoders["e0"].pop("split")
    config.write_text(yaml.safe_dump({"encoders": encoders}))
    with pytest.raises(EncoderGuardError, match="split: dev or test"):
        load_population_config(config)
