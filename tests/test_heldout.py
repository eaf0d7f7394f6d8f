"""The held-out attack benchmark: shards in separate processes, a merged report, the pass rule and exclusions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from downstream.metrics import worst_class_asr
from encoder_guard.cli import main
from encoder_guard.encoders import Encoder, make_spec, save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.heldout import load_heldout_config, parse_shard, plan, run_heldout, summarise

CLI = "import sys; from encoder_guard.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    torch.manual_seed(0)
    (d / "clean").mkdir()
    save_encoder(Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)), d / "clean" / "encoder.safetensors")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 6)):  # another domain: 3 classes of 12-px images, resized to 16
        for c in range(3):
            (d / "digits" / split / str(c)).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(12, 12, generator=g) * 80 + 60 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(d / "digits" / split / str(c) / f"{i}.png")
    cfg = {
        "title": "tiny held-out benchmark",
        "clean": str(d / "clean"),
        "attack": {"preset": "badencoder-fmnist", "set": [
            "shadow.dataset=synthetic", "shadow.count=64", "reference.dataset=synthetic", "reference.pool=16",
            "attack.epochs=1", "attack.batch_size=32", "train.threads=1"]},
        "zoo": {"split": "test", "per_family": 1, "families": ["patch", "warp"]},
        "data": {"dataset": "synthetic", "fraction": None, "count": 64, "allow_more": True},
        "downstream": {"dataset": "synthetic", "train_count": 128},
        "other_domain": {"dataset": "imagefolder", "root": str(d / "digits")},
        "train": {"threads": 1},
        "defenses": {
            "mimic": {"schedule": {"epochs": 1, "batch_size": 32}, "mi": {"samples": 64, "steps": 10}},
            "purifier-plus": {"granularity": "channel", "taps": ["layer4"]},
        },
        "pretrain_seconds": 100,
    }
    path = d / "heldout.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_shards_in_two_processes_merge_into_one_report(config_file, tmp_path, capsys):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CLI, "heldout", str(config_file), "--out", str(out), "--shard", s],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in ("1/2", "2/2")]
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output
        assert "--merge" in output  # says how to merge
    assert {p.name for p in (out / "shards").iterdir()} == {"1-of-2", "2-of-2"}
    assert main(["heldout", str(config_file), "--out", str(out), "--merge"]) == 0
    assert "| purifier-plus |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["missing"] == []
    assert [u["name"] for u in report["units"]] == ["clean", "patch-1000", "warp-1000"]
    for unit in report["units"]:
        assert [r["defense"] for r in unit["rows"]] == ["none", "mimic", "purifier-plus"]
        for row in unit["rows"]:
            assert 0 <= row["other_domain"]["ca_linear"] <= 1
        if unit["name"] != "clean":
            assert {"asr_linear", "asr_knn"} <= set(unit["floor"])
            assert 0 <= unit["floor"]["other_domain"]["worst_asr_knn"] <= 1
            assert all("worst_asr_linear" in r["other_domain"] for r in unit["rows"])
    assert {a["defense"] for a in report["aggregates"]} == {"none", "mimic", "purifier-plus"}
    assert (out / "encoders" / "patch-1000" / "trigger.safetensors").is_file()
    try:
        import matplotlib  # noqa: F401

        assert (out / "asr_by_defense.png").is_file()
    except ImportError:
        pass

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/unit.json")}
    cfg = load_heldout_config(config_file)
    run_heldout(cfg, out)  # everything is finished: nothing is recomputed
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/unit.json")} == stamps

    cells = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/metrics.json")}
    cfg["defenses"] = {"mimic": cfg["defenses"]["mimic"]}  # another set of defenses: units redone from their cells
    assert [[r["defense"] for r in u["rows"]] for u in run_heldout(cfg, out)] == [["none", "mimic"]] * 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/metrics.json")} == cells


def test_a_unit_dir_holding_another_attack_is_refused(config_file, tmp_path):
    cfg = load_heldout_config(config_file)
    run = tmp_path / "encoders" / "patch-1000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"target": 99, "trigger": {"kind": "blend"}}))
    with pytest.raises(EncoderGuardError, match="another attack"):
        run_heldout(cfg, tmp_path, shard=(2, 3))  # the second of three units is patch-1000


def test_the_plan_and_shards_cover_every_unit_once(config_file):
    units = plan(load_heldout_config(config_file))
    names = [u.name for u in units]
    assert names == ["clean", "patch-1000", "warp-1000"]
    assert all(u.attack is None or u.attack.split == "test" for u in units)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(EncoderGuardError, match="--shard"):
            parse_shard(bad)


def _row(defense, ca, asr, other_ca=0.9, worst=0.1):
    return {"defense": defense, "ca_linear": ca, "ca_knn": ca, "asr_linear": asr, "asr_knn": asr, "wall_seconds": 10.0,
            "other_domain": {"ca_linear": other_ca, "ca_knn": other_ca, "worst_asr_linear": worst, "worst_asr_knn": worst}}


def test_the_pass_rule_uses_the_floor_and_failed_attacks_are_excluded():
    cfg = {"defenses": {"d": {}}, "pass_asr": 0.05, "margin": 0.02, "planted_asr": 0.95, "planted_ca_drop": 0.02,
           "pretrain_seconds": 100, "zoo": {"split": "test", "per_family": 1, "families": ["patch"]},
           "other_domain": {"dataset": "x"}}
    clean = {"name": "clean", "family": "clean", "floor": None,
             "rows": [_row("none", 0.90, None, 0.8), _row("d", 0.895, None, 0.79)]}
    floor = {"asr_linear": 0.20, "asr_knn": 0.20, "other_domain": {"worst_asr_linear": 0.1, "worst_asr_knn": 0.1}}
    high_floor = {"name": "a", "family": "patch", "target": 1, "floor": floor,
                  "rows": [_row("none", 0.90, 0.99), _row("d", 0.89, 0.21, worst=0.15)]}  # 21% ≤ 20% + 2: passes
    missed = {"name": "b", "family": "patch", "target": 2, "floor": {**floor, "asr_linear": 0.0, "asr_knn": 0.0},
              "rows": [_row("none", 0.90, 0.99), _row("d", 0.88, 0.06)]}  # 6% > max(5%, 0% + 2): fails
    weak = {"name": "c", "family": "blend", "target": 3, "floor": floor,
            "rows": [_row("none", 0.90, 0.80), _row("d", 0.90, 0.0)]}  # 80% ASR: not a planted backdoor
    s = summarise(cfg, [clean, high_floor, missed, weak])
    assert list(s["failed_attacks"]) == ["c"] and "ASR linear 80.0%" in s["failed_attacks"]["c"]
    agg = {a["defense"]: a for a in s["aggregates"]}["d"]
    assert agg["encoders"] == 2 and agg["passed"] == 1
    assert agg["worst_asr_linear"] == pytest.approx(0.21) and agg["worst_delta_ca_linear"] == pytest.approx(-0.02)
    assert agg["other_worst_excess_linear"] == pytest.approx(0.05)
    assert agg["clean_delta_ca_linear"] == pytest.approx(-0.005)
    assert agg["clean_other_delta_ca_linear"] == pytest.approx(-0.01)
    assert agg["worst_share_of_pretraining"] == pytest.approx(0.1)


def test_worst_class_asr_finds_the_class_that_draws_the_most_triggered_inputs():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([2, 2, 2, 1, 2, 0])  # class 2 draws 3 of the 4 images not of class 2
    assert worst_class_asr(pred, labels, 3) == (pytest.approx(0.75), 2)
