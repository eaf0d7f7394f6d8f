"""Purifier (ACM MM 2022), class-conditional channel masks: its plug-in, its training, and a backdoor it removes."""

import copy

import pytest
import torch

from downstream.classifier import fit_classifier, load_classifier, save_classifier
from downstream.evaluate import evaluate_classifier
from encoder_guard.data import make_synthetic, take_subset
from encoder_guard.defenses import DEFENSES, defense_level
from encoder_guard.defenses.base import DownstreamData
from encoder_guard.defenses.purifier import Purifier
from encoder_guard.encoders import Encoder, load_encoder, make_spec, save_encoder
from encoder_guard.encoders.plugins import ClassMask
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import PatchTrigger
from encoder_guard.triggers.poison import poison_downstream


def test_class_mask_is_the_identity_until_trained_then_applies_the_predicted_class_mask():
    torch.manual_seed(0)
    m = ClassMask(channels=3, classes=2)
    x = torch.randn(4, 3, 2, 2)
    assert torch.allclose(m(x), x, atol=1e-6)  # probabilities sum to 1 up to rounding
    assert m.aux_logits.shape == (4, 2)
    with torch.no_grad():  # a confident head: class 1 when channel 0's mean is positive
        m.aux.weight.copy_(torch.tensor([[-50.0, 0, 0], [50.0, 0, 0]]))
        m.aux.bias.zero_()
        m.mask.copy_(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    x = torch.ones(2, 3, 2, 2)
    x[1, 0] = -1.0
    y = m(x)
    assert torch.allclose(y[0], x[0] * torch.tensor([1.0, 0.0, 1.0])[:, None, None], atol=1e-6)  # class 1's mask
    assert torch.allclose(y[1], x[1] * torch.tensor([1.0, 1.0, 0.0])[:, None, None], atol=1e-6)  # class 0's mask
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.ones(1, 4, 2, 2))


def test_an_encoder_with_class_masks_saves_and_loads_with_the_same_features(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
    m = ClassMask(enc.feature_info[-1]["num_chs"], 4)
    with torch.no_grad():
        m.mask.uniform_(0, 1)
        m.aux.weight.normal_()
    enc.attach("layer4", m)
    loaded = load_encoder(save_encoder(enc, tmp_path / "e.safetensors")).eval()
    assert loaded.spec.plugins["layer4"] == {"kind": "class-mask", "channels": m.channels, "classes": 4}
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), enc(x), atol=1e-6)
        assert not torch.allclose(loaded(x), Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()(x))


@pytest.fixture(scope="module")
def setting():
    """A tiny encoder under a probe trained on a 10% BadNets-poisoned synthetic set, and clean held-out data."""
    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
    trigger = PatchTrigger.square(16, 1, size=4)
    p = poison_downstream(make_synthetic(size=256, image_size=16, seed=0), trigger, 0, 0.1, seed=0)
    clean = take_subset(make_synthetic(size=256, image_size=16, seed=0), 0.1, None, True, 1)
    test = make_synthetic(size=256, image_size=16, seed=0, split="test")
    clf = fit_classifier(enc, p.dataset, cache=False)
    return clf, DownstreamData(p.dataset, clean, p.indices), test, trigger


def test_purifier_cuts_a_badnets_backdoor_and_keeps_clean_accuracy(setting, tmp_path):
    clf, data, test, trigger = setting
    original = copy.deepcopy(clf.state_dict())
    before = evaluate_classifier(clf, test, trigger, trigger.key(), 0)
    result = Purifier(head_epochs=10, epochs=20, batch_size=32)(clf, data, tmp_path)
    after = evaluate_classifier(result.model, test, trigger, trigger.key(), 0)
    assert before["asr"] > 0.5 and after["asr"] < 0.7 * before["asr"]  # measured: 0.57 → 0.29
    assert after["ca"] >= before["ca"] - 0.02
    # the input classifier is untouched; only the plug-in was trained, the rest of the output equals the input
    assert all(torch.equal(v, original[k]) for k, v in clf.state_dict().items()) and not clf.encoder.plugins
    state = result.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    mask = result.model.encoder.plugins["layer4"].mask
    assert 0 <= mask.min() and mask.max() <= 1 and mask.mean() < 1
    assert not any(p.requires_grad for p in result.model.parameters())
    r = result.report
    assert r["data"]["clean_images"] == len(data.clean) and 0 <= r["layers"]["layer4"]["aux_accuracy"] <= 1
    assert len(r["layers"]["layer4"]["channels_kept_per_class"]) == 4
    # the defended classifier saves and loads like any other, with the same predictions
    loaded = load_classifier(save_classifier(result.model, tmp_path / "saved"))
    assert evaluate_classifier(loaded, test, trigger, trigger.key(), 0) == after


def test_purifier_sparsity_keeps_fewer_channels(setting, tmp_path):
    clf, data, *_ = setting
    kept = [Purifier(taps=["layer3", "layer4"], head_epochs=2, epochs=10, batch_size=32, sparsity=s)
            (clf, data, tmp_path).model.encoder.plugins["layer4"].mask.mean() for s in (0.0, 5.0)]
    assert kept[1] < kept[0]


def test_purifier_checks_its_input(setting, tmp_path):
    clf, data, *_ = setting
    with pytest.raises(EncoderGuardError, match="clean labelled set"):
        Purifier()(clf, DownstreamData(data.train, None), tmp_path)
    for bad in ({"taps": ["stem"]}, {"taps": []}, {"epochs": 0}, {"sparsity": -1}):
        with pytest.raises(ValueError):
            Purifier(**bad)
    twice = Purifier(head_epochs=0, epochs=1)(clf, data, tmp_path).model
    with pytest.raises(EncoderGuardError, match="already has plug-ins at layer4"):
        Purifier(head_epochs=0, epochs=1)(twice, data, tmp_path)


def test_the_purifier_family_is_registered_at_its_levels():
    from encoder_guard.defenses.purifier_plus import PurifierPlus, PurifierPlusNoRating

    assert DEFENSES.get("purifier") is Purifier and defense_level("purifier") == "classifier"
    assert DEFENSES.get("purifier-plus") is PurifierPlus and defense_level("purifier-plus") == "encoder"
    assert DEFENSES.get("purifier-plus-no-rating") is PurifierPlusNoRating
    assert defense_level("purifier-plus-no-rating") == "encoder"
    assert PurifierPlus.rated and not PurifierPlusNoRating.rated and issubclass(PurifierPlus, PurifierPlusNoRating)
    assert "purifier-cc" not in DEFENSES.names()
