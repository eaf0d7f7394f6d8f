"""The downstream classifier (encoder + head): Head algebra, checkpoints, Encoder.forward_from and Tail."""


import pytest
import torch
from safetensors.torch import save_file

from downstream.classifier import (
    HEAD_FILE,
    Classifier,
    Head,
    fit_classifier,
    load_classifier,
    load_head,
    save_classifier,
)
from downstream.linear import fit_linear_probe
from encoder_guard.data import make_synthetic
from encoder_guard.defenses.tail import Tail
from encoder_guard.encoders import Encoder, make_spec
from encoder_guard.encoders.encoder import TAP_NAMES
from encoder_guard.encoders.plugins import ActivationAlignment
from encoder_guard.errors import CheckpointError


@pytest.fixture(scope="module")
def train():
    return make_synthetic(size=256, image_size=16, seed=0)


@pytest.fixture(scope="module")
def clf(encoder, train) -> Classifier:
    return fit_classifier(encoder, train, cache=False)


def blobs(n=300, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(n) % classes
    scale = torch.rand(dim, generator=g) * 4 + 0.5  # dimensions of different spread: standardisation matters
    mean = torch.randn(dim, generator=g) * 5
    return (centers[y] + torch.randn(n, dim, generator=g)) * scale + mean, y


# ------------------------------------------------------------------------------------------------ Head


def test_head_from_probe_gives_the_probes_logits():
    x, y = blobs()
    probe = fit_linear_probe(x, y, 3)
    head = Head.from_probe(probe)
    assert not head.clipped
    with torch.no_grad():
        assert torch.allclose(head(x), probe.logits(x), atol=1e-4, rtol=1e-4)
    assert torch.equal(head(x).argmax(1), probe.predict(x))


def test_standardised_layer_acts_on_standardised_features_and_round_trips():
    x, y = blobs(seed=1)
    head = Head.from_probe(fit_linear_probe(x, y, 3))
    mean, std = x.mean(0), x.std(0)
    layer = head.standardised(mean, std)
    with torch.no_grad():
        assert torch.allclose(layer((x - mean) / std), head(x), atol=1e-4, rtol=1e-4)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_standardised(layer, mean, std)
    for k, v in head.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-5, rtol=1e-5), k
    # a changed standardised layer is written back as the raw-feature layer with the same outputs
    with torch.no_grad():
        layer.weight.add_(0.5)
        layer.bias.sub_(1.0)
        head.load_standardised(layer, mean, std)
        assert torch.allclose(head(x), layer((x - mean) / std), atol=1e-4, rtol=1e-4)


def test_head_clamp_sits_in_front_of_the_linear_layer():
    head = Head(3, 2)
    x = torch.tensor([[-5.0, 0.5, 9.0]])
    assert torch.equal(head.clamp(x), x) and not head.clipped
    head.lo.copy_(torch.tensor([-1.0, -1.0, -torch.inf]))
    head.hi.copy_(torch.tensor([1.0, torch.inf, 2.0]))
    assert head.clipped
    assert torch.equal(head.clamp(x), torch.tensor([[-1.0, 0.5, 2.0]]))
    with torch.no_grad():
        assert torch.equal(head(x), head.linear(torch.tensor([[-1.0, 0.5, 2.0]])))


# ------------------------------------------------------------------------------------------ Classifier


def test_fit_classifier_is_encoder_then_head_and_learns_the_synthetic_task(clf, encoder, train):
    assert clf.num_classes == 4 and clf.encoder is encoder
    x = train.float_images(0, 64)
    with torch.no_grad():
        logits = clf(x)
        assert torch.allclose(logits, clf.head(encoder(x)))
        pred = clf(train.float_images(0, len(train))).argmax(1)
    assert (pred == train.labels).float().mean() > 0.9
    again = fit_classifier(encoder, train, cache=False)
    assert torch.equal(again.head.linear.weight, clf.head.linear.weight)  # seeded, deterministic


def test_save_and_load_classifier_round_trip_bit_exactly(clf, tmp_path, train):
    head = Head(clf.head.linear.in_features, clf.num_classes)
    head.load_state_dict(clf.head.state_dict())
    head.lo[:5] = -0.25  # some finite bounds, the rest ±inf
    head.hi[3:9] = 1.5
    model = Classifier(clf.encoder, head)
    d = save_classifier(model, tmp_path / "run")
    assert (d / "encoder.safetensors").is_file() and (d / HEAD_FILE).is_file()
    loaded = load_classifier(d)
    for k, v in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[k], v), k
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v), k
    x = train.float_images(0, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert loaded.head.clipped and loaded.num_classes == 4


def test_load_head_says_clearly_what_is_wrong(clf, tmp_path):
    with pytest.raises(CheckpointError, match="no head file"):
        load_head(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors head"):
        load_head(garbage)
    save_classifier(clf, tmp_path / "ok")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "ok" / HEAD_FILE).read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors head"):
        load_head(truncated)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(4, 128), "bias": torch.zeros(4)}, str(wrong))
    with pytest.raises(CheckpointError, match="not an encoder_guard head"):
        load_head(wrong)
    with pytest.raises(CheckpointError, match="takes 128-d features but the encoder gives 64-d"):
        load_head(tmp_path / "ok" / HEAD_FILE, feature_dim=64)
    assert load_head(tmp_path / "ok" / HEAD_FILE, feature_dim=128).linear.out_features == 4


def test_load_classifier_refuses_a_head_of_another_encoder(clf, tmp_path):
    d = save_classifier(clf, tmp_path / "run")
    small = Head(64, 4)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(d / HEAD_FILE))
    with pytest.raises(CheckpointError, match="pair it with the encoder"):
        load_classifier(d)
    with pytest.raises(CheckpointError):
        load_classifier(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------- Encoder.forward_from


@pytest.mark.parametrize("tap", TAP_NAMES)
def test_forward_from_any_tap_equals_the_normal_forward(encoder, train, tap):
    x = train.float_images(0, 16)
    with torch.no_grad():
        feats, maps = encoder.forward_intermediates(x, [tap])
        h = maps[0].clone()
        out = encoder.forward_from(tap, maps[0])
        assert torch.equal(maps[0], h)  # the cached activation is not modified in place
        assert torch.allclose(out, feats, atol=1e-5) and torch.allclose(out, encoder(x), atol=1e-5)


def test_forward_from_applies_plugins_after_the_tap_once(train):
    torch.manual_seed(1)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
    for tap, channels, size in [("layer1", 16, 16), ("layer3", 64, 4)]:
        plugin = ActivationAlignment("channel", channels, size)
        plugin.hi.fill_(0.3)
        plugin.gain.fill_(2.0)
        enc.attach(tap, plugin)
    x = train.float_images(0, 8)
    with torch.no_grad():
        ref = enc(x)
        _, maps = enc.forward_intermediates(x)
        for tap, h in zip(TAP_NAMES, maps):
            assert torch.allclose(enc.forward_from(tap, h), ref, atol=1e-5), tap
        bare = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
        bare.backbone.load_state_dict(enc.backbone.state_dict())
        assert not torch.allclose(bare(x), ref, atol=1e-3)  # the plug-ins matter, so the check above means something


# ---------------------------------------------------------------------------------------------- Tail


@pytest.mark.parametrize("cut", [None, "head", "stem", "layer1", "layer2", "layer3"])
def test_tail_logits_from_cached_inputs_equal_the_classifier(clf, train, cut):
    tail = Tail(clf, cut, batch_size=20)
    images = train.images[:48]
    h = tail.inputs(images)
    assert torch.equal(h, tail.inputs(images.float() / 255))  # uint8 and [0, 1] floats alike
    expected_shape = (48, 128) if cut in (None, "head") else None
    if expected_shape:
        assert h.shape == expected_shape
    with torch.no_grad():
        assert torch.allclose(tail.logits(h), clf(images.float() / 255), atol=1e-5)


def test_tail_parameters_and_freeze_rest_leave_only_the_tail_trainable(clf, train):
    import copy

    model = copy.deepcopy(clf)
    head_only = Tail(model, "head")
    assert [id(p) for p in head_only.parameters()] == [id(model.head.linear.weight), id(model.head.linear.bias)]
    assert head_only.stages() == []

    tail = Tail(model, "layer3")
    layer4 = model.encoder.backbone.layer4
    expected = {id(p) for p in [*model.head.linear.parameters(), *layer4.parameters()]}
    assert {id(p) for p in tail.parameters()} == expected
    weights = list(tail.parameters(weights_only=True))
    convs = [m.weight for m in layer4.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {id(p) for p in weights} == {id(p) for p in [model.head.linear.weight, *convs]}
    assert all(p.dim() in (2, 4) for p in weights)

    tail.freeze_rest()
    assert not model.training
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected
    h = tail.inputs(train.images[:16])
    tail.logits(h).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in expected), name


@pytest.mark.parametrize("cut", ["layer4", "layer9", "fc"])
def test_tail_refuses_an_invalid_cut(clf, cut):
    with pytest.raises(ValueError, match="cut must be"):
        Tail(clf, cut)
