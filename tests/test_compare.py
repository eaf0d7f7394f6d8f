"""`encoder-guard compare`: the matrix, its cells (resumed, never recomputed) and the report."""

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from downstream.report import aggregate, markdown, write_report
from encoder_guard.cli import main
from encoder_guard.compare import defense_config, load_matrix, run_matrix
from encoder_guard.defenses.runner import build_defense
from encoder_guard.encoders import Encoder, make_spec, save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import PatchTrigger, save_trigger

REASON = "needs the pretraining set, which this attack does not share"


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    torch.manual_seed(0)
    enc = save_encoder(Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)), d / "enc.safetensors")
    trig = save_trigger(PatchTrigger.square(16, 1, size=4), d / "trigger.safetensors")
    matrix = {
        "title": "tiny comparison",
        "seeds": [0, 1],
        "downstream": {"dataset": "synthetic", "train_count": 256},
        "train": {"threads": 1},
        "attacks": {"badnets": {"encoder": str(enc), "trigger": str(trig), "target": 0, "poison_rate": 0.1}},
        "defenses": {
            "none": None,
            "d3-tail": {"steps": 5, "layers": "head"},
            "pad-ft": {"score_epochs": 3, "epochs": 2},
            "tac": {"epochs": 1, "not_applicable": {"badnets": REASON}},
            "clp": {"seeds": [0], "only": ["badnets"]},
        },
    }
    path = d / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    return path


def test_defense_config_merges_preset_matrix_and_attack(matrix_file):
    m = load_matrix(matrix_file)
    method, cfg = defense_config(m, m["attacks"]["badnets"], "d3-tail", 1)
    assert method == "d3-tail" and cfg["seed"] == 1
    assert cfg["defense"] == {"steps": 5, "layers": "head"}  # what differs from the preset
    d3 = build_defense(method, cfg)
    assert d3.steps == 5 and d3.layers == "head" and d3.lr == 0.005 and d3.seed == 1
    _, cfg = defense_config(m, m["attacks"]["badnets"], "tac", 0)
    assert cfg["defense"] == {"epochs": 1}  # the matrix's own keys stay out of the defense's settings
    ds = cfg["downstream"]
    assert ds["dataset"] == "synthetic" and ds["train_count"] == 256 and ds["target"] == 0 and ds["poison_rate"] == 0.1
    assert ds["clean_fraction"] == 0.05 and cfg["train"]["threads"] == 1


def test_compare_writes_the_report_and_never_recomputes_a_cell(matrix_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(matrix_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| badnets | d3-tail |" in printed
    for f in ("report.md", "report.csv", "cells.json", "config.yaml", "log.txt"):
        assert (out / f).is_file(), f
    try:
        import matplotlib  # noqa: F401

        assert (out / "asr_vs_ca.png").is_file()
    except ImportError:
        pass
    done = sorted(out.glob("cells/*/*/seed*/metrics.json"))
    assert {p.relative_to(out / "cells").parts[:3] for p in done} >= {
        ("badnets", d, f"seed{s}") for d in ("d3-tail", "none", "pad-ft") for s in (0, 1)}
    cells = json.loads((out / "cells.json").read_text())["cells"]
    assert len(cells) == 9
    for c in cells:
        if c["defense"] == "tac":
            assert c.get("ca_linear") is None and REASON in c["note"]
            continue
        m = json.loads((out / "cells" / "badnets" / c["defense"] / f"seed{c['seed']}" / "metrics.json").read_text())
        assert m["ca_linear"] == c["ca_linear"] and m["asr_linear"] == c["asr_linear"]
        assert 0 <= c["ca_linear"] <= 1 and 0 <= c["asr_linear"] <= 1
        base = next(b for b in cells if b["defense"] == "none" and b["seed"] == c["seed"])
        assert c["delta_ca"] == pytest.approx(c["ca_linear"] - base["ca_linear"])
        if c["level"] == "encoder":  # an encoder is judged by the linear probe and kNN
            assert 0 <= c["ca_knn"] <= 1 and 0 <= c["asr_knn"] <= 1 and 0 <= c["ra_knn"] <= 1
        else:  # a classifier as it is: no kNN
            assert c["ca_knn"] is None and c["asr_knn"] is None
            report = json.loads((out / "cells" / "badnets" / c["defense"] / f"seed{c['seed']}" / "defense" /
                                 "report.json").read_text())
            assert report["after"]["ca"] == c["ca_linear"] and report["after"]["asr"] == c["asr_linear"]
            assert report["before"]["ca"] == pytest.approx(base["ca_linear"], abs=0.02)  # the same probe, refitted
            assert c["der"] == pytest.approx((max(0, base["asr_linear"] - c["asr_linear"])
                                              - max(0, base["ca_linear"] - c["ca_linear"]) + 1) / 2)
        if c["defense"] == "none":
            assert c["delta_ca"] == 0 and c["der"] == 0.5 and c["clean_images"] == 0
    pad = [c for c in cells if c["defense"] == "pad-ft"]
    d3 = [c for c in cells if c["defense"] == "d3-tail"]
    assert all(c["clean_images"] == 0 for c in pad) and all(c["clean_images"] > 0 for c in d3)
    assert [c["seed"] for c in cells if c["defense"] == "clp"] == [0]  # its own seeds

    md = (out / "report.md").read_text()
    assert md.startswith("# tiny comparison")
    tac_row = next(line for line in md.splitlines() if line.startswith("| badnets | tac |"))
    assert "—" in tac_row and REASON in tac_row
    rows = {r["defense"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert list(rows) == ["none", "clp", "d3-tail", "pad-ft", "tac"]  # the YAML dump sorted the keys
    assert rows["tac"]["ca_linear_mean"] == "" and REASON in rows["tac"]["note"]
    assert float(rows["d3-tail"]["ca_linear_mean"]) == pytest.approx(statistics.fmean(c["ca_linear"] for c in d3))
    assert float(rows["d3-tail"]["ca_linear_std"]) == pytest.approx(statistics.stdev(c["ca_linear"] for c in d3))
    assert rows["d3-tail"]["seeds"] == "2" and rows["d3-tail"]["ca_knn_mean"] == "" and rows["clp"]["ca_knn_mean"] != ""

    # a second run reuses every finished cell: nothing is set up, fitted or defended again
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "defense" in p.parts}
    mtimes.update({p: p.stat().st_mtime_ns for p in done})
    assert len(mtimes) > len(done) >= 6
    import encoder_guard.compare as compare_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    for name in ("run_defense", "downstream_setup", "evaluate_encoder", "load_encoder"):
        monkeypatch.setattr(compare_mod, name, refuse)
    assert main(["compare", str(matrix_file), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((out / "cells.json").read_text())["cells"] == cells
    assert (out / "report.md").read_text() == md


def _d3_seed0(matrix_file) -> dict:
    m = load_matrix(matrix_file)
    m["seeds"] = [0]
    m["defenses"] = {"d3-tail": m["defenses"]["d3-tail"]}
    return m


def test_a_cell_with_a_finished_defense_report_is_not_defended_again(matrix_file, tmp_path, monkeypatch):
    """Interrupted after the defense wrote report.json but before metrics.json: the report is reused."""
    m = _d3_seed0(matrix_file)
    out = tmp_path / "cmp"
    cells, _ = run_matrix(m, out)
    cell = out / "cells" / "badnets" / "d3-tail" / "seed0"
    (cell / "metrics.json").unlink()
    import encoder_guard.compare as compare_mod

    monkeypatch.setattr(compare_mod, "run_defense", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-ran")))
    again, _ = run_matrix(m, out)
    assert [c["ca_linear"] for c in again] == [c["ca_linear"] for c in cells] and (cell / "metrics.json").is_file()


def test_a_cell_whose_settings_changed_is_recomputed_and_the_old_one_kept(matrix_file, tmp_path):
    """A preset or matrix edit must not leave a cell reported under settings it did not run with."""
    m = _d3_seed0(matrix_file)
    out = tmp_path / "cmp"
    first, _ = run_matrix(m, out)
    cell = out / "cells" / "badnets" / "d3-tail" / "seed0"
    none_metrics = (out / "cells" / "badnets" / "none" / "seed0" / "metrics.json").stat().st_mtime_ns
    m["defenses"]["d3-tail"] = {**m["defenses"]["d3-tail"], "steps": 7}
    again, _ = run_matrix(m, out)
    stale = cell.with_name("seed0.stale-1")
    old = next(c for c in first if c["defense"] == "d3-tail")
    assert json.loads((stale / "metrics.json").read_text())["ca_linear"] == old["ca_linear"]
    assert json.loads((cell / "defense" / "report.json").read_text())["hparams"]["steps"] == 7
    log = (out / "log.txt").read_text()
    assert "moved to seed0.stale-1" in log and "d3-tail × seed 0 (running)" in log.split("report →")[1]
    d3 = next(c for c in again if c["defense"] == "d3-tail")
    assert d3["settings_digest"] != old["settings_digest"]
    assert (out / "cells" / "badnets" / "none" / "seed0" / "metrics.json").stat().st_mtime_ns == none_metrics
    m["train"] = {"threads": 2}  # how a cell runs is not what it runs: nothing is recomputed
    run_matrix(m, out)
    assert not cell.with_name("seed0.stale-2").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("attacks"), "'attacks' must map"),
    (lambda m: m["attacks"]["badnets"].pop("target"), "lacks target"),
    (lambda m: m["attacks"]["badnets"].update(encoder="/no/such.safetensors"), "no encoder at"),
    (lambda m: m["defenses"].update(nope={}), "unknown defense 'nope'"),
    (lambda m: m["defenses"]["d3-tail"].update(only=["badnet"]), "names attacks the matrix lacks: badnet"),
    (lambda m: m["attacks"].update(run={"run": "/no/such/run"}), "is not a run directory"),
])
def test_load_matrix_refuses_a_broken_matrix(matrix_file, tmp_path, edit, message):
    m = yaml.safe_load(matrix_file.read_text())
    edit(m)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(m))
    with pytest.raises(EncoderGuardError, match=message):
        load_matrix(bad)


def test_load_matrix_defaults_to_seed_zero(matrix_file, tmp_path):
    m = yaml.safe_load(matrix_file.read_text())
    del m["seeds"]
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(m))
    assert load_matrix(p)["seeds"] == [0]
    m["seeds"] = 3
    p.write_text(yaml.safe_dump(m))
    assert load_matrix(p)["seeds"] == [3]


# ------------------------------------------------------------------------------------------- report


def _cells():
    def cell(attack, defense, seed, ca, asr, knn=None, **rest):
        ca_knn, asr_knn = knn if knn is not None else (None, None)
        return {"attack": attack, "defense": defense, "seed": seed, "ca_linear": ca, "asr_linear": asr,
                "ca_knn": ca_knn, "asr_knn": asr_knn, **rest}

    return [
        cell("a", "none", 0, 0.90, 0.80, (0.85, 0.90), delta_ca=0.0, der=0.5, clean_images=0, wall_seconds=0.0),
        cell("a", "none", 1, 0.80, 0.60, (0.75, 0.70), delta_ca=0.0, der=0.5, clean_images=0, wall_seconds=0.0),
        cell("a", "d3-tail", 0, 0.85, 0.10, delta_ca=-0.05, der=0.825, clean_images=30, wall_seconds=10.0),
        cell("a", "d3-tail", 1, 0.82, 0.20, delta_ca=0.02, der=0.7, clean_images=30, wall_seconds=14.0),
        {"attack": "a", "defense": "mimic", "seed": 0, "note": "not applicable: no data"},
        cell("b", "d3-tail", 0, 0.70, None, delta_ca=0.0, clean_images=30, wall_seconds=3.0),
    ]


def test_aggregate_gives_mean_and_std_over_seeds():
    rows = aggregate(_cells())
    assert [(r["attack"], r["defense"], r["seeds"]) for r in rows] == [
        ("a", "none", 2), ("a", "d3-tail", 2), ("a", "mimic", 1), ("b", "d3-tail", 1)]
    none, d3, mimic, single = rows
    assert none["ca_linear"] == pytest.approx((0.85, statistics.stdev([0.9, 0.8])))
    assert none["asr_knn"] == pytest.approx((0.8, statistics.stdev([0.9, 0.7])))
    assert d3["delta_ca"] == pytest.approx((-0.015, statistics.stdev([-0.05, 0.02])))
    assert d3["der"] == pytest.approx((0.7625, statistics.stdev([0.825, 0.7])))
    assert d3["wall_seconds"] == pytest.approx((12.0, statistics.stdev([10.0, 14.0])))
    assert d3["ca_knn"] is None  # a classifier-level defense has no kNN figure
    assert all(mimic[k] is None for k in ("ca_linear", "asr_linear", "delta_ca", "der"))
    assert mimic["note"] == "not applicable: no data"
    assert single["ca_linear"] == (0.7, 0.0) and single["asr_linear"] is None and single["der"] is None
    assert none["note"] == ""


def test_markdown_and_csv_show_numbers_and_reasons(tmp_path):
    rows = aggregate(_cells())
    lines = markdown(rows).splitlines()
    assert lines[0].startswith("| attack | defense | seeds | CA linear | CA kNN | ASR linear | ASR kNN | ΔCA linear |")
    assert lines[0].rstrip().endswith("| note |") and "share of pretraining" not in lines[0]
    d3 = lines[3]
    assert "| 83.5% ± 2.1 | — | 15.0% ± 7.1 | — | -1.5% ± 4.9 |" in d3
    assert "| 30 |" in d3 and "| 12 s ± 3 |" in d3
    assert "| 85.0% ± 7.1 | 80.0% ± 7.1 | 70.0% ± 14.1 | 80.0% ± 14.1 |" in lines[2]
    assert lines[4].rstrip().endswith("not applicable: no data |")
    assert "| +0.0%" not in lines[2] and "| 0.0% |" in lines[2]
    paths = write_report(_cells(), tmp_path / "r", "hand-made")
    assert (tmp_path / "r" / "report.md").read_text().startswith("# hand-made")
    rows_csv = list(csv.reader(paths["csv"].open()))
    assert rows_csv[0][:5] == ["attack", "defense", "seeds", "ca_linear_mean", "ca_linear_std"]
    assert rows_csv[0][-1] == "note" and len(rows_csv) == 5
    mimic = rows_csv[3]
    assert mimic[:3] == ["a", "mimic", "1"] and mimic[3:-1] == [""] * (len(mimic) - 4)
    assert mimic[-1] == "not applicable: no data"
    assert float(rows_csv[2][3]) == pytest.approx(0.835)
    shared = aggregate([dict(c, share_of_pretraining=0.25) for c in _cells() if c["defense"] == "d3-tail"])
    assert "share of pretraining" in markdown(shared).splitlines()[0] and "25.0%" in markdown(shared)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_matrix_loads(path, tmp_path, monkeypatch):
    """The shipped matrices name registered defenses and complete attacks (their encoders stubbed here)."""
    m = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    for attack in m["attacks"].values():
        if "run" in attack:  # a run directory of `encoder-guard attack`: its config names the target
            Path(attack["run"]).mkdir(parents=True, exist_ok=True)
            Path(attack["run"], "config.yaml").write_text("target: 3\n")
            Path(attack["run"], "encoder.safetensors").touch()
        else:
            Path(attack["encoder"]).parent.mkdir(parents=True, exist_ok=True)
            Path(attack["encoder"]).touch()
    loaded = load_matrix(path)
    assert loaded["attacks"].keys() == m["attacks"].keys() and loaded["seeds"]


def test_log_kept_points_the_log_back_after_a_nested_run_even_one_that_fails(tmp_path):
    from encoder_guard.runs import RunDir, get_logger, log_kept

    RunDir(tmp_path / "outer")
    with pytest.raises(RuntimeError), log_kept():
        RunDir(tmp_path / "inner").logger.info("inner line")
        raise RuntimeError
    get_logger().info("outer line")
    outer, inner = (tmp_path / "outer" / "log.txt").read_text(), (tmp_path / "inner" / "log.txt").read_text()
    assert "outer line" in outer and "inner line" not in outer
    assert "inner line" in inner and "outer line" not in inner


def test_an_attack_sets_its_own_victim_and_a_pass_bar_names_known_attacks(matrix_file, tmp_path):
    m = load_matrix(matrix_file)
    ft = {**m["attacks"]["badnets"], "victim": "finetune"}
    _, cfg = defense_config(m, ft, "d3-tail", 0)
    assert cfg["downstream"]["victim"] == "finetune"
    _, cfg = defense_config(m, m["attacks"]["badnets"], "d3-tail", 0)
    assert cfg["downstream"].get("victim", "probe") == "probe"
    raw = yaml.safe_load(matrix_file.read_text())
    raw["pass"] = {"asr": 0.02, "floors": {"badnets": "badnets-floor"}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(EncoderGuardError, match="badnets-floor"):
        load_matrix(bad)
    for broken, message in (({"floors": {}}, "'pass' needs 'asr'"), ({"asr": 0.02}, "'pass' needs 'asr' and 'floors"),
                            ({"asr": 0.02, "floors": {}, "over_flor": 0.01}, "unknown keys over_flor")):
        raw["pass"] = broken
        bad.write_text(yaml.safe_dump(raw))
        with pytest.raises(EncoderGuardError, match=message):
            load_matrix(bad)


def test_a_cell_passes_under_the_larger_of_the_bar_and_its_floor_and_the_summary_counts_them():
    from downstream.report import pass_summary
    from encoder_guard.compare import passes

    bar = {"asr": 0.02, "over_floor": 0.01, "ca_drop": 0.02}
    low_floor, high_floor = {"asr_linear": 0.003}, {"asr_linear": 0.10, "asr_knn": 0.05}
    assert passes({"asr_linear": 0.019}, low_floor, bar) and not passes({"asr_linear": 0.021}, low_floor, bar)
    assert passes({"asr_linear": 0.105, "asr_knn": 0.06}, high_floor, bar)  # floor + 1 point is the larger
    assert not passes({"asr_linear": 0.105, "asr_knn": 0.061}, high_floor, bar)  # kNN is judged too where given
    classifier_floor = {"asr_linear": 0.10, "asr_knn": None}  # judged without kNN: its linear ASR stands for both
    assert passes({"asr_linear": 0.10, "asr_knn": 0.105}, classifier_floor, bar)
    cells = [{"defense": "d3", "asr_linear": a, "asr_knn": None, "delta_ca": d, "wall_seconds": w, "passed": p,
              "passed_with_ca": p and d >= -0.02}
             for a, d, w, p in [(0.0, -0.04, 100, True), (0.01, -0.01, 110, True), (0.5, -0.01, 120, False)]]
    cells.append({"defense": "none", "asr_linear": 0.99, "delta_ca": 0.0})  # no floor: not judged, not counted
    table = pass_summary(cells, bar)
    assert "| d3 | 2/3 | 1/3 | 1.0 / — | 50.0 / — | -4.0 | 110 s |" in table
    assert "| none |" not in table and "max(2%, floor + 1 point)" in table
