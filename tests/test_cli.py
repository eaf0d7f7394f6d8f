import json
import subprocess
import sys
from pathlib import Path

import pytest

from encoder_guard.cli import main
from encoder_guard.encoders import Encoder, make_spec, save_encoder


@pytest.fixture
def tiny_encoder(tmp_path) -> Path:
    return save_encoder(Encoder(make_spec("resnet10-tiny", input_size=16)), tmp_path / "enc.safetensors")


def test_info_shows_the_spec(tiny_encoder, capsys):
    assert main(["info", str(tiny_encoder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["feature_dim"] == 128 and info["in_chans"] == 1 and info["parameters"] > 0
    assert [t["name"] for t in info["taps"]] == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_evaluate_writes_metrics_and_config(tiny_encoder, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--encoder", str(tiny_encoder), "--dataset", "synthetic", "--out", str(out),
                 "--set", "knn_k=20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["ca_linear"] <= 1 and 0 <= metrics["ca_knn"] <= 1
    assert metrics["protocol"]["knn_k"] == 20 and metrics["train_size"] == 512
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/file.safetensors"], "does not exist"),
        (["pretrain", "--config", "nope", "--out", "x"], "preset"),
        (["pretrain", "--config", "fmnist-tiny", "--set", "optim.lrr=1", "--out", "x"], "unknown config key"),
        (["evaluate", "--encoder", "ENC", "--dataset", "mnist", "--out", "OUT"], "unknown dataset 'mnist'"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(argv, message, tiny_encoder, tmp_path):
    argv = [a.replace("ENC", str(tiny_encoder)).replace("OUT", str(tmp_path / "o")) for a in argv]
    res = subprocess.run([sys.executable, "-m", "encoder_guard.cli", *argv], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("encoder-guard: error:") and message in lines[-1]
    assert "Traceback" not in res.stderr


def test_a_failed_command_writes_its_reason_into_the_run_log(tiny_encoder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--encoder", str(tiny_encoder), "--dataset", "mnist", "--out", str(out)]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    assert "ERROR unknown dataset 'mnist'" in (out / "log.txt").read_text()


@pytest.fixture
def badencoder_layout(tmp_path) -> Path:
    """A 1-channel encoder for 16-px images saved in BadEncoder's layout, which cannot say its input size."""
    import torch

    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny", input_size=16))
    order = {"conv1": 0, "bn1": 1, "layer1": 3, "layer2": 4, "layer3": 5, "layer4": 6}
    state = {f"f.f.{order[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in enc.backbone.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "model.pth")
    return tmp_path / "model.pth"


def test_what_a_checkpoint_cannot_tell_is_given_on_the_command_line_and_shown_by_info(badencoder_layout, tmp_path, capsys):
    assert main(["info", str(badencoder_layout)]) == 0
    shown = capsys.readouterr().out
    assert "input_size" in shown and "32  (the default for a 3×3 stem with 1 channel(s))" in shown
    assert main(["info", str(badencoder_layout), "--input-size", "16", "--json"]) == 0
    assumed = json.loads(capsys.readouterr().out)["assumed"]
    assert assumed["input_size"] == {"value": 16, "from": "given when loading"}
    assert assumed["stem_pool"]["from"] == "the layout of the file (max-pool or not)"
    for flag, adapted in (([], ["resized 16→32"]), (["--input-size", "16"], [])):
        out = tmp_path / f"eval{len(flag)}"
        assert main(["evaluate", "--encoder", str(badencoder_layout), *flag, "--dataset", "synthetic",
                     "--out", str(out), "--set", "knn_k=20"]) == 0
        assert json.loads((out / "metrics.json").read_text())["adapted"] == adapted
    assert main(["defend", "clp", "--encoder", str(badencoder_layout), "--input-size", "16",
                 "--out", str(tmp_path / "clp")]) == 0
    from encoder_guard.encoders import load_encoder

    assert load_encoder(tmp_path / "clp" / "encoder.safetensors").spec.input_size == 16
