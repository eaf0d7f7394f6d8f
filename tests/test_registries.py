"""One smoke test per registry entry: whatever is registered builds from its preset and runs on a tiny encoder.

A new defense, attack, SSL method, checkpoint format, trigger or MI estimator is tested here by being
registered; the shrink tables below only shorten schedules (by hyperparameter name, not by method).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from encoder_guard.attacks import ATTACKS
from encoder_guard.attacks.runner import run_attack
from encoder_guard.config import load_config
from encoder_guard.defenses import DEFENSES
from encoder_guard.defenses.runner import build_defense, defend_config, run_defense
from encoder_guard.encoders import FORMATS, Encoder, load_encoder, save_encoder
from encoder_guard.mi import MI_ESTIMATORS, build_estimator
from encoder_guard.scan import SCANNERS, build_scanner
from encoder_guard.triggers import TRIGGERS, build_trigger, load_trigger, save_trigger
from pretrain.methods import SSL_METHODS
from pretrain.trainer import build_method

# hyperparameters that set how long a method runs, shrunk for a smoke test (nested: merged into the preset's)
SHRINK: dict[str, Any] = {
    "schedule": {"epochs": 1, "batch_size": 32, "checkpoint_every": 1}, "mi": {"samples": 64, "steps": 10},
    "teacher_epochs": 1, "steps": 3, "recover_steps": 2, "epochs": 1, "head_epochs": 1, "score_epochs": 1,
    "signature_rounds": 1, "scan": {"screen_steps": 1, "steps": 2, "stride": 0.5, "samples": 32, "holdout": 16},
}


def _sets(section: str, names: list[str]) -> list[str]:
    out = []
    for key, value in SHRINK.items():
        if key in names:
            items = value.items() if isinstance(value, dict) else [(None, value)]
            out += [f"{section}.{key}{'' if k is None else '.' + k}={v}" for k, v in items]
    return out


@pytest.fixture(scope="module")
def trigger_file(tmp_path_factory) -> Path:
    return save_trigger(build_trigger({"kind": "patch", "size": 4}, 16, 1), tmp_path_factory.mktemp("t") / "t.safetensors")


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_runs_from_its_preset_on_a_tiny_encoder(name, encoder, trigger_file, tmp_path):
    cls = DEFENSES.get(name)
    if cls.level == "encoder":
        run = ["data.dataset=synthetic", "data.fraction=null", "data.count=64", "data.allow_more=true"]
    else:
        run = ["downstream.dataset=synthetic", "downstream.train_count=256", f"downstream.trigger={trigger_file}",
               "downstream.target=0", "downstream.poison_rate=0.1"]
    cfg = defend_config(name, sets=run + _sets("defense", cls.hparam_names()) + ["train.threads=1"])
    report = run_defense(name, cfg, encoder, tmp_path / "run")
    assert report["defense"] == name and report["wall_seconds_since_resume"] >= 0
    assert report["hparams"] == build_defense(name, cfg).hparams()
    if cls.level == "classifier":
        assert 0 <= report["after"]["ca"] <= 1 and 0 <= report["after"]["asr"] <= 1
        assert (tmp_path / "run" / "head.safetensors").is_file()
    defended = load_encoder(tmp_path / "run" / "encoder.safetensors").eval()
    with torch.no_grad():
        assert torch.isfinite(defended(torch.rand(4, 1, 16, 16))).all()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["data"] == report["data"]


# scanner settings that set how long a scan runs, shrunk for a smoke test
SCAN_SHRINK: dict[str, Any] = {"samples": 32, "max_epochs": 2, "epochs": 2, "warmup_epochs": 1, "knn_samples": 32,
                               "kmeans_inits": 1, "clusters": 3, "steps": 4, "screen_steps": 2, "holdout": 16,
                               "stride": 0.5}


@pytest.mark.parametrize("name", SCANNERS.names())
def test_every_scanner_runs_from_its_preset_on_a_tiny_encoder(name, encoder):
    names = SCANNERS.get(name).setting_names()
    result = build_scanner(name, **{k: v for k, v in SCAN_SHRINK.items() if k in names}).scan(
        encoder, torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert result.method == name and result.score == result.score  # a number, not NaN
    assert result.trigger.mask.shape == (16, 16) and result.trigger.target.shape == (encoder.spec.feature_dim,)
    json.dumps(result.to_dict())


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_runs_from_its_preset_on_a_tiny_encoder(name, encoder, tmp_path):
    cfg = load_config(f"{name}-fmnist", "attack", [
        "shadow.dataset=synthetic", "shadow.count=64", "reference.dataset=synthetic", "reference.pool=16",
        "attack.epochs=1", "attack.batch_size=32", "train.threads=1"])
    report = run_attack(name, cfg, encoder, tmp_path / "run")
    assert report["history"] and report["target"] == cfg["target"]
    assert load_encoder(tmp_path / "run" / "encoder.safetensors").spec.provenance["attack"] == name
    load_trigger(tmp_path / "run" / "trigger.safetensors")


@pytest.mark.parametrize("name", SSL_METHODS.names())
def test_every_ssl_method_builds_and_takes_a_finite_step(name, encoder):
    import copy

    cfg = {"method": {"name": name}}
    method = build_method(cfg, copy.deepcopy(encoder).train())
    views = [torch.rand(8, 1, 16, 16) for _ in range(method.views)]
    loss = method(views)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in method.encoder.parameters())
    method.on_step_end(0, 10)


def _torchvision(enc: Encoder) -> dict[str, Any]:
    return {**enc.backbone.state_dict(), "fc.weight": torch.randn(10, enc.feature_dim), "fc.bias": torch.zeros(10)}


def _badencoder(enc: Encoder) -> dict[str, Any]:
    order = {"conv1": 0, "bn1": 1, "layer1": 3, "layer2": 4, "layer3": 5, "layer4": 6}  # 2: ReLU, no max-pool
    state = {f"f.f.{order[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in enc.backbone.state_dict().items()}
    return {"epoch": 1, "state_dict": {**state, "g.0.weight": torch.randn(16, enc.feature_dim)}}


def _solo_learn(enc: Encoder) -> dict[str, Any]:
    state = {f"backbone.{k}": v for k, v in enc.backbone.state_dict().items()}
    return {"state_dict": {**state, "projector.0.weight": torch.randn(16, enc.feature_dim)}}


def _lightly(enc: Encoder) -> dict[str, Any]:
    state = {f"backbone.{k}": v for k, v in enc.backbone.state_dict().items()}
    return {"state_dict": {**state, "projection_head.layers.0.weight": torch.randn(16, enc.feature_dim)}}


WRITERS: dict[str, Callable[[Encoder], dict[str, Any]]] = {
    "torchvision": _torchvision, "badencoder": _badencoder, "solo-learn": _solo_learn, "lightly": _lightly}


@pytest.mark.parametrize("name", FORMATS.names())
def test_every_checkpoint_format_is_recognised_loaded_and_kept_through_our_format(name, tmp_path):
    if name not in WRITERS:
        pytest.fail(f"write a {name} file for this test: a registered format needs a smoke test")
    torch.manual_seed(1)
    from encoder_guard.encoders import make_spec

    enc = Encoder(make_spec("resnet10-tiny", in_chans=3, input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)).eval()
    path = tmp_path / "model.pth"
    torch.save(WRITERS[name](enc), path)
    loaded = load_encoder(path).eval()
    assert loaded.spec.provenance["format"] == name and loaded.spec.widths == enc.spec.widths
    assert set(loaded.spec.provenance["assumed"]) >= {"input_size", "mean", "std", "stem_padding"}
    back = load_encoder(save_encoder(loaded, tmp_path / "ours.safetensors")).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), loaded(x)) and loaded(x).shape == (2, enc.feature_dim)


@pytest.mark.parametrize("kind", TRIGGERS.names())
def test_every_trigger_applies_within_range_and_saves_bit_exactly(kind, tmp_path):
    trigger = build_trigger({"kind": kind}, 16, 1)
    x = torch.rand(3, 1, 16, 16)
    y = trigger(x)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1 and not torch.equal(x, y)
    back = load_trigger(save_trigger(trigger, tmp_path / "t.safetensors"))
    assert back.key() == trigger.key() and torch.equal(back(x), y)


@pytest.mark.parametrize("name", MI_ESTIMATORS.names())
def test_every_mi_estimator_sees_dependence_and_not_its_absence(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 2, generator=g)
    y = x + 0.3 * torch.randn(600, 2, generator=g)
    estimator = build_estimator(name, seed=0, steps=200)
    dependent, independent = estimator.estimate(x, y), estimator.estimate(x, torch.randn(600, 2, generator=g))
    assert dependent > 1.0 and independent < 0.3  # analytic: 2.47 nats and 0
