import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain.trainer as trainer
from encoder_guard.config import apply_overrides
from encoder_guard.encoders import load_encoder
from encoder_guard.errors import EncoderGuardError, TrainingDivergedError
from pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_encoder(path / "encoder.safetensors").state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), k


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_pretrain_writes_a_run_directory(tmp_path, tiny_cfg, method):
    cfg = dict(tiny_cfg, method={"name": "byol", "proj_hidden_dim": 64, "pred_hidden_dim": 64} if method == "byol" else tiny_cfg["method"])
    summary = pretrain(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "log.txt", "metrics.json", "encoder.safetensors", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == summary["steps"] == 2 * (512 // 64)
    assert len(metrics["history"]) == 2
    enc = load_encoder(run / "encoder.safetensors")
    assert enc.spec.ssl_method == method and enc.spec.in_chans == 1 and enc.spec.input_size == 16


def test_same_seed_same_weights(tmp_path, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["optim.epochs=1"])
    pretrain(cfg, tmp_path / "a")
    pretrain(cfg, tmp_path / "b")
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_poisoned_pretraining_records_its_trigger_and_target_class_indices(tmp_path, tiny_cfg):
    from encoder_guard.data import make_synthetic
    from encoder_guard.triggers import build_trigger, load_trigger

    base = apply_overrides(tiny_cfg, ["optim.epochs=1"])
    cfg = apply_overrides(base, ["poison.kind=patch", "poison.target=2", "poison.rate=0.05", "poison.size=4"])
    pretrain(cfg, tmp_path / "poisoned")
    run = tmp_path / "poisoned"
    record = json.loads((run / "poison.json").read_text())
    labels = make_synthetic(size=512, image_size=16, seed=0).labels
    assert record["kind"] == "patch" and record["target"] == 2 and record["poisoned"] == round(0.05 * 512) == 26
    assert record["placement"] == "stamp"
    assert (labels[torch.tensor(record["indices"])] == 2).all()
    trigger = load_trigger(run / "trigger.safetensors")
    assert trigger.key() == build_trigger({"kind": "patch", "size": 4}, 16, 1).key()
    # the poisoned images are what was trained on: same seed, other weights than a clean run
    pretrain(base, tmp_path / "clean")
    assert not torch.equal(weights(run)["backbone.conv1.weight"], weights(tmp_path / "clean")["backbone.conv1.weight"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupt_mid_epoch_then_resume_equals_uninterrupted(tmp_path, tiny_cfg, monkeypatch, precision):
    tiny_cfg = apply_overrides(tiny_cfg, [f"train.precision={precision}"])
    pretrain(tiny_cfg, tmp_path / "full")
    calls = {"n": 0}
    real = trainer.augment

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 11 + 1:  # during step 12 of 16 (two views per step)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "augment", interrupting)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg, tmp_path / "cut")
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 3, 11)
    monkeypatch.setattr(trainer, "augment", real)
    pretrain(tiny_cfg, tmp_path / "cut", resume=True)
    assert_same_weights(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_bf16_autocast_keeps_the_loss_in_fp32_and_close_to_fp32(tiny_cfg, method):
    """The encoder and heads may run in bf16; the loss is computed in fp32 and moves by under 2%."""
    from encoder_guard.encoders import Encoder, make_spec
    from encoder_guard.utils import autocast

    cfg = dict(tiny_cfg, method={"name": "byol", "proj_hidden_dim": 64, "pred_hidden_dim": 64} if method == "byol" else tiny_cfg["method"])
    torch.manual_seed(0)
    model = trainer.build_method(cfg, Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16))).eval()
    views = [torch.rand(32, 1, 16, 16), torch.rand(32, 1, 16, 16)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        full = model(views)
        with autocast(cpu, "bf16"):
            mixed = model(views)
        channels_last = model.to(memory_format=torch.channels_last)(
            [v.contiguous(memory_format=torch.channels_last) for v in views])
    assert full.dtype == mixed.dtype == torch.float32
    assert abs(float(mixed) - float(full)) <= 0.02 * abs(float(full)) + 1e-3
    assert torch.allclose(channels_last, full, rtol=1e-4, atol=1e-5)


def test_precision_names_resolve_and_a_wrong_one_is_named():
    from encoder_guard.utils import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision(None, cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, sig):
    """SIGKILL (no chance to save) loses at most the current epoch; SIGTERM stops at the end of a step and saves
    there. Either way, resuming gives the weights of an uninterrupted run."""
    sets = ["data.dataset=synthetic", "optim.batch_size=32", "optim.epochs=4", "train.threads=1"]
    args = [sys.executable, "-m", "encoder_guard.cli", "pretrain", "--config", "fmnist-tiny"]
    for s in sets:
        args += ["--set", s]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, sig)  # during epoch 2 of 4
    assert proc.wait() == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert ckpt.exists()
    assert not (tmp_path / "cut" / "encoder.safetensors").exists()
    res = subprocess.run(args + ["--out", str(tmp_path / "cut"), "--resume"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_weights(tmp_path / "ref", tmp_path / "cut")


def test_nan_loss_stops_with_reason_and_keeps_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    pretrain(apply_overrides(tiny_cfg, ["optim.epochs=1"]), tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    from pretrain.methods.simclr import SimCLR

    monkeypatch.setattr(SimCLR, "loss", lambda self, views: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingDivergedError, match="lower optim.lr"):
        pretrain(tiny_cfg, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["optim.epochs=1"])
    pretrain(cfg, tmp_path / "run")
    with pytest.raises(EncoderGuardError, match="--resume"):
        pretrain(cfg, tmp_path / "run")
    with pytest.raises(EncoderGuardError, match="nothing to resume"):
        pretrain(cfg, tmp_path / "other", resume=True)


def test_bad_method_options_are_named(tmp_path, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["method.temprature=0.1"])
    with pytest.raises(EncoderGuardError, match="temprature.*temperature"):
        pretrain(cfg, tmp_path / "run")
    cfg = apply_overrides(tiny_cfg, ["optim.batch_size=100000"])
    with pytest.raises(EncoderGuardError, match="smaller than one batch"):
        pretrain(cfg, tmp_path / "run2")


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes on synthetic data; only rank 0 writes."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
            "-m", "encoder_guard.cli", "pretrain", "--config", "fmnist-tiny", "--out", str(tmp_path / "ddp"),
            "--set", "data.dataset=synthetic", "--set", "optim.batch_size=64", "--set", "optim.epochs=1",
            "--set", "train.threads=1", "--set", "train.sync_bn=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 512 // 64
    assert load_encoder(tmp_path / "ddp" / "encoder.safetensors").spec.ssl_method == "simclr"


@pytest.mark.parametrize("command", [
    ["defend", "mimic", "--set", "data.dataset=synthetic", "--set", "data.fraction=null", "--set", "data.count=128",
     "--set", "data.allow_more=true", "--set", "defense.schedule.epochs=1", "--set", "defense.schedule.batch_size=32",
     "--set", "defense.mi.samples=128", "--set", "defense.mi.steps=20"],
    ["attack", "badencoder", "--set", "shadow.dataset=synthetic", "--set", "shadow.count=128",
     "--set", "reference.dataset=synthetic", "--set", "reference.pool=32", "--set", "attack.epochs=1",
     "--set", "attack.batch_size=32"],
], ids=["mimic", "badencoder"])
def test_mimic_and_badencoder_train_under_torchrun_like_pretraining(tmp_path, command):
    """The one training loop carries DDP: the defense and the attack split their batches over 2 gloo processes."""
    from encoder_guard.encoders import Encoder, make_spec, save_encoder

    torch.manual_seed(0)
    enc = save_encoder(Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)), tmp_path / "enc.safetensors")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29532",
            "-m", "encoder_guard.cli", *command[:2], "--encoder", str(enc), *command[2:], "--set", "train.threads=1",
            "--out", str(tmp_path / "run")]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "run" / "log.txt").read_text()
    assert load_encoder(tmp_path / "run" / "encoder.safetensors").spec.in_chans == 1
