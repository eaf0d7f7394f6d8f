"""The poisoned fine-tune threat and the defender's yardsticks (re-fit the head, fine-tune everything)."""

from __future__ import annotations

import copy

import pytest
import torch

from downstream.classifier import fit_classifier
from downstream.finetune import FinetuneConfig, finetune_classifier, finetuned_victim, light_augment
from encoder_guard.compare import run_cell
from encoder_guard.data import make_synthetic
from encoder_guard.defenses import DEFENSES
from encoder_guard.errors import EncoderGuardError
from encoder_guard.threats import Downstream, DownstreamData, deployed_classifier, victim_of
from encoder_guard.triggers import PatchTrigger, save_trigger
from encoder_guard.triggers.poison import poison_downstream

TRIGGER = PatchTrigger.square(16, 1, size=4)


def test_light_augment_shifts_within_the_padding_and_flips():
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(light_augment(x, 0, 0.0, torch.Generator()), x)
    shifted = light_augment(x, 2, 0.0, torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape
    for a, b in zip(x, shifted):  # each image is its own shift by at most 2 pixels, zeros coming in
        assert any(torch.equal(b[:, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)],
                               a[:, max(0, dy):16 + min(0, dy), max(0, dx):16 + min(0, dx)])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    flipped = light_augment(x, 0, 1.0, torch.Generator())
    assert torch.equal(flipped, x.flip(3))


def test_the_victim_learns_the_backdoor_in_its_encoder_and_is_cached(encoder):
    train = make_synthetic(size=512, num_classes=4, image_size=16)
    test = make_synthetic(size=256, num_classes=4, image_size=16, split="test")
    poisoned = poison_downstream(train, TRIGGER, target=0, rate=0.1, seed=0).dataset
    recipe = FinetuneConfig(epochs=10, lr=0.005, batch_size=64, pad=0)  # 2-px shifts cut much of a 4-px corner patch
    victim = finetuned_victim(encoder, poisoned, recipe, seed=0)
    probe = fit_classifier(encoder, poisoned, seed=0)
    moved = [n for n, p in victim.encoder.state_dict().items()
             if p.is_floating_point() and not torch.equal(p, encoder.state_dict()[n])]
    assert moved, "fine-tuning trains the encoder, not only the head"
    ds = Downstream(DownstreamData(poisoned, None), test, TRIGGER, 0)
    asr_victim, asr_probe = ds.evaluate(victim)["asr"], ds.evaluate(probe)["asr"]
    assert asr_victim > 0.85 and asr_victim > asr_probe + 0.1, (asr_victim, asr_probe)
    again = finetuned_victim(encoder, poisoned, recipe, seed=0)  # read from the cache
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), victim.state_dict().values()))
    assert ds.evaluate(victim) == ds.evaluate(again)


def test_deployed_classifier_follows_the_victim_setting(encoder):
    train = make_synthetic(size=128, num_classes=4, image_size=16)
    ds = Downstream(DownstreamData(train, None), train, None, None)
    cfg = {"downstream": {"victim": "finetune", "finetune": {"epochs": 1, "batch_size": 64}}}
    clf = deployed_classifier(cfg, encoder, ds, seed=0)
    assert not torch.equal(clf.encoder.state_dict()["backbone.conv1.weight"], encoder.state_dict()["backbone.conv1.weight"])
    assert victim_of({}) == "probe"
    with pytest.raises(EncoderGuardError, match="downstream.victim"):
        victim_of({"downstream": {"victim": "retrain"}})
    with pytest.raises(EncoderGuardError, match="unknown fine-tuning keys"):
        FinetuneConfig.from_dict({"epoch": 3})


def test_refit_head_removes_a_backdoor_that_lives_in_the_head_alone(encoder):
    train = make_synthetic(size=512, num_classes=4, image_size=16)
    test = make_synthetic(size=256, num_classes=4, image_size=16, split="test")
    p = poison_downstream(train, TRIGGER, target=0, rate=0.2, seed=0)
    clean = make_synthetic(size=64, num_classes=4, image_size=16, seed=0)
    ds = Downstream(DownstreamData(p.dataset, clean), test, TRIGGER, 0)
    probe = fit_classifier(encoder, p.dataset, seed=0)
    result = DEFENSES.get("refit-head")()(probe, ds.data)
    before, after = ds.evaluate(probe)["asr"], ds.evaluate(result.model)["asr"]
    assert after < before, (before, after)
    tuned = DEFENSES.get("finetune-all")(epochs=1, batch_size=32)(probe, ds.data).model
    assert not torch.equal(tuned.encoder.state_dict()["backbone.conv1.weight"],
                           probe.encoder.state_dict()["backbone.conv1.weight"])


def test_compare_judges_the_finetuned_victim_as_the_undefended_row(encoder, tmp_path):
    from encoder_guard.encoders import save_encoder

    enc = save_encoder(copy.deepcopy(encoder), tmp_path / "enc.safetensors")
    trig = save_trigger(TRIGGER, tmp_path / "t.safetensors")
    matrix = {"attacks": {"ft": {"encoder": str(enc), "trigger": str(trig), "target": 0, "poison_rate": 0.1}},
              "downstream": {"dataset": "synthetic", "train_count": 256, "victim": "finetune",
                             "finetune": {"epochs": 1, "batch_size": 64}},
              "defenses": {"none": {}, "refit-head": {}}, "train": {"threads": 1}}
    none = run_cell(matrix, "ft", "none", 0, tmp_path / "none")
    assert none["level"] == "classifier" and none["ca_knn"] is None and 0 <= none["asr_linear"] <= 1
    refit = run_cell(matrix, "ft", "refit-head", 0, tmp_path / "refit")
    assert refit["level"] == "classifier" and 0 <= refit["ca_linear"] <= 1


def test_finetune_rejects_a_bad_recipe():
    with pytest.raises(EncoderGuardError, match="fine-tuning needs"):
        FinetuneConfig(epochs=0)
    assert finetune_classifier  # the public entry point the yardstick uses


def test_detect_reads_the_finetuned_victims_own_features(encoder, tmp_path):
    from downstream.features import cached_features
    from encoder_guard.defenses.tac import detect, run_detection
    from encoder_guard.threats import downstream_setup

    cfg = {"seed": 0, "downstream": {"dataset": "synthetic", "victim": "finetune", "clean_fraction": 0.05,
                                     "finetune": {"epochs": 1, "batch_size": 64}}}
    result = run_detection(encoder, cfg, tmp_path / "det")
    ds = downstream_setup(cfg, encoder, 0)
    clf = deployed_classifier(cfg, encoder, ds, 0)
    found, _ = detect(clf, cached_features(clf.encoder, ds.data.clean))
    assert result["norms"] == pytest.approx(found.as_dict()["norms"])
    stale, _ = detect(clf, cached_features(encoder, ds.data.clean))  # the encoder before fine-tuning
    assert stale.as_dict()["norms"] != pytest.approx(result["norms"])
