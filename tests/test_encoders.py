import pytest
import torch

from encoder_guard.encoders import BACKBONES, TAP_NAMES, Encoder, make_spec


@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if n != "resnet50"])
def test_every_backbone_answers_the_feature_interface(name):
    spec = make_spec(name, input_size=32 if "tiny" in name or "cifar" in name else 64)
    enc = Encoder(spec).eval()
    x = torch.rand(2, spec.in_chans, spec.input_size, spec.input_size)
    feats = enc(x)
    assert feats.shape == (2, spec.feature_dim)
    final, maps = enc.forward_intermediates(x)
    assert torch.allclose(final, feats, atol=1e-6)
    info = enc.feature_info
    assert [i["name"] for i in info] == list(TAP_NAMES)
    for m, i in zip(maps, info):
        assert m.shape[1] == i["num_chs"]
        assert spec.input_size / m.shape[-1] == pytest.approx(i["reduction"])
    assert enc.forward_features(x).shape[1] == spec.feature_dim


def test_taps_by_name_and_index_agree_and_bad_taps_are_refused():
    enc = Encoder(make_spec("resnet10-tiny")).eval()
    x = torch.rand(2, 1, 28, 28)
    _, by_name = enc.forward_intermediates(x, ["layer3", "stem"])
    _, by_idx = enc.forward_intermediates(x, [3, 0])
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_idx))
    with pytest.raises(ValueError, match="taps are"):
        enc.forward_intermediates(x, ["layer9"])
    with pytest.raises(ValueError, match="1-channel"):
        enc(torch.rand(1, 3, 28, 28))


def test_digest_follows_weights():
    a = Encoder(make_spec("resnet10-tiny"))
    b = Encoder(make_spec("resnet10-tiny"))
    b.load_state_dict(a.state_dict())
    assert a.digest() == b.digest()
    with torch.no_grad():
        b.backbone.conv1.weight.add_(1e-3)
    assert a.digest() != b.digest()


def test_make_spec_adapts_normalisation_to_channels():
    spec = make_spec("resnet10-tiny", in_chans=3)
    assert len(spec.mean) == 3 and len(spec.std) == 3
    spec = make_spec("resnet18-cifar", in_chans=1)
    assert len(spec.mean) == 1
