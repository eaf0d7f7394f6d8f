"""Classic baselines: CLP (data-free channel pruning), fine-pruning and ANP."""

import copy

import pytest
import torch
from torch import nn

from downstream.classifier import fit_classifier
from encoder_guard.data import make_synthetic, take_subset
from encoder_guard.defenses import DEFENSES, defense_level
from encoder_guard.defenses.anp import ANP
from encoder_guard.defenses.base import DefenseData, DownstreamData
from encoder_guard.defenses.clp import CLP, CLPClassifier, channel_lipschitz, conv_bn_pairs
from encoder_guard.defenses.fine_pruning import FinePruning
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import PatchTrigger
from encoder_guard.triggers.poison import poison_downstream


@pytest.fixture(scope="module")
def setting(encoder):
    train = make_synthetic(size=256, image_size=16, seed=0)
    p = poison_downstream(train, PatchTrigger.square(16, 1, size=4), 0, 0.1, seed=0)
    clean = take_subset(make_synthetic(size=256, image_size=16, seed=0), 0.2, None, True, 1)
    return fit_classifier(encoder, p.dataset, cache=False), DownstreamData(p.dataset, clean, p.indices)


def test_levels():
    assert defense_level("clp") == "encoder"
    assert defense_level("fine-pruning") == defense_level("anp") == defense_level("clp-classifier") == "classifier"
    assert {"clp", "clp-classifier", "fine-pruning", "anp"} <= set(DEFENSES.names())


def test_channel_lipschitz_is_the_spectral_norm_of_the_bn_scaled_kernel():
    conv, bn = nn.Conv2d(3, 4, 3, bias=False).requires_grad_(False), nn.BatchNorm2d(4).requires_grad_(False)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
    lips = channel_lipschitz(conv, bn)
    for k in range(4):
        gain = abs(float(bn.weight[k])) / (float(bn.running_var[k]) + bn.eps) ** 0.5
        expected = torch.linalg.svdvals(conv.weight[k].reshape(3, -1)).max() * gain
        assert float(lips[k]) == pytest.approx(float(expected), rel=1e-5)


def test_clp_prunes_an_implanted_high_lipschitz_channel_and_nothing_without_one(encoder):
    enc = copy.deepcopy(encoder)
    name, conv, bn = conv_bn_pairs(enc.backbone)[3]
    result = CLP(u=3.0)(enc, DefenseData(None, 0), None)
    baseline = result.report["pruned_channels"][name]
    with torch.no_grad():
        conv.weight[2] *= 50  # one channel now reacts enormously to its input
    result = CLP(u=3.0)(enc, DefenseData(None, 0), None)
    pruned_bn = dict(result.model.backbone.named_modules())[name]
    assert result.report["pruned_channels"][name] >= max(1, baseline)
    assert float(pruned_bn.weight[2].detach()) == 0.0 and float(pruned_bn.bias[2].detach()) == 0.0
    assert result.report["data"]["images"] == 0
    assert float(bn.weight[2].detach()) != 0.0  # the input encoder is untouched
    with pytest.raises(ValueError):
        CLP(u=0)


def test_clp_on_a_classifier_prunes_its_encoder_as_on_an_encoder_and_keeps_the_head(setting):
    clf, data = setting
    clf = copy.deepcopy(clf)
    name, conv, _ = conv_bn_pairs(clf.encoder.backbone)[3]
    with torch.no_grad():
        conv.weight[2] *= 50
    result = CLPClassifier(u=3.0)(clf, DownstreamData(data.train, None), None)
    alone = CLP(u=3.0)(clf.encoder, DefenseData(None, 0), None)
    assert result.report["pruned_channels"] == alone.report["pruned_channels"] and result.report["pruned_total"] >= 1
    after = result.model.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in alone.model.state_dict().items())
    assert torch.equal(result.model.head.linear.weight, clf.head.linear.weight)
    assert result.report["data"]["clean_images"] == 0


def test_fine_pruning_masks_dormant_channels_within_the_accuracy_budget(setting):
    clf, data = setting
    result = FinePruning(max_drop=0.1, epochs=2)(clf, data, None)
    head, rep = result.model.head, result.report
    pruned = (head.lo == 0) & (head.hi == 0)
    assert int(pruned.sum()) == rep["pruned_channels"] > 0
    assert rep["clean_acc_start"] - rep["clean_acc_pruned"] <= 0.1 + 1e-6
    assert torch.all(head.linear.weight[:, pruned] == 0)  # pruned channels stay out of the fine-tuned head
    assert not clf.head.clipped
    with pytest.raises(EncoderGuardError):
        FinePruning()(clf, DownstreamData(data.train, None), None)


def test_anp_learns_masks_prunes_and_leaves_the_input_classifier_alone(setting):
    clf, data = setting
    before = copy.deepcopy(clf.state_dict())
    result = ANP(steps=5, threshold=0.99)(clf, data, None)  # a high threshold makes pruning certain
    rep = result.report
    assert rep["neurons"] > 0 and 0 < rep["pruned_neurons"] <= rep["neurons"]
    bns = [m for m in result.model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert rep["neurons"] == sum(b.num_features for b in bns)  # the whole network's, as in the paper
    assert sum(int((b.weight == 0).sum()) for b in bns) >= rep["pruned_neurons"]
    for k, v in clf.state_dict().items():  # BatchNorm statistics included: the masks learn in training mode
        assert torch.equal(v, before[k])
    gammas = {f"{n}.weight" for n, m in result.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for k, v in result.model.state_dict().items():  # only BatchNorm weights are pruned; statistics put back
        if k not in gammas:
            assert torch.equal(v, before[k]), k
    assert not any(m._forward_hooks for m in result.model.modules())  # perturbation hooks removed
    x = torch.rand(4, 1, 16, 16)
    assert torch.isfinite(result.model(x)).all()


def test_anp_prune_ratio_prunes_that_share_of_neurons(setting):
    clf, data = setting
    rep = ANP(steps=3, prune_ratio=0.1)(clf, data, None).report
    assert rep["pruned_neurons"] == int(0.1 * rep["neurons"])
    last = ANP(steps=3, layers="layer3", prune_ratio=0.1)(clf, data, None)
    assert 0 < last.report["neurons"] < rep["neurons"]
    before = clf.state_dict()
    for k, v in last.model.state_dict().items():  # the earlier stages' BatchNorm statistics are put back too
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, before[k]), k


def test_anp_uses_the_papers_share_of_clean_data(setting):
    clf, data = setting
    assert ANP(steps=1)(clf, data, None).report["data"]["images"] == round(0.01 * len(data.train))
    with pytest.raises(ValueError, match="data_fraction"):
        ANP(data_fraction=0)
    with pytest.raises(ValueError, match="layers"):
        ANP(layers="conv9")
    with pytest.raises(ValueError, match="prune_ratio"):
        ANP(prune_ratio=-0.1)


def test_anp_resumes_after_an_interrupt_to_the_same_pruning(setting, tmp_path, monkeypatch):
    import encoder_guard.defenses.anp as anp

    clf, data = setting
    full = ANP(steps=6, prune_ratio=0.2)(clf, data, tmp_path / "full").model
    real, calls = anp.light_augment, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(anp, "light_augment", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ANP(steps=6, prune_ratio=0.2)(clf, data, tmp_path / "cut")
    assert (tmp_path / "cut" / "checkpoints" / "anp.pt").is_file()
    resumed_calls = {"n": 0}

    def counting(*args, **kwargs):
        resumed_calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(anp, "light_augment", counting)
    resumed = ANP(steps=6, prune_ratio=0.2)(clf, data, tmp_path / "cut", resume=True).model
    assert resumed_calls["n"] == 3  # the three steps left, not a restart
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
