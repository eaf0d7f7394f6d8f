"""SSL-Cleanse's unlearning: a stamped view is taught to embed like its clean self, from a trigger file or a scan."""

import pytest
import torch
import torch.nn.functional as F

from encoder_guard.data.synthetic import make_synthetic
from encoder_guard.defenses import DEFENSES
from encoder_guard.defenses.runner import defend_config, run_defense
from encoder_guard.defenses.ssl_cleanse import TriggerStamp
from encoder_guard.encoders import Encoder, load_encoder, make_spec
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import PatchTrigger, save_trigger

FAST = ["data.dataset=synthetic", "data.fraction=null", "data.count=128", "data.allow_more=true",
        "defense.schedule.batch_size=32", "defense.schedule.checkpoint_every=1", "train.threads=1"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """An untrained ResNet-10 whose BatchNorm statistics are those of the synthetic images (as a trained
    encoder's are of its data), so that a student copy in train mode starts as the frozen teacher."""
    torch.manual_seed(5)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16))
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average
    with torch.no_grad():
        enc.train()(make_synthetic(size=256, num_classes=4, seed=1).images.float() / 255)
    return enc.eval()


def corner_trigger() -> PatchTrigger:
    mask = torch.zeros(1, 16, 16)
    mask[:, -5:, -5:] = 1
    return PatchTrigger(mask, torch.ones(1, 16, 16))


def agreement(a: Encoder, b: Encoder, xa: torch.Tensor, xb: torch.Tensor) -> float:
    """Mean cosine of ``a(xa)`` and ``b(xb)`` after centring both on ``b``'s mean clean feature: an untrained
    ResNet's ReLU features share the positive orthant, where every raw cosine is near 1."""
    with torch.no_grad():
        mu = b.eval()(xb).mean(0)
        return float(F.cosine_similarity(a.eval()(xa) - mu, b(xb) - mu).mean())


def test_trigger_stamp_stamps_the_share_asked_and_leaves_the_rest():
    v = torch.zeros(400, 1, 16, 16)
    out = TriggerStamp(corner_trigger(), 0.25)(v, torch.Generator().manual_seed(0))
    stamped = out[:, 0, -1, -1] == 1
    assert 70 < int(stamped.sum()) < 130
    assert torch.equal(out[~stamped], v[~stamped]) and bool((out[stamped][..., :11, :] == 0).all())
    with pytest.raises(ValueError, match="trigger_p"):
        TriggerStamp(corner_trigger(), 0.0)


def test_unlearning_makes_stamped_images_embed_like_their_clean_selves(encoder, tmp_path):
    save_trigger(corner_trigger(), tmp_path / "trigger.safetensors")
    sets = FAST + [f"defense.trigger={tmp_path / 'trigger.safetensors'}", "defense.schedule.epochs=20",
                   "defense.schedule.lr=1e-3"]
    report = run_defense("ssl-cleanse", defend_config("ssl-cleanse", sets=sets), encoder, tmp_path / "run")
    defended = load_encoder(tmp_path / "run" / "encoder.safetensors")
    x = make_synthetic(size=64, num_classes=4, seed=9).images.float() / 255
    stamped = corner_trigger().apply(x)
    before, after = agreement(encoder, encoder, stamped, x), agreement(defended, encoder, stamped, x)
    clean = agreement(defended, encoder, x, x)
    assert after > before + 0.05  # the trigger lost its pull: a stamped image lands nearer its clean embedding
    assert clean - after < 0.5 * (1 - before)  # the trigger's displacement more than halved, against clean drift
    assert clean > 0.85  # clean images keep theirs
    assert report["trigger_file"].endswith("trigger.safetensors") and "PatchTrigger" in report["trigger"]
    assert report["history"][-1]["clone"] < report["history"][0]["clone"]


def test_without_a_trigger_the_scan_inverts_one_first(encoder, tmp_path):
    sets = FAST + ["defense.schedule.epochs=1", "defense.scan.window=0.25", "defense.scan.stride=0.25",
                   "defense.scan.samples=64", "defense.scan.holdout=32", "defense.scan.screen_steps=2",
                   "defense.scan.steps=4"]
    report = run_defense("ssl-cleanse", defend_config("ssl-cleanse", sets=sets), encoder, tmp_path / "run")
    assert report["scan"]["scanner"] == "collapse" and 0.0 <= report["scan"]["score"] <= 1.0
    assert report["scan"]["trigger"]["mask_shape"] == [16, 16] and "PatchTrigger" in report["trigger"]


def test_bad_settings_name_the_problem(encoder, tmp_path):
    cls = DEFENSES.get("ssl-cleanse")
    with pytest.raises(ValueError, match="student_noise"):
        cls(student_noise={"patch": 0.5})
    with pytest.raises(ValueError, match="clone"):
        cls(clone=0.0)
    sets = FAST + [f"defense.trigger={tmp_path / 'missing.safetensors'}"]
    with pytest.raises(EncoderGuardError, match="missing.safetensors"):
        run_defense("ssl-cleanse", defend_config("ssl-cleanse", sets=sets), encoder, tmp_path / "run")
