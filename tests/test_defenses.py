"""Distillation defenses (MIMIC and its baselines): losses, runs, budget, resume, CLI."""

import json

import pytest
import torch

from encoder_guard.cli import main
from encoder_guard.defenses import DEFENSES
from encoder_guard.defenses.distill import attention_loss, attention_map, clone_loss
from encoder_guard.defenses.runner import defend_config, run_defense
from encoder_guard.encoders import Encoder, load_encoder, make_spec, save_encoder
from encoder_guard.errors import EncoderGuardError

FAST = ["data.dataset=synthetic", "data.fraction=null", "data.count=128", "data.allow_more=true",
        "defense.schedule.epochs=2", "defense.schedule.batch_size=32", "defense.schedule.checkpoint_every=1",
        "defense.mi.samples=128", "defense.mi.steps=50", "train.threads=1"]


@pytest.fixture(scope="module")
def teacher() -> Encoder:
    torch.manual_seed(3)
    return Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()


def test_attention_and_clone_losses_vanish_on_identical_inputs_only():
    f = torch.rand(4, 8, 5, 5)
    a = attention_map(f)
    assert a.shape == (4, 25) and torch.allclose(a.norm(dim=1), torch.ones(4))
    assert attention_loss([f], [f], [1.0]) == 0 and attention_loss([f], [f.flip(-1)], [1.0]) > 0
    assert attention_loss([f], [3 * f], [1.0]) < 1e-6  # scale-free: only where attention goes matters
    z = torch.randn(4, 16)
    assert clone_loss(z, z) < 1e-6 and clone_loss(z, -z) == pytest.approx(2.0)


def test_per_position_attention_is_the_mean_squared_error_of_mimics_code():
    s, t = torch.rand(4, 8, 5, 5), torch.rand(4, 8, 5, 5)
    mse = torch.nn.functional.mse_loss(attention_map(s), attention_map(t))  # AT(p=2) as MIMIC's code computes it
    assert attention_loss([s], [t], [1.0], per_position=True) == pytest.approx(float(mse))
    assert attention_loss([s], [t], [1.0]) == pytest.approx(25 * float(mse))


def test_reference_stage_weights_use_the_fresh_students_mi(teacher, tmp_path):
    sets = FAST + ["defense.stage_weights=reference", "defense.mi_model=student", "defense.mi.estimator=gaussian"]
    report = run_defense("mimic", defend_config("mimic", sets=sets), teacher, tmp_path / "ref")
    weights, mi = list(report["stage_weights"].values()), [max(0.0, s["mi"]) for s in report["stage_mi"]]
    assert sum(weights) == pytest.approx(4 * 1000 + 10000)  # 1000 + 10000 · I_l / Σ I
    assert weights == pytest.approx([1000 + 10000 * v / sum(mi) for v in mi])
    on_teacher = run_defense("mimic", defend_config("mimic", sets=FAST + ["defense.mi.estimator=gaussian"]), teacher,
                             tmp_path / "teacher")
    assert [s["mi"] for s in on_teacher["stage_mi"]] != [s["mi"] for s in report["stage_mi"]]


def test_every_distillation_defense_is_registered():
    assert {"mimic", "finetune", "distill", "nad"} <= set(DEFENSES.names())


def test_mimic_writes_a_loadable_student_and_a_report(teacher, tmp_path):
    cfg = defend_config("mimic", sets=FAST)
    report = run_defense("mimic", cfg, teacher, tmp_path / "run")
    student = load_encoder(tmp_path / "run" / "encoder.safetensors")
    assert student.spec.arch == teacher.spec.arch and student.spec.provenance["defense"] == "mimic"
    assert not torch.equal(student.backbone.conv1.weight, teacher.backbone.conv1.weight)  # a fresh student
    assert [s["tap"] for s in report["stage_mi"]] == ["layer1", "layer2", "layer3", "layer4"]
    weights = list(report["stage_weights"].values())
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert report["data"]["images"] == 128 and report["wall_seconds_since_resume"] > 0
    assert set(report["history"][0]) == {"epoch", "step", "ssl", "clone", "attention"}
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["stage_weights"] == report["stage_weights"]
    report = run_defense("mimic", defend_config("mimic", sets=FAST + ["defense.clone=0"]), teacher, tmp_path / "c")
    assert set(report["history"][0]) == {"epoch", "step", "ssl", "attention"}  # a zero weight drops the term


def test_baselines_switch_their_losses(teacher, tmp_path):
    report = run_defense("distill", defend_config("distill", sets=FAST), teacher, tmp_path / "d")
    assert set(report["history"][0]) == {"epoch", "step", "clone"} and "stage_mi" not in report
    report = run_defense("finetune", defend_config("finetune", sets=FAST), teacher, tmp_path / "f")
    assert set(report["history"][0]) == {"epoch", "step", "ssl"}
    report = run_defense("nad", defend_config("nad", sets=FAST + ["defense.teacher_epochs=1"]), teacher, tmp_path / "n")
    assert set(report["history"][0]) == {"epoch", "step", "ssl", "attention"}
    assert (tmp_path / "n" / "teacher.safetensors").exists()


def test_clean_data_budget_is_enforced(teacher, tmp_path):
    cfg = defend_config("mimic", sets=["data.dataset=synthetic", "data.fraction=0.5"])
    with pytest.raises(EncoderGuardError, match="at most 5%.*allow_more=true"):
        run_defense("mimic", cfg, teacher, tmp_path / "run")


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_mimic_resumes_to_the_same_weights(teacher, tmp_path, monkeypatch, ema):
    cfg = defend_config("mimic", sets=FAST + ["defense.mi.estimator=gaussian", f"defense.schedule.ema={ema}"])
    run_defense("mimic", cfg, teacher, tmp_path / "full")
    import encoder_guard.defenses.distill as distill_mod

    real, calls = distill_mod.attention_loss, {"n": 0}

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2 (4 steps per epoch), after the epoch-1 checkpoint
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(distill_mod, "attention_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_defense("mimic", cfg, teacher, tmp_path / "cut")
    monkeypatch.setattr(distill_mod, "attention_loss", real)
    with pytest.raises(EncoderGuardError, match="--resume"):
        run_defense("mimic", cfg, teacher, tmp_path / "cut")
    run_defense("mimic", cfg, teacher, tmp_path / "cut", resume=True)
    a = load_encoder(tmp_path / "full" / "encoder.safetensors").state_dict()
    b = load_encoder(tmp_path / "cut" / "encoder.safetensors").state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_an_out_of_range_setting_is_one_clear_error(teacher, tmp_path):
    cfg = defend_config("mimic", sets=FAST + ["defense.schedule.lr=-0.1"])
    with pytest.raises(EncoderGuardError, match=r"defend mimic: .*lr > 0.*change that value"):
        run_defense("mimic", cfg, teacher, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing to clean up before the corrected rerun


def test_ema_returns_the_averaged_student_and_refuses_a_checkpoint_without_one(teacher, tmp_path):
    sets = FAST + ["defense.mi.estimator=gaussian", "defense.schedule.ema=0"]
    run_defense("mimic", defend_config("mimic", sets=sets), teacher, tmp_path / "raw")
    run_defense("mimic", defend_config("mimic", sets=sets + ["defense.schedule.ema=0.9"]), teacher, tmp_path / "ema")
    raw = load_encoder(tmp_path / "raw" / "encoder.safetensors").state_dict()
    ema = load_encoder(tmp_path / "ema" / "encoder.safetensors").state_dict()
    # the average draws nothing from the random streams: same trajectory as the raw run, only the average differs
    assert not torch.equal(raw["backbone.conv1.weight"], ema["backbone.conv1.weight"])
    assert torch.allclose(raw["backbone.conv1.weight"], ema["backbone.conv1.weight"], atol=0.05)
    with pytest.raises(EncoderGuardError, match=r"defend mimic: ema is a decay in \[0, 1\)"):
        run_defense("mimic", defend_config("mimic", sets=sets + ["defense.schedule.ema=1"]), teacher, tmp_path / "bad")
    with pytest.raises(EncoderGuardError, match="without a weight average"):
        run_defense("mimic", defend_config("mimic", sets=sets + ["defense.schedule.ema=0.9"]), teacher, tmp_path / "raw",
                    resume=True)


def test_cli_defend_and_analyze_mi(teacher, tmp_path, capsys):
    ckpt = save_encoder(teacher, tmp_path / "t.safetensors")
    args = ["defend", "distill", "--encoder", str(ckpt), "--out", str(tmp_path / "run")]
    assert main(args + sum((["--set", s] for s in FAST), [])) == 0
    assert (tmp_path / "run" / "encoder.safetensors").exists()
    assert main(["defend", "nope", "--encoder", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "unknown defense 'nope'" in capsys.readouterr().err
    assert main(["analyze", "mi", "--encoder", str(ckpt), "--dataset", "synthetic", "--samples", "200",
                 "--estimator", "gaussian", "--pool", "1", "--out", str(tmp_path / "mi")]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "stem" in out
    rows = json.loads((tmp_path / "mi" / "mi.json").read_text())["rows"]
    assert len(rows) == 5 and (tmp_path / "mi" / "mi.png").exists()


def test_teacher_views_are_the_only_inputs_the_teacher_sees(teacher, tmp_path):
    from encoder_guard.augment import ViewConfig
    from encoder_guard.defenses.distill import LossWeights, Schedule, distill, fresh_copy

    images = (torch.rand(16, 1, 16, 16) * 255).to(torch.uint8)
    seen = []

    class Spy(torch.nn.Module):
        def forward_intermediates(self, v, taps):
            seen.append(v.clone())
            return teacher.forward_intermediates(v, taps)

    identity = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    weights = LossWeights(1.0, 1.0, 1.0, ["layer4"], [1.0])
    distill(fresh_copy(teacher, 0), Spy(), images, weights, Schedule(epochs=1, batch_size=8), ViewConfig(),
            tmp_path / "s.pt", teacher_views=identity)
    # one teacher pass per step, on the second view only, and that view is the unaugmented image
    assert len(seen) == 2 and all(len(v) == 8 for v in seen)
    assert all(any(torch.allclose(s, img.float() / 255, atol=1e-6) for img in images) for v in seen for s in v)
    seen.clear()
    distill(fresh_copy(teacher, 0), Spy(), images, weights, Schedule(epochs=1, batch_size=8), ViewConfig(),
            tmp_path / "both.pt")
    assert len(seen) == 2 and all(len(v) == 16 for v in seen)  # without teacher views: both views


def test_standardised_clone_space_scores_the_teachers_z_scores(teacher, tmp_path):
    from encoder_guard.augment import ViewConfig
    from encoder_guard.defenses.distill import LossWeights, Schedule, distill, fresh_copy

    images = (torch.rand(16, 1, 16, 16) * 255).to(torch.uint8)
    weights = LossWeights(0.0, 1.0, 0.0, [], [])
    history = {}
    for space in ("raw", "standardised"):
        history[space] = distill(fresh_copy(teacher, 0), teacher, images, weights, Schedule(epochs=2, batch_size=8),
                                 ViewConfig(), tmp_path / f"{space}.pt", clone_space=space)
    # the same student, data and views: only the space the cosine is taken in differs
    assert all(h["clone"] > 0 for hs in history.values() for h in hs)
    assert history["raw"][0]["clone"] != pytest.approx(history["standardised"][0]["clone"], rel=1e-3)
    with pytest.raises(ValueError, match="clone_space"):
        distill(fresh_copy(teacher, 0), teacher, images, weights, Schedule(epochs=1, batch_size=8), ViewConfig(),
                tmp_path / "bad.pt", clone_space="whitened")
    with pytest.raises(ValueError, match="clone_space"):
        DEFENSES.get("mimic")(clone_space="whitened")


def test_distill_layouts_agree_and_the_student_comes_back_contiguous(teacher, tmp_path):
    from encoder_guard.augment import ViewConfig
    from encoder_guard.defenses.distill import LossWeights, Schedule, distill, fresh_copy

    images = (torch.rand(16, 1, 16, 16) * 255).to(torch.uint8)
    weights = LossWeights(1.0, 1.0, 1.0, ["layer2", "layer4"], [1.0, 1.0])
    students = {}
    for nhwc in (False, True):
        students[nhwc] = fresh_copy(teacher, 0)
        distill(students[nhwc], teacher, images, weights,
                Schedule(epochs=1, batch_size=8, channels_last=nhwc, precision="fp32"), ViewConfig(), tmp_path / f"{nhwc}.pt")
    # the layout changes the order of float sums, not the training: after one epoch (two Adam steps of at most
    # ~lr each) the weights agree, bar the odd element whose near-zero gradient took the other sign
    for (name, a), b in zip(students[False].state_dict().items(), students[True].state_dict().values()):
        if a.is_floating_point():
            assert (a - b).abs().max() <= 2 * 2 * 1e-3 and (a - b).norm() <= 0.05 * a.norm() + 1e-6, name
    assert all(p.is_contiguous() for p in students[True].parameters())
    assert all(p.is_contiguous() for p in teacher.parameters())
    save_encoder(students[True], tmp_path / "student.safetensors")  # safetensors refuses non-contiguous tensors


def test_distill_runs_the_networks_in_the_precision_asked_and_every_loss_in_fp32(teacher, tmp_path):
    from encoder_guard.augment import ViewConfig
    from encoder_guard.defenses.distill import LossWeights, Schedule, distill, fresh_copy

    images = (torch.rand(16, 1, 16, 16) * 255).to(torch.uint8)
    dtypes = []

    class Spy(torch.nn.Module):
        def forward(self, v):
            feats = teacher(v)
            dtypes.append(feats.dtype)
            return feats

        def forward_intermediates(self, v, taps):
            feats, maps = teacher.forward_intermediates(v, taps)
            dtypes.append(feats.dtype)
            return feats, maps

    weights = LossWeights(1.0, 1.0, 1.0, ["layer2", "layer4"], [1.0, 1.0])
    students, history = {}, {}
    for precision in ("fp32", "bf16"):
        dtypes.clear()
        students[precision] = fresh_copy(teacher, 0)
        history[precision] = distill(students[precision], Spy(), images, weights,
                                     Schedule(epochs=1, batch_size=8, precision=precision), ViewConfig(),
                                     tmp_path / f"{precision}.pt", clone_space="standardised")
        # the statistics pass and both steps ran the teacher under that precision
        assert set(dtypes) == {torch.float32 if precision == "fp32" else torch.bfloat16}, precision
        assert all(p.dtype == torch.float32 for p in students[precision].parameters())  # the weights stay fp32
    for key in ("ssl", "clone", "attention"):
        assert history["bf16"][0][key] == pytest.approx(history["fp32"][0][key], rel=0.05), key
    with pytest.raises(ValueError, match="precision must be one of"):
        Schedule(precision="fp16")


def test_student_noise_blends_the_students_taught_view_and_leaves_the_teachers_clean(teacher, tmp_path):
    from encoder_guard.augment import ViewConfig
    from encoder_guard.defenses.distill import LossWeights, Schedule, StudentNoise, distill, fresh_copy

    images = (torch.rand(16, 1, 16, 16) * 255).to(torch.uint8)
    identity = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    weights = LossWeights(1.0, 1.0, 1.0, ["layer4"], [1.0])
    for noise, noised in ((StudentNoise(alpha=0.5, p=1.0), True), (StudentNoise(alpha=0.5, p=0.0), False), (None, False)):
        student, taught, student_inputs = fresh_copy(teacher, 0), [], []

        class Spy(torch.nn.Module):
            def forward_intermediates(self, v, taps):
                taught.append(v.clone())
                return teacher.forward_intermediates(v, taps)

        def record(v, taps, _forward=student.forward_intermediates):
            student_inputs.append(v.detach().clone())
            return _forward(v, taps)

        student.forward_intermediates = record
        distill(student, Spy(), images, weights, Schedule(epochs=1, batch_size=8), ViewConfig(), tmp_path / "s.pt",
                teacher_views=identity, student_noise=noise)
        for t, s in zip(taught, student_inputs):
            assert all(any(torch.allclose(x, img.float() / 255, atol=1e-6) for img in images) for x in t)  # clean
            gap = (s[8:] - t).abs().flatten(1).amax(1)
            assert bool((gap > 1e-3).all()) if noised else torch.equal(s[8:], t)
            assert float(gap.max()) <= 0.5 + 1e-6  # (1 − α)·v + α·u moves a pixel by at most α
    with pytest.raises(ValueError, match="student noise"):
        StudentNoise(alpha=1.5)


def test_student_noise_patch_replaces_one_square_and_warp_moves_pixels_smoothly():
    from encoder_guard.defenses.distill import StudentNoise

    g = torch.Generator().manual_seed(0)
    v = torch.rand(64, 3, 28, 28)
    patched = StudentNoise(patch=1.0, patch_side=(0.2, 0.3))(v, g)
    for before, after in zip(v, patched):
        rows, cols = (after != before).any(0).nonzero(as_tuple=True)
        assert len(rows) > 0
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert height <= round(0.3 * 28) and width <= round(0.3 * 28)  # inside one square of the drawn side
        assert len(rows) <= height * width
    warped = StudentNoise(warp=1.0)(v, g)
    assert bool(((warped - v).abs().flatten(1).amax(1) > 1e-3).all())
    smooth = torch.zeros(4, 1, 28, 28) + torch.linspace(0, 1, 28)  # a ramp: a sub-pixel warp keeps it near a ramp
    assert float((StudentNoise(warp=1.0, warp_strength=1.0)(smooth, g) - smooth).abs().max()) < 0.1
    kept = StudentNoise(alpha=0.0, patch=0.0, warp=0.0)
    assert not kept.active and torch.equal(kept(v, g), v)
    with pytest.raises(ValueError, match="patch_side"):
        StudentNoise(patch=0.5, patch_side=(0.4, 0.2))
    with pytest.raises(ValueError, match="warp_strength"):
        StudentNoise(warp=0.5, warp_strength=0.0)
