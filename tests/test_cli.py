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
