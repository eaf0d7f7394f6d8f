"""The attack zoo: reproducible draws, a split fixed by the seed, configs that BadEncoder runs as drawn."""

from __future__ import annotations

import pytest
import torch

from encoder_guard.attacks.runner import run_attack
from encoder_guard.cli import main
from encoder_guard.config import load_config, load_yaml
from encoder_guard.triggers import build_trigger, load_trigger
from encoder_guard.zoo import FAMILIES, TEST_START, attack_config, draw, split_of, split_seeds, zoo


def test_a_draw_is_a_pure_function_of_family_and_seed():
    for family in FAMILIES:
        assert draw(family, 3) == draw(family, 3)
        assert len({repr(draw(family, s)) for s in range(6)}) == 6  # seeds draw different attacks


def test_draws_stay_in_their_familys_ranges_and_reach_every_target():
    attacks = zoo("dev", 60)
    assert {a.target for a in attacks} == set(range(10))
    for a in attacks:
        t = a.trigger
        if a.family == "patch":
            assert 3 <= t["size"] <= 9 and t["pattern"] in ("white", "random", "checkerboard")
            assert all(0 <= p <= 28 - t["size"] for p in t["position"])
        elif a.family == "blend":
            assert 0.1 <= t["alpha"] <= 0.3
        elif a.family == "ctrl":
            assert 60 <= t["magnitude"] <= 150 and all(0 <= f < 28 for pair in t["frequencies"] for f in pair)
        else:
            assert 3 <= t["k"] <= 5 and 2.0 <= t["strength"] <= 3.0
    patches = [a for a in attacks if a.family == "patch"]
    assert {a.trigger["pattern"] for a in patches} == {"white", "random", "checkerboard"}
    centre = [a for a in patches if all(6 <= p <= 22 - a.trigger["size"] for p in a.trigger["position"])]
    assert centre, "patches are drawn away from the corners too"


def test_the_split_is_a_property_of_the_seed():
    assert split_of(0) == split_of(TEST_START - 1) == "dev" and split_of(TEST_START) == "test"
    assert split_seeds("test", 3) == [TEST_START, TEST_START + 1, TEST_START + 2]
    assert all(a.split == "test" for a in zoo("test", 2)) and all(a.split == "dev" for a in zoo("dev", 2))
    with pytest.raises(ValueError, match="run into the test split"):
        split_seeds("dev", 5, start=TEST_START - 2)
    with pytest.raises(ValueError, match="unknown zoo family"):
        draw("ssba", 0)


def test_every_family_builds_on_other_image_sizes():
    for size in (16, 32, 96):
        for a in zoo("dev", 3, image_size=size):
            trigger = build_trigger(a.trigger, size, 3)
            x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            assert not torch.equal(trigger(x), x)


def test_the_cli_writes_configs_that_rebuild_the_saved_trigger(tmp_path, capsys):
    assert main(["zoo", "--split", "test", "--per-family", "1", "--no-pictures", "--out", str(tmp_path / "zoo")]) == 0
    index = load_yaml(tmp_path / "zoo" / "zoo.yaml")
    assert [a["name"] for a in index["attacks"]] == [f"{f}-{TEST_START}" for f in FAMILIES]
    for entry in index["attacks"]:
        cfg = load_config(entry["config"], "attack")
        saved = load_trigger(tmp_path / "zoo" / entry["name"] / "trigger.safetensors")
        assert build_trigger(cfg["trigger"], 28, 1).key() == saved.key() == entry["trigger_key"]
        assert cfg["target"] == entry["target"] and entry["split"] == "test"
    assert "4 attacks" in capsys.readouterr().out
    assert main(["zoo", "--split", "dev", "--per-family", "2", "--start", str(TEST_START - 1), "--out",
                 str(tmp_path / "bad")]) == 2


def test_a_drawn_warp_attack_runs_through_badencoder(encoder, tmp_path):
    base = load_config("badencoder-fmnist", "attack", [
        "shadow.dataset=synthetic", "shadow.count=64", "reference.dataset=synthetic", "reference.pool=16",
        "attack.epochs=1", "attack.batch_size=32", "train.threads=1"])
    attack = draw("warp", 5, image_size=16, num_classes=4)  # the synthetic set has 4 classes
    report = run_attack("badencoder", attack_config(attack, base), encoder, tmp_path / "run")
    assert report["target"] == attack.target
    trigger = load_trigger(tmp_path / "run" / "trigger.safetensors")
    assert trigger.kind == "warp" and trigger.key() == build_trigger(attack.trigger, 16, 1).key()
