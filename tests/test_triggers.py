import numpy as np
import pytest
import torch

from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import (
    TRIGGERS,
    BlendTrigger,
    CTRLTrigger,
    PatchTrigger,
    WarpTrigger,
    build_trigger,
    load_reference_images,
    load_trigger,
    save_reference_images,
    save_trigger,
)
from encoder_guard.triggers.ctrl import dct_matrix, rgb_to_ycrcb, ycrcb_to_rgb


def all_triggers():
    return [
        PatchTrigger.square(32, 3),
        PatchTrigger.square(28, 1, size=5, position=(2, 3), pattern="random", seed=3),
        BlendTrigger.noise(28, 1, alpha=0.3, seed=1),
        CTRLTrigger(32, 3),
        CTRLTrigger(28, 1, magnitude=60),
        PatchTrigger.square(28, 1, size=4, position="center", pattern="checkerboard"),
        WarpTrigger.wanet(28, 1, seed=2),
        WarpTrigger.wanet(32, 3, k=8, strength=1.0),
    ]


@pytest.mark.parametrize("trigger", all_triggers(), ids=lambda t: t.kind)
def test_triggers_are_deterministic_and_round_trip_bit_exactly(trigger, tmp_path):
    c = trigger.params()["channels"]
    size = trigger.params()["size"][0] if "size" in trigger.params() else trigger.params()["image_size"]
    x = torch.rand(4, c, size, size, generator=torch.Generator().manual_seed(0))
    a, b = trigger.apply(x), trigger.apply(x.clone())
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    loaded = load_trigger(save_trigger(trigger, tmp_path / "t.safetensors"))
    assert type(loaded) is type(trigger) and loaded.params() == trigger.params()
    assert torch.equal(loaded.apply(x), a)
    assert loaded.key() == trigger.key()
    for name, t in trigger.tensors().items():
        assert torch.equal(loaded.tensors()[name], t)


def test_registry_holds_every_kind():
    assert TRIGGERS.names() == ["blend", "ctrl", "patch", "warp"]


def test_warp_samples_x_then_y_and_is_the_identity_on_the_identity_grid():
    line = torch.linspace(-1, 1, 8)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(WarpTrigger(torch.stack([cols, rows], -1), 1)(x), x, atol=1e-6)
    step = 2 / 7  # one pixel in grid units; sampling one pixel to the right shifts the image left
    shifted = WarpTrigger(torch.stack([(cols + step).clamp(-1, 1), rows], -1), 1)(x)
    assert torch.allclose(shifted[..., :, :-1], x[..., :, 1:], atol=1e-6)


def test_wanet_field_is_seeded_smooth_and_sub_pixel_at_the_papers_strength():
    a, b = WarpTrigger.wanet(28, 1, seed=0), WarpTrigger.wanet(28, 1, seed=1)
    assert torch.equal(a.grid, WarpTrigger.wanet(28, 1, seed=0).grid) and not torch.equal(a.grid, b.grid)
    line = torch.linspace(-1, 1, 28)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    shift_px = (a.grid - torch.stack([cols, rows], -1)) * 27 / 2
    assert 0.05 < float(shift_px.abs().mean()) < 0.5 and float(shift_px.abs().max()) < 1.5  # 0.5/28 of a mean-1 field
    inner = shift_px[1:-1, 1:-1]  # the border is clamped onto the image, as in WaNet
    assert float((inner[1:] - inner[:-1]).abs().max()) < 0.2  # smooth: neighbours move together
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert float((WarpTrigger.wanet(28, 1, strength=2.0)(x) - x).abs().mean()) > float((a(x) - x).abs().mean())
    with pytest.raises(ValueError, match="control points"):
        WarpTrigger.wanet(28, 1, k=1)


def test_checkerboard_patch_alternates_inside_its_square_only():
    t = PatchTrigger.square(16, 1, size=4, position=(2, 3), pattern="checkerboard")
    out = t(torch.full((1, 1, 16, 16), 0.5))[0, 0]
    assert torch.equal(out[2:6, 3:7], torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]]).repeat(2, 1))
    out[2:6, 3:7] = 0.5
    assert torch.equal(out, torch.full((16, 16), 0.5))


def test_badencoder_default_square_sits_at_rows_21_to_30():
    t = PatchTrigger.square(32, 3)
    rows, cols = torch.nonzero(t.mask[0], as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (21, 30, 21, 30)
    t224 = PatchTrigger.square(224, 3, size=50, margin=2)
    rows, _ = torch.nonzero(t224.mask[0], as_tuple=True)
    assert (rows.min(), rows.max()) == (172, 221) or (rows.min(), rows.max()) == (173, 222)


def test_badencoder_npz_applies_exactly_like_badencoder(tmp_path):
    """BadEncoder applies ``img * tm[0] + t[0]`` on uint8 HWC images; ours must give the same pixels."""
    rng = np.random.default_rng(0)
    tm = np.ones((1, 32, 32, 3), np.uint8)
    t = np.zeros((1, 32, 32, 3), np.uint8)
    tm[0, 5:9, 10:14] = 0
    t[0, 5:9, 10:14] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "trigger.npz", t=t, tm=tm)
    trig = load_trigger(tmp_path / "trigger.npz")
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ref = imgs * tm[0] + t[0]
    ours = trig.apply(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    ours = (ours * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, ref)
    # and our patch exports to the same layout
    save_trigger(trig, tmp_path / "again.npz")
    again = np.load(tmp_path / "again.npz")
    assert np.array_equal(again["t"][0], t[0]) and np.array_equal(again["tm"][0], tm[0])


def test_ctrl_matches_a_scipy_dct_reference():
    from scipy.fft import dctn, idctn

    trig = CTRLTrigger(32, 3, magnitude=100)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ycc = rgb_to_ycrcb(x.double() * 255).numpy()
    for ch in (1, 2):
        coef = dctn(ycc[:, ch], axes=(1, 2), norm="ortho")
        coef[:, 15, 15] += 100
        coef[:, 31, 31] += 100
        ycc[:, ch] = idctn(coef, axes=(1, 2), norm="ortho")
    ref = (ycrcb_to_rgb(torch.from_numpy(ycc)) / 255).clamp(0, 1).float()
    assert torch.allclose(trig.apply(x), ref, atol=1e-4)
    d = dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=d.dtype), atol=1e-10)


def test_ycrcb_round_trip():
    x = torch.rand(3, 3, 8, 8) * 255
    assert torch.allclose(ycrcb_to_rgb(rgb_to_ycrcb(x)), x, atol=0.2)


def test_bad_trigger_input_is_explained(tmp_path):
    with pytest.raises(EncoderGuardError, match="does not exist"):
        load_trigger(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(EncoderGuardError, match="'t' and 'tm'"):
        load_trigger(tmp_path / "x.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(EncoderGuardError, match="not a readable trigger"):
        load_trigger(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="3-channel"):
        PatchTrigger.square(32, 3).apply(torch.rand(1, 1, 32, 32))
    with pytest.raises(EncoderGuardError, match="unknown trigger kind"):
        build_trigger({"kind": "laser"}, 32, 3)
    with pytest.raises(EncoderGuardError, match="does not fit"):
        build_trigger({"kind": "patch", "size": 10, "position": [25, 25]}, 32, 3)


def test_reference_images_round_trip(tmp_path):
    x = torch.rand(3, 1, 28, 28)
    back = load_reference_images(save_reference_images(x, tmp_path / "ref.npz"))
    assert back.shape == x.shape and (back - x).abs().max() <= 0.5 / 255 + 1e-6


def test_cli_makes_a_trigger_file_that_loads_as_the_preset_keys_describe(tmp_path, capsys):
    from encoder_guard.cli import main

    out = tmp_path / "badnets3.safetensors"
    assert main(["trigger", "make", "--image-size", "28", "--channels", "1", "--set", "size=3", "--out", str(out)]) == 0
    made, expected = load_trigger(out), PatchTrigger.square(28, 1, size=3)
    assert torch.equal(made.mask, expected.mask) and torch.equal(made.pattern, expected.pattern)
    assert made.params()["box"] == [24, 24, 26, 26]
    assert main(["trigger", "show", str(out), "--dataset", "synthetic", "--out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 0
    blend = tmp_path / "blend.safetensors"
    main(["trigger", "make", "--image-size", "32", "--channels", "3", "--set", "kind=blend", "--set", "alpha=0.1",
          "--out", str(blend)])
    assert isinstance(load_trigger(blend), BlendTrigger)
    assert main(["trigger", "make", "--image-size", "28", "--channels", "1", "--set", "kind=nope", "--out", str(blend)]) != 0
    assert "unknown trigger kind 'nope'" in capsys.readouterr().err
