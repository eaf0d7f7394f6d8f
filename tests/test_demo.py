"""The demo sizes its pretraining to the machine: the rule, and the step timer it reads."""

import json

import torch

from encoder_guard.config import load_config
from encoder_guard.demo import DEMO_EPOCHS, MIN_EPOCHS, demo_epochs
from pretrain.timing import step_seconds


def test_demo_epochs_fill_the_budget_within_their_bounds():
    assert demo_epochs(0.20, 234, budget_s=300) == DEMO_EPOCHS  # 47 s an epoch: 6 fit, 6 is the cap
    assert demo_epochs(0.226, 234) == DEMO_EPOCHS and demo_epochs(0.59, 234) == 2  # two CPUs: with native bf16 and without
    assert demo_epochs(0.30, 234, budget_s=300) == 4  # 70 s an epoch
    assert demo_epochs(0.56, 234, budget_s=300) == 2  # 131 s an epoch
    assert demo_epochs(5.0, 234, budget_s=300) == MIN_EPOCHS  # nothing fits: the floor, not zero
    assert demo_epochs(0.01, 234, budget_s=300) == DEMO_EPOCHS


def test_step_seconds_times_the_presets_step_and_leaves_the_random_state_alone():
    cfg = load_config("fmnist-tiny", "pretrain")
    before = torch.get_rng_state()
    seconds = step_seconds(cfg, batch=8, steps=1, size=28, chans=1, warmup=1)
    assert 0 < seconds < 30
    assert torch.equal(torch.get_rng_state(), before)


def test_run_demo_goes_through_its_five_stages_and_writes_its_tables(tmp_path, monkeypatch, capsys):
    """The demo's glue, end to end, with the four heavy stages (pretraining, BadEncoder, evaluation, the
    comparison) replaced by fakes that write what the real ones write: it must read its presets, hand every stage
    the right inputs, and end with the table, the metrics and summary.md."""
    import downstream
    import downstream.baselines
    import encoder_guard.attacks.runner
    import encoder_guard.compare
    import encoder_guard.data
    import pretrain
    from encoder_guard.compare import defense_config
    from encoder_guard.demo import run_demo
    from encoder_guard.encoders import Encoder, make_spec, save_encoder
    from encoder_guard.triggers import build_trigger, save_trigger

    def fake_pretrain(cfg, out, resume=False):
        assert cfg["optim"]["epochs"] == 2 and cfg["data"]["dataset"] == "fashion-mnist"
        out.mkdir(parents=True, exist_ok=True)
        save_encoder(Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=28)), out / "encoder.safetensors")
        (out / "metrics.json").write_text("{}")

    def fake_attack(name, cfg, encoder, out, resume=False):
        assert name == "badencoder" and int(cfg["target"]) == 0
        out.mkdir(parents=True, exist_ok=True)
        save_encoder(encoder, out / "encoder.safetensors")
        save_trigger(build_trigger(cfg["trigger"], 28, 1), out / "trigger.safetensors")
        (out / "metrics.json").write_text("{}")

    def fake_evaluate(encoder, train, test, cfg=None, trigger=None, trigger_key=None, target=None):
        return {"ca_linear": 0.89, "ca_knn": 0.86, "asr_linear": 0.02, "asr_knn": 0.03}

    def fake_matrix(matrix, out):
        cells = []
        for attack_name, attack in matrix["attacks"].items():
            for label, entry in {"none": {}, **matrix["defenses"]}.items():
                if attack_name in (entry or {}).get("only", [attack_name]):
                    if label != "none":  # every demo cell resolves to a runnable config, in its own threat
                        _, cfg = defense_config(matrix, attack, label, 0)
                        assert (cfg["downstream"].get("victim") == "finetune") == (attack_name == "finetune-5%")
                    cells.append({"attack": attack_name, "defense": label, "seed": 0, "ca_linear": 0.88,
                                  "asr_linear": 0.01, "wall_seconds": 1.0})
        out.mkdir(parents=True, exist_ok=True)
        return cells, {"markdown": out / "report.md"}

    monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
    monkeypatch.setattr(encoder_guard.attacks.runner, "run_attack", fake_attack)
    monkeypatch.setattr(downstream, "evaluate_encoder", fake_evaluate)
    monkeypatch.setattr(downstream.baselines, "raw_pixel_metrics", lambda train, test: {"ca_linear": 0.84, "ca_knn": 0.79})
    monkeypatch.setattr(encoder_guard.data, "load_dataset", lambda *a, **k: None)
    monkeypatch.setattr(encoder_guard.compare, "run_matrix", fake_matrix)

    assert run_demo(tmp_path / "demo", epochs=2) == 0
    printed = capsys.readouterr().out
    assert "clean SimCLR (2 epochs)" in printed and "raw pixels" in printed
    for defense in ("mimic", "purifier-plus-no-rating", "purifier-plus", "refit-head", "finetune-all", "pad-ft", "d3",
                    "d3-tail", "tac"):
        assert f"| {defense} " in printed
    assert "| finetune-5% | mimic" not in printed and "| badencoder | d3 " not in printed  # each in its own threat
    assert (tmp_path / "demo" / "summary.md").read_text().strip() == printed.strip()
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["pretrain_epochs"] == 2 and metrics["badencoder"]["asr_linear"] == 0.02
    assert "2/5 BadEncoder on it (preset badencoder-fmnist: " in (tmp_path / "demo" / "log.txt").read_text()
