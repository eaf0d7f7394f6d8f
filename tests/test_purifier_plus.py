"""Purifier+ and its ablation without importance rating: plug-ins fitted on clean activations, saved with the encoder,
cutting outliers."""

import copy

import pytest
import torch

from encoder_guard.data import make_synthetic
from encoder_guard.defenses import DEFENSES, DefenseData
from encoder_guard.defenses.purifier_plus import PurifierPlus, PurifierPlusNoRating
from encoder_guard.defenses.runner import defend_config, run_defense
from encoder_guard.encoders import load_encoder, save_encoder
from encoder_guard.encoders.plugins import ActivationAlignment
from encoder_guard.errors import CheckpointError


@pytest.fixture(scope="module")
def data() -> DefenseData:
    return DefenseData(make_synthetic(size=256, image_size=16, seed=0), pretraining_size=5120)


@pytest.mark.parametrize("granularity", ["channel", "cube", "feature"])
def test_alignment_clamps_each_unit_into_its_range(granularity):
    plug = ActivationAlignment(granularity, channels=3, size=4)
    x = torch.randn(5, 3, 4, 4) * 3
    assert torch.equal(plug(x), x)  # identity before fitting
    plug.hi.fill_(1.0)
    plug.lo.fill_(0.0 if granularity != "cube" else 0.0)
    y = plug(x)
    if granularity == "cube":
        assert torch.all(y.norm(dim=1) <= 1.0 + 1e-5)
        keep = x.norm(dim=1, keepdim=True) <= 1
        assert torch.allclose(torch.where(keep, y, x), x)  # in-range cubes untouched, directions kept
        cos = torch.nn.functional.cosine_similarity(y, x, dim=1)
        assert torch.all(cos > 0.999)
    else:
        assert y.min() >= 0 and y.max() <= 1
    plug.gain.fill_(2.0)
    assert torch.allclose(plug(x), 2 * y)


@pytest.mark.parametrize("granularity", ["channel", "cube", "feature"])
def test_gate_peak_is_the_largest_per_position_mean_of_the_scaled_excess(granularity):
    torch.manual_seed(0)
    plug = ActivationAlignment(granularity, channels=3, size=4, gated=True)
    x = torch.randn(6, 3, 4, 4) * 2
    values = x.norm(dim=1, keepdim=True) if granularity == "cube" else x
    assert torch.all(plug.excess(x) == 0)  # unfitted: nothing is in excess
    plug.hi.copy_(torch.rand_like(plug.hi))
    plug.scale.copy_(torch.rand_like(plug.scale) + 0.1)
    expected = ((values - plug.hi).relu() / plug.scale).mean(dim=1).flatten(1).amax(1)
    assert torch.allclose(plug.excess(x), expected, atol=1e-5)


def test_the_gate_catches_one_raised_position_that_a_whole_map_mean_would_dilute():
    x = -torch.ones(2, 8, 4, 4)  # every unit below hi = 0 ...
    x[1, :, 3, 3] = 4.0  # ... except one position of the second input: a patch trigger's corner
    plug = ActivationAlignment("feature", channels=8, size=4, gated=True)
    plug.hi.zero_()
    plug.gate.fill_(0.5)  # the map's mean excess is 4/16 = 0.25, its peak 4
    assert plug.excess(x).tolist() == [0.0, 4.0]
    out = plug(x)
    assert [bool((out[i] != x[i]).any()) for i in range(2)] == [False, True]


def test_a_plug_in_description_this_version_cannot_build_is_a_checkpoint_error():
    from encoder_guard.encoders.plugins import build_plugin

    assert build_plugin({"kind": "align", "granularity": "feature", "channels": 4, "size": 2, "gated": True}).gated
    with pytest.raises(CheckpointError, match="cannot build"):
        build_plugin({"kind": "align", "granularity": "feature", "channels": 4, "size": 2, "mode": "x"})
    with pytest.raises(CheckpointError, match="cannot build"):
        build_plugin({"kind": "warp", "channels": 4})


def test_gated_alignment_overwrites_its_input_only_when_told_and_autograd_allows():
    plug = ActivationAlignment("feature", channels=2, size=2, gated=True)
    plug.hi.fill_(1.0)
    plug.gate.fill_(0.5)
    x = torch.full((3, 2, 2, 2), 0.5)
    x[1] = 4.0  # the one flagged row
    expected = x.clone()
    expected[1] = 1.0
    kept = x.clone()
    assert torch.equal(plug(x), expected) and torch.equal(x, kept)  # a direct call copies
    assert torch.equal(plug(x, inplace=True), expected) and torch.equal(x, expected)  # the hook's call does not
    leaf = kept.clone().requires_grad_()
    y = leaf * 1.0
    plug(y, inplace=True).sum().backward()  # autograd needs y intact: copied even when told
    assert torch.equal(y.detach(), kept) and torch.equal(leaf.grad[1], torch.zeros(2, 2, 2))


@pytest.mark.parametrize("granularity", ["channel", "cube", "feature"])
def test_alignment_without_rating_keeps_clean_features_and_cuts_outliers(encoder, data, granularity, tmp_path):
    result = PurifierPlusNoRating(granularity=granularity, taps=["layer3", "layer4"], quantile=0.99)(encoder, data, tmp_path)
    pure = result.model
    x = data.clean.float_images()
    with torch.no_grad():
        clean_cos = torch.nn.functional.cosine_similarity(pure(x), encoder(x)).mean()
    assert clean_cos > 0.97
    for tap in ("layer3", "layer4"):
        assert result.report["layers"][tap]["clean_values_clipped"] <= 0.03
    # an activation far outside the clean range is cut back at layer4
    with torch.no_grad():
        _, (m,) = encoder.forward_intermediates(x[:4], ["layer4"])
        plug = pure.plugins["layer4"]
        big = plug(m * 50)
    assert big.abs().max() < (m * 50).abs().max()
    assert "layer4" in pure.spec.plugins and not encoder.plugins  # the original encoder is untouched


def test_a_sample_flagged_at_one_tap_is_aligned_at_the_later_ones():
    from encoder_guard.encoders.plugins import SampleFlags

    flags = SampleFlags()
    first, second = ActivationAlignment("feature", 2, 2, gated=True), ActivationAlignment("feature", 2, 2, gated=True)
    for plug in (first, second):
        plug.hi.fill_(1.0)
        plug.gate.fill_(0.5)
        plug.shared = flags
    x = torch.full((2, 2, 2, 2), 0.5)
    x[0] = 3.0  # sample 0 is far out at the first tap
    first(x)
    y = torch.full((2, 2, 2, 2), 1.2)  # at the second tap both samples exceed hi, neither by enough to flag
    out = second(y)
    assert torch.all(out[0] == 1.0) and torch.all(out[1] == 1.2)
    flags.reset()  # a new pass: nothing carried over
    assert torch.all(second(y) == 1.2)


def test_flags_record_the_rows_first_caught_after_the_first_gated_tap():
    from encoder_guard.encoders.plugins import SampleFlags

    flags = SampleFlags()
    flags.merge(torch.tensor([True, False, False]))
    flags.merge(torch.tensor([False, True, False]))
    assert flags.flags.tolist() == [True, True, False] and flags.late.tolist() == [False, True, False]
    flags.reset(force=True)
    assert flags.merge(torch.tensor([False, False, False])).all()  # the second pass aligns every row


def test_a_row_caught_late_is_run_again_with_every_tap_aligned(encoder):
    enc = copy.deepcopy(encoder)
    stem, layer1 = ActivationAlignment("feature", 16, 16, gated=True), ActivationAlignment("feature", 16, 16, gated=True)
    enc.attach("stem", stem)
    enc.attach("layer1", layer1)
    stem.hi.fill_(0.0)  # aligning at the stem zeroes the map, but the stem's gate flags nothing
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        _, (before,) = enc.forward_intermediates(x, ["stem"])
        assert before.abs().sum() > 0
        layer1.hi.fill_(1e6)
        layer1.gate.fill_(-1.0)  # now layer1 flags every row, after the stem let them through
        feats, (after,) = enc.forward_intermediates(x, ["stem"])
        assert torch.all(after == 0)  # the second pass aligned the stem too
        assert torch.allclose(feats, enc(x)) and enc._flags.flags is None


@pytest.mark.parametrize("granularity", ["channel", "cube", "feature"])
def test_the_dense_path_of_accelerators_gives_the_row_path_features(encoder, data, granularity, tmp_path, monkeypatch):
    from encoder_guard.encoders import plugins

    purified = PurifierPlusNoRating(granularity=granularity, taps=["stem", "layer2", "layer4"], gate=0.8, gate_taps=None,
                     local_taps=())(encoder, data, tmp_path).model
    x = data.clean.float_images()[:64].clone()
    x[::3, :, 4:9, 4:9] = 1.0  # outliers for the gates to catch, at one tap or another
    with torch.no_grad():
        rows = purified(x)
        purified.second_pass = False
        purified(x)
        caught = purified._flags.flags.clone()
        monkeypatch.setattr(plugins, "_dense", lambda t: True)  # what a CUDA map takes, here on CPU
        purified(x)
        assert torch.equal(purified._flags.flags, caught) and 0 < caught.sum() < len(x)
        purified.second_pass = True
        assert torch.allclose(purified(x), rows, atol=1e-6)
    # fitting on the dense path (unfitted plug-ins score NaN there, and flag nothing) gives the same plug-ins
    again = PurifierPlusNoRating(granularity=granularity, taps=["stem", "layer2", "layer4"], gate=0.8, gate_taps=None,
                     local_taps=())(encoder, data, tmp_path).model
    for (name, a), b in zip(purified.plugins.state_dict().items(), again.plugins.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_with_gate_taps_only_those_score_and_a_caught_row_is_aligned_at_every_tap(encoder, data, tmp_path, monkeypatch):
    from encoder_guard.encoders import plugins

    taps = ["stem", "layer2", "layer4"]
    result = PurifierPlusNoRating(taps=taps, gate=0.8, gate_taps=["layer4"], local_taps=())(encoder, data, tmp_path)
    purified, layers = result.model, result.report["layers"]
    assert layers["stem"]["detects"] is False and layers["layer2"]["gate"] is None and layers["layer4"]["gate"] is not None
    stem = purified.plugins["stem"]
    stem.shared = None
    far = torch.full((2, 16, 16, 16), 1e3)
    assert torch.equal(stem(far), far)  # scores nothing itself: what nothing flagged passes unchanged
    stem.shared = purified._flags
    x = data.clean.float_images()[:64].clone()
    x[::3, :, 4:9, 4:9] = 1.0
    everything = copy.deepcopy(purified)
    everything.plugins["layer4"].gate.fill_(-float("inf"))  # flags every row, so every tap aligns every row
    with torch.no_grad():
        purified.second_pass = False
        purified(x)
        caught = purified._flags.flags.clone()
        purified.second_pass = True
        out = purified(x)
        assert 0 < caught.sum() < len(x)
        assert torch.allclose(out[caught], everything(x)[caught], atol=1e-6)  # caught at layer4: aligned from the stem
        assert torch.allclose(out[~caught], encoder(x)[~caught], atol=1e-6)  # the rest untouched
        monkeypatch.setattr(plugins, "_dense", lambda t: True)  # an accelerator's path gives the same
        assert torch.allclose(purified(x), out, atol=1e-6)
        monkeypatch.undo()
    back = load_encoder(save_encoder(purified, tmp_path / "g.safetensors")).eval()
    assert back.spec.plugins["stem"]["detect"] is False and "detect" not in back.spec.plugins["layer4"]
    with torch.no_grad():
        assert torch.allclose(back(x), out, atol=1e-6)
    with pytest.raises(ValueError, match="gate_taps"):
        PurifierPlusNoRating(taps=taps, gate_taps=["layer3"])  # none of the taps
    with pytest.raises(ValueError, match="unknown"):
        PurifierPlusNoRating(taps=taps, gate_taps=["layer4", "layer9"])
    assert PurifierPlusNoRating(taps=["layer4"], gate_taps=["layer3", "layer4"]).gate_taps == ["layer4"]  # the preset's, other taps
    with pytest.raises(ValueError, match="detect=False"):
        ActivationAlignment("feature", 2, 2, detect=False)  # ungated: aligns every input, nothing to follow


@pytest.mark.parametrize("granularity", ["channel", "cube", "feature"])
def test_local_alignment_sets_only_the_anomalous_positions_to_the_middle_of_their_range(granularity):
    torch.manual_seed(0)
    plug = ActivationAlignment(granularity, channels=3, size=4, local=True)
    x = torch.rand(2, 3, 4, 4) * 0.5 + 0.25  # within [0, 1] everywhere
    assert torch.equal(plug(x), x)  # unfitted: no position is anomalous
    plug.lo.fill_(0.0)
    plug.hi.fill_(1.0 if granularity != "cube" else 2.0)
    plug.spot.fill_(0.5)
    x[0, :, 1, 2] = 9.0  # one raised position in the first sample
    y = plug(x)
    spots = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    spots[0, 0, 1, 2] = True
    assert torch.equal(plug.position_excess(x) > plug.spot, spots[:, 0])
    assert torch.equal(torch.where(spots, x, y), x)  # every other position keeps its activation
    if granularity == "cube":  # the channel vector rescaled to the middle norm, its direction kept
        assert torch.allclose(y[0, :, 1, 2].norm(), torch.tensor(1.0))
    else:
        assert torch.allclose(y[0, :, 1, 2], torch.full((3,), 0.5))


def test_local_taps_replace_a_caught_inputs_anomalous_positions_and_round_trip(encoder, data, tmp_path):
    taps = ["stem", "layer4"]
    result = PurifierPlusNoRating(taps=taps, gate=0.8, gate_taps=["layer4"], local_taps=["stem"], local_quantile=0.9)(
        encoder, data, tmp_path)
    purified, stem = result.model, result.report["layers"]["stem"]
    plug = purified.plugins["stem"]
    assert plug.local and not purified.plugins["layer4"].local
    assert 0.05 <= stem["clean_positions_replaced"] <= 0.15  # out of sample, at the clean positions' 0.9 quantile
    x = data.clean.float_images()[:64].clone()
    x[::3, :, 4:9, 4:9] = 1.0
    with torch.no_grad():
        _, (raw,) = encoder.forward_intermediates(x, ["stem"])
        _, (seen,) = purified.forward_intermediates(x, ["stem"])  # caught at layer4, aligned from the stem
        out = purified(x)
        back = load_encoder(save_encoder(purified, tmp_path / "l.safetensors")).eval()
        assert torch.allclose(back(x), out, atol=1e-6)
    spots = (plug.position_excess(raw) > plug.spot).unsqueeze(1)
    changed = (seen != raw).any(1, keepdim=True)
    assert changed.any() and not (changed & ~spots).any()  # caught inputs changed at anomalous positions only
    assert changed.flatten(1).float().mean(1).max() < 0.5  # the rest of their maps kept
    assert back.spec.plugins["stem"]["local"] is True and "local" not in back.spec.plugins["layer4"]
    assert float(back.plugins["stem"].spot) == float(plug.spot)
    with pytest.raises(ValueError, match="local_taps"):
        PurifierPlusNoRating(taps=taps, local_taps=["layer9"])
    with pytest.raises(ValueError, match="local_quantile"):
        PurifierPlusNoRating(taps=taps, local_quantile=1.0)


def test_unit_scales_have_a_floor_so_no_dead_unit_decides_the_gate():
    from encoder_guard.defenses.purifier_plus import _scale

    values = torch.randn(500, 10)
    values[:, 0] = 0.0  # a unit clean data never moves (the stem over a black border)
    scale = _scale(values)
    assert scale[0] >= 0.1 * values[:, 1:].std(0).median() * 0.9
    assert torch.allclose(scale[1:], values[:, 1:].std(0))


@pytest.mark.parametrize("granularity", ["channel", "cube", "feature"])
def test_gated_alignment_leaves_typical_inputs_alone_and_aligns_outliers(encoder, data, granularity, tmp_path):
    result = PurifierPlusNoRating(granularity=granularity, taps=["layer4"], quantile=0.8, gate=0.9)(encoder, data, tmp_path)
    layer = result.report["layers"]["layer4"]
    assert 0.05 <= layer["clean_inputs_aligned"] <= 0.15  # the gate sits at the clean inputs' 0.9 quantile
    plug = result.model.plugins["layer4"]
    plug.shared = None  # called alone below, outside an encoder pass
    with torch.no_grad():
        _, (m,) = encoder.forward_intermediates(data.clean.float_images()[:64], ["layer4"])
        out = plug(m)
        passed = plug.excess(m) <= plug.gate
        assert passed.sum() > 40 and torch.equal(out[passed], m[passed])  # typical inputs untouched
        boosted = m * 20  # an input far beyond the clean range on every unit is aligned
        assert torch.all(plug.excess(boosted) > plug.gate)
        assert plug(boosted).abs().max() < boosted.abs().max()
    path = save_encoder(result.model, tmp_path / "g.safetensors")
    back = load_encoder(path).eval()
    x = data.clean.float_images()[:8]
    with torch.no_grad():
        assert torch.allclose(back(x), result.model(x), atol=1e-6)
    assert back.spec.plugins["layer4"]["gated"] is True
    with pytest.raises(ValueError, match="gate"):
        PurifierPlusNoRating(gate=1.5)


def test_purified_encoder_round_trips_through_a_checkpoint(encoder, data, tmp_path):
    pure = PurifierPlus(granularity="feature", taps=["layer4"])(encoder, data, tmp_path).model
    path = save_encoder(pure, tmp_path / "p.safetensors")
    back = load_encoder(path).eval()
    x = data.clean.float_images()[:8]
    with torch.no_grad():
        assert torch.allclose(back(x), pure(x), atol=1e-6)
    assert back.spec.plugins == pure.spec.plugins
    assert back.digest() == pure.digest()
    # a file whose plug-in tensors were removed is refused with the reason
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if not k.startswith("plugins.")}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="plug-in tensors"):
        load_encoder(tmp_path / "bad.safetensors")


def test_purifier_plus_suppresses_least_important_units_and_keeps_mass(encoder, data, tmp_path):
    result = DEFENSES.get("purifier-plus")(granularity="channel", taps=["layer4"], suppress=0.25)(encoder, data, tmp_path)
    layer = result.report["layers"]["layer4"]
    assert layer["suppressed"] == 32 and layer["boosted"] == 96 and layer["boost"] >= 1.0
    gain = result.model.plugins["layer4"].gain.flatten()
    assert int((gain == 0).sum()) == 32
    assert layer["rating_share_suppressed"] < 0.25  # the silenced quarter carries less than a quarter of the rating


def test_purifier_plus_no_rating_runs_from_the_cli_preset(encoder, tmp_path):
    cfg = defend_config("purifier-plus-no-rating", sets=["data.dataset=synthetic", "data.fraction=null", "data.count=25"])
    report = run_defense("purifier-plus-no-rating", cfg, copy.deepcopy(encoder), tmp_path / "run")
    assert report["data"]["images"] == 25 and report["layers"]["layer4"]["units"] == 128 * 2 * 2
    assert load_encoder(tmp_path / "run" / "encoder.safetensors").spec.provenance["defense"] == "purifier-plus-no-rating"
