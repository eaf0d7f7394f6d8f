"""Classifier-level defenses (D3, PAD-FT): their pieces, their runs, the runner and `encoder-guard defend`."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from downstream.classifier import Classifier, fit_classifier, load_classifier, save_classifier
from downstream.metrics import compare_metrics
from encoder_guard.cli import main
from encoder_guard.data import make_synthetic, take_subset
from encoder_guard.defenses import DEFENSES, defense_level
from encoder_guard.defenses.base import DownstreamData
from encoder_guard.defenses.d3 import D3
from encoder_guard.defenses.d3_tail import D3Tail
from encoder_guard.defenses.padft import PADFT, keep_lowest, sce_scores, selection_quality, symmetric_cross_entropy
from encoder_guard.defenses.padft_guarded import (
    PADFTGuarded,
    cluster_suspects,
    hidden_sources,
    signature_suspects,
    spread_classes,
)
from encoder_guard.defenses.runner import defend_config, run_defense
from encoder_guard.defenses.tail import Tail, fit_minibatches
from encoder_guard.encoders import save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.threats import deployed_classifier, downstream_setup
from encoder_guard.triggers import PatchTrigger, save_trigger
from encoder_guard.triggers.poison import poison_downstream


@pytest.fixture(scope="module")
def trigger():
    return PatchTrigger.square(16, 1, size=4)


@pytest.fixture(scope="module")
def poisoned(trigger):
    """256 synthetic images, 10% BadNets-poisoned to class 0, and a clean labelled set held aside."""
    train = make_synthetic(size=256, image_size=16, seed=0)
    p = poison_downstream(train, trigger, 0, 0.1, seed=0)
    clean = take_subset(make_synthetic(size=256, image_size=16, seed=0), 0.1, None, True, 1)
    return p, clean


@pytest.fixture(scope="module")
def clf(encoder, poisoned) -> Classifier:
    return fit_classifier(encoder, poisoned[0].dataset, cache=False)


def test_classifier_defenses_are_registered_at_classifier_level():
    for name in ("d3", "d3-tail", "pad-ft", "pad-ft-guarded", "tac", "purifier", "clp-classifier"):
        assert name in DEFENSES.names() and defense_level(name) == "classifier"
    assert defense_level("mimic") == "encoder"


# ---------------------------------------------------------------------------------------------- D3


def test_d3_trains_every_weight_and_rotates_the_last_layer_on_its_sphere(clf, poisoned, tmp_path):
    p, clean = poisoned
    data = DownstreamData(p.dataset, clean, p.indices)
    original = copy.deepcopy(clf.state_dict())
    result = D3(epochs=2, batch_size=16)(clf, data, tmp_path / "a")
    out, report = result.model, result.report
    for k, v in clf.state_dict().items():
        assert torch.equal(v, original[k]), f"D3 changed the input classifier: {k}"
    w0, w = clf.head.linear.weight.detach(), out.head.linear.weight.detach()
    assert float(w.norm()) == pytest.approx(float(w0.norm()), rel=1e-4)  # projected back onto ‖W⁰‖
    assert report["relative_weight_distance"] == pytest.approx(float((w - w0).norm() / w0.norm()), rel=1e-4)
    assert report["relative_weight_distance"] > 0.5  # restarted at random, pushed away
    assert not torch.equal(out.encoder.backbone.conv1.weight, clf.encoder.backbone.conv1.weight)  # the whole model
    assert len(report["history"]) == 2 and report["hparams"]["penalty"] == 0.5 and report["hparams"]["epsilon"] == 0.1
    assert not any(p_.requires_grad for p_ in out.parameters())
    frozen_stats = D3(epochs=1, batch_size=16, init="near", bn_train=False)(clf, data, tmp_path / "b").model
    for k, v in frozen_stats.encoder.state_dict().items():
        if "running" in k:
            assert torch.equal(v, clf.encoder.state_dict()[k]), k
    with pytest.raises(EncoderGuardError, match="clean labelled set"):
        D3(epochs=1)(clf, DownstreamData(p.dataset, None), tmp_path / "c")
    with pytest.raises(ValueError, match="init must be"):
        D3(init="zeros")



@pytest.mark.parametrize("layers", ["head", "layer3"])
def test_d3_tail_moves_the_weights_keeps_their_norms_and_reports(clf, poisoned, layers, tmp_path):
    p, clean = poisoned
    original = copy.deepcopy(clf.state_dict())
    result = D3Tail(layers=layers, steps=15, lr=0.01)(clf, DownstreamData(p.dataset, clean, p.indices), tmp_path)
    out, report = result.model, result.report
    assert isinstance(out, Classifier) and out is not clf
    for k, v in clf.state_dict().items():
        assert torch.equal(v, original[k]), f"D3 changed the input classifier: {k}"
    assert report["relative_weight_distance"] > 0
    assert math.isfinite(report["clean_loss_after"]) and report["clean_loss_before"] == pytest.approx(report["epsilon"])
    assert report["data"]["clean_images"] == len(clean) and report["data"]["train_images"] == 256
    assert report["hparams"]["layers"] == layers and report["wall_seconds_since_resume"] >= 0
    # per-tensor norms of the detoxified weights are kept (they rotate, not grow)
    w_old = [p_.detach() for p_ in Tail(clf, layers).parameters(weights_only=True)]
    w_new = [p_.detach() for p_ in Tail(out, layers).parameters(weights_only=True)]
    assert sum(w.numel() for w in w_new) == report["weights"]
    moved = 0.0
    for a, b in zip(w_old, w_new):
        assert b.norm() == pytest.approx(float(a.norm()), rel=1e-4)
        moved += float((a - b).pow(2).sum())
    total = sum(float(a.pow(2).sum()) for a in w_old)
    assert math.sqrt(moved / total) == pytest.approx(report["relative_weight_distance"], rel=1e-3)
    # the stages before the cut are untouched, and nothing is left trainable
    for name in ("conv1", "layer1", "layer2") + (("layer3",) if layers == "layer3" else ()):
        for k, v in clf.encoder.backbone.get_submodule(name).state_dict().items():
            assert torch.equal(out.encoder.backbone.get_submodule(name).state_dict()[k], v), f"{name}.{k}"
    assert not any(p_.requires_grad for p_ in out.parameters())


def test_d3_tail_needs_clean_labelled_data(clf, poisoned, tmp_path):
    p, clean = poisoned
    with pytest.raises(EncoderGuardError, match="clean labelled set"):
        D3Tail(steps=2)(clf, DownstreamData(p.dataset, None), tmp_path)
    with pytest.raises(EncoderGuardError, match="clean labelled set"):
        D3Tail(steps=2)(clf, DownstreamData(p.dataset, clean.subset(torch.tensor([], dtype=torch.long))), tmp_path)
    with pytest.raises(ValueError):
        D3Tail(steps=0)


# ------------------------------------------------------------------------------------------ PAD-FT


def test_symmetric_cross_entropy_on_a_hand_made_case():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    logits, y = p.log(), torch.tensor([0, 2])
    ce = -torch.log(torch.tensor([0.7, 0.5]))
    rce = torch.tensor([4 * 0.3, 4 * 0.5])  # 4·(1 − p_y) with log 0 = −4
    assert torch.allclose(symmetric_cross_entropy(logits, y, alpha=0.0, beta=1.0), rce, atol=1e-6)
    assert torch.allclose(symmetric_cross_entropy(logits, y, alpha=1.0, beta=0.0), ce, atol=1e-6)
    assert torch.allclose(symmetric_cross_entropy(logits, y), 0.1 * ce + rce, atol=1e-6)  # defaults α=0.1, β=1
    # RCE from its definition: −Σ_k p_k log q_k with the one-hot q and log 0 clipped to −6
    q = F.one_hot(y, 3).float()
    log_q = torch.where(q > 0, torch.zeros_like(q), torch.full_like(q, -6.0))
    by_definition = -(p * log_q).sum(1)
    assert torch.allclose(symmetric_cross_entropy(logits, y, alpha=0.0, log_zero=-6.0), by_definition, atol=1e-6)


def test_keep_lowest_keeps_the_share_of_each_class():
    y = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)
    scores = torch.arange(20, dtype=torch.float).flip(0)  # later samples score lower
    kept = keep_lowest(scores, y, 0.3)
    assert torch.equal(kept, kept.sort().values)
    counts = torch.bincount(y[kept], minlength=3).tolist()
    assert counts == [3, 2, 1]  # round(3.0), round(1.8), round(1.2)
    assert kept.tolist() == [7, 8, 9, 14, 15, 19]  # the lowest scores within each class
    assert torch.bincount(y[keep_lowest(scores, y, 0.01)]).tolist() == [1, 1, 1]  # at least one per class
    assert torch.equal(keep_lowest(scores, y, 1.0), torch.arange(20))


@pytest.mark.parametrize("dim", [2, 8])
def test_sce_self_purification_drops_relabelled_samples(dim):
    """Four clusters; 10% of the samples, from the other classes, relabelled to target 0 (far from its cluster)."""
    g = torch.Generator().manual_seed(dim)
    n, classes, target = 400, 4, 0
    centers = torch.randn(classes, dim, generator=g)
    centers = 6 * centers / centers.norm(dim=1, keepdim=True)
    if dim == 2:
        centers = 6 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y_true = torch.arange(n) % classes
    feats = centers[y_true] + torch.randn(n, dim, generator=g)
    candidates = (y_true != target).nonzero().flatten()
    bad = candidates[torch.randperm(len(candidates), generator=g)[: n // 10]]
    y = y_true.clone()
    y[bad] = target
    scores = sce_scores(feats, y, classes, epochs=30, seed=0)
    assert scores.shape == (n,) and torch.isfinite(scores).all()
    kept = keep_lowest(scores, y, 0.5)
    q = selection_quality(kept, bad, n)
    assert q["poisoned"] == 40 and q["poison_recall"] >= 0.95 and q["clean_precision"] >= 0.95
    assert scores[bad].mean() > scores[~torch.isin(torch.arange(n), bad)].mean()


def test_cluster_guard_sets_aside_a_second_population_and_nothing_else():
    """Five Gaussian classes; then class 0 also gets a tight blob far from it (what a clean encoder makes of a
    blended trigger's relabelled images). Only the blob is set aside; without it nothing is."""
    g = torch.Generator().manual_seed(0)
    classes, per, dim, n_blob = 5, 200, 16, 60
    centers = 4 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes * per) % classes
    feats = centers[y] + torch.randn(len(y), dim, generator=g)
    mask, report = cluster_suspects(feats, y, classes, ratio=1.6)
    assert not mask.any() and report["flagged_classes"] == [] and report["set_aside"] == 0
    assert max(report["silhouettes"]) < 1.6 * report["median"]
    blob = 4 * torch.randn(dim, generator=g) + 0.3 * torch.randn(n_blob, dim, generator=g)
    mask, report = cluster_suspects(torch.cat([feats, blob]), torch.cat([y, torch.zeros(n_blob, dtype=torch.long)]),
                                    classes, ratio=1.6)
    assert report["flagged_classes"] == [0] and report["set_aside"] == n_blob
    assert mask[len(y):].all() and not mask[: len(y)].any()


def _confused(classes: int = 10, per: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and a scorer's predictions with natural confusions: look-alike pairs both ways, and class 6
    (a shirt) confused both ways with four classes and predicted for some images of five others."""
    y = torch.arange(classes).repeat_interleave(per)
    pred, used = y.clone(), [0] * classes

    def send(a: int, b: int, k: int) -> None:
        pred[a * per + used[a] : a * per + used[a] + k] = b
        used[a] += k

    for a, b, k in ((0, 6, 120), (2, 4, 90), (5, 7, 60), (2, 6, 80), (4, 6, 70), (3, 6, 40)):
        send(a, b, k)
        send(b, a, k)
    for k in (1, 5, 7, 8, 9):
        send(k, 6, 20)
    return y, pred


def _relabelled(y: torch.Tensor, pred: torch.Tensor, target: int, per_source: int, classes: int = 10):
    """``per_source`` images of every other class relabelled to ``target``; the scorer sees their source."""
    sources = torch.tensor([k for k in range(classes) if k != target]).repeat_interleave(per_source)
    return torch.cat([y, torch.full_like(sources, target)]), torch.cat([pred, sources])


def test_spread_classes_flags_relabelling_from_every_class_not_look_alike_confusions():
    y, pred = _confused()
    flagged, typical = spread_classes(y, pred, 10)
    assert flagged == [] and max(typical) == 0.0  # even class 6, confused with four others
    for target in (3, 6):  # 6 is confused both ways with four classes, and still found
        flagged, typical = spread_classes(*_relabelled(y, pred, target, 25), 10)
        assert flagged == [target] and typical[target] == pytest.approx(25 / 500)
    # a weak encoder confuses every class with every other: no class stands out, none is flagged
    g = torch.Generator().manual_seed(0)
    weak = torch.where(torch.rand(len(y), generator=g) < 0.3, torch.randint(0, 10, (len(y),), generator=g), y)
    flagged, typical = spread_classes(y, weak, 10)
    assert flagged == [] and min(typical) > 0.015


def test_signature_suspects_finds_the_agreeing_relabelled_samples_and_spares_the_class():
    """Five Gaussian classes; 40 images of each other class shifted by one trigger vector and relabelled 0. The
    scorer sends 75% of them back to their source and agrees with the label on the rest (the trigger pushes
    them toward 0); the target's clean samples it gets right. The detector finds the agreeing ones too."""
    g = torch.Generator().manual_seed(0)
    classes, per, dim, per_source = 5, 300, 16, 40
    centers = 4 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per)
    feats = centers[y] + torch.randn(len(y), dim, generator=g)
    trigger = 3 * F.normalize(torch.randn(dim, generator=g), dim=0)
    sources = torch.arange(1, classes).repeat_interleave(per_source)
    stamped = centers[sources] + torch.randn(len(sources), dim, generator=g) + trigger
    feats, labels = torch.cat([feats, stamped]), torch.cat([y, torch.zeros_like(sources)])
    pred = torch.cat([y, sources])
    agreeing = torch.arange(len(sources))[torch.arange(len(sources)) % 4 == 0] + len(y)
    pred[agreeing] = 0
    poisoned = torch.zeros(len(labels), dtype=torch.bool)
    poisoned[len(y):] = True
    found = signature_suspects(feats, labels, pred, 0, rounds=3)
    assert found[agreeing].float().mean() >= 0.95 and found[poisoned].float().mean() >= 0.98
    assert not found[labels != 0].any()  # only the target class is searched
    assert found[(labels == 0) & ~poisoned].float().mean() <= 0.05
    assert torch.equal(signature_suspects(feats, labels, pred, 0, rounds=0), poisoned & (pred != 0))


def _hidden_source_case(g: torch.Generator, centers: torch.Tensor, hidden_source: int, trigger_norm: float,
                        confused: int = 0, per: int = 300, per_source: int = 40):
    """Gaussian classes around ``centers`` (target 0); ``per_source`` images of every other class shifted by a
    trigger and relabelled 0, which the scorer sends back to their source except ``hidden_source``'s (they
    agree with their label); ``confused`` samples of classes 0 and 1 swapped in the predictions. Runs
    :func:`hidden_sources` on it; returns its mask and counts, the truly hidden mask and the labels."""
    classes, dim = centers.shape
    y = torch.arange(classes).repeat_interleave(per)
    feats = centers[y] + torch.randn(len(y), dim, generator=g)
    pred = y.clone()
    pred[:confused], pred[per : per + confused] = 1, 0
    trigger = trigger_norm * F.normalize(torch.randn(dim, generator=g), dim=0)
    sources = torch.arange(1, classes).repeat_interleave(per_source)
    stamped = centers[sources] + torch.randn(len(sources), dim, generator=g) + trigger
    feats, labels = torch.cat([feats, stamped]), torch.cat([y, torch.zeros_like(sources)])
    pred = torch.cat([pred, torch.where(sources == hidden_source, 0, sources)])
    hidden = torch.zeros(len(labels), dtype=torch.bool)
    hidden[len(y):] = sources == hidden_source
    flagged, share = spread_classes(labels, pred, classes)
    assert flagged == [0]
    scorer = dict(epochs=5, lr=0.01, batch_size=64, alpha=0.1, beta=1.0, seed=0)
    agreeing = (labels == 0) & (pred == 0)
    found, taken = hidden_sources(feats, labels, pred, classes, 0, share[0], torch.arange(len(labels)), agreeing, scorer)
    return found, taken, hidden, labels


def test_hidden_sources_finds_a_source_whose_stamped_images_read_as_the_target_and_spares_look_alikes():
    """Five Gaussian classes, 1 a look-alike of the target 0 (confused both ways, 60 each). 40 images of each
    other class are shifted by a trigger and relabelled 0; the scorer sends them back to their source except
    class 2's, which it takes for the target (they agree with their label). Only those are traced."""
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 16, generator=g)
    centers[1] = centers[0] + 1.5 * F.normalize(torch.randn(16, generator=g), dim=0)
    found, taken, hidden, _ = _hidden_source_case(g, centers, hidden_source=2, trigger_norm=3, confused=60)
    # class 2 shows none of its 40 expected disagreements; class 1, the look-alike, shows more than expected
    assert taken == {2: 40} and torch.equal(found, hidden)


def test_hidden_sources_ranks_a_look_alike_source_s_candidates_by_confidence():
    """The target 0 sits midway between classes 1 and 3, so a scorer without the target sends its clean samples
    to both, unsure. Class 1's 40 stamped images read as the target (hidden); its candidates are those 40 and
    about half of the 300 clean target samples (238 in all, which a bound of twice the missing count refused). The 40 most
    confident are the stamped ones."""
    g = torch.Generator().manual_seed(1)
    centers = 4 * torch.randn(5, 16, generator=g)
    centers[0] = (centers[1] + centers[3]) / 2
    found, taken, hidden, labels = _hidden_source_case(g, centers, hidden_source=1, trigger_norm=0.5)
    assert taken == {1: 40}
    assert (found & hidden).sum() >= 36 and not found[labels != 0].any()


def test_padft_keeps_its_share_clips_and_finetunes_the_last_layer(clf, poisoned, tmp_path):
    """PAD-FT as published: the lowest-SCE half of each class, clipping bounds from it, the last layer alone
    fine-tuned with the consistency term."""
    p, _ = poisoned
    result = PADFT(score_epochs=5, epochs=3)(clf, DownstreamData(p.dataset, None, p.indices), tmp_path)
    head, report = result.model.head, result.report
    assert head.clipped and torch.isfinite(head.lo).all() and torch.isfinite(head.hi).all()
    assert (head.lo <= head.hi).all() and report["clipped_dims"] == 128
    assert not clf.head.clipped  # the deployed classifier is untouched
    assert not torch.equal(head.linear.weight, clf.head.linear.weight)
    before, after = clf.encoder.state_dict(), result.model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the last layer changes
    sel = report["selection"]
    assert sel["of"] == 256 and sel["poisoned"] == len(p.indices) == 26
    counts = torch.bincount(p.dataset.labels.long())
    assert sel["kept"] == sum(max(1, round(0.5 * int(n))) for n in counts if n > 0)
    for key in ("clean_precision", "poison_recall", "removed_precision"):
        assert 0 <= sel[key] <= 1
    assert report["data"]["clean_images"] == 0 and report["hparams"]["consistency"] == 1.0
    assert "relabelled" not in report
    # without the experiment's knowledge of the poisoned indices, only the counts
    plain = PADFT(score_epochs=2, epochs=1, clip_quantile=None)(clf, DownstreamData(p.dataset, None), tmp_path)
    assert set(plain.report["selection"]) == {"kept", "of"}
    assert not plain.model.head.clipped and plain.report["clipped_dims"] == 0


def test_padft_guarded_reports_its_two_passes(clf, poisoned, tmp_path):
    p, _ = poisoned
    result = PADFTGuarded(score_epochs=5, epochs=3)(clf, DownstreamData(p.dataset, None, p.indices), tmp_path)
    report = result.report
    assert report["first_selection"] == pytest.approx(128, abs=2)  # keep=0.5 of each class
    assert 0 < report["selection"]["kept"] <= 256 and report["hparams"]["consistency"] == 0.0
    assert set(report["relabelled"]) == {"flagged_classes", "evidence", "signature_added", "hidden_added"}
    one_pass = PADFTGuarded(score_epochs=5, epochs=1, second_pass=False, cluster_ratio=None)(
        clf, DownstreamData(p.dataset, None, p.indices), tmp_path)
    assert one_pass.report["selection"]["kept"] == pytest.approx(128, abs=2)
    assert one_pass.report["relabelled"] is None and one_pass.report["cluster_guard"] is None


def test_fit_minibatches_cosine_anneals_to_a_batch_order_independent_end():
    """Two overlapping classes: at a constant rate the last minibatches move the boundary, so two batch
    orders end on different weights; annealed to 0 they end on nearly the same."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(400, 4, generator=g) + 0.5, torch.randn(400, 4, generator=g) - 0.5])
    y = torch.arange(2).repeat_interleave(400)

    def end(seed: int, cosine: bool) -> torch.Tensor:
        layer = torch.nn.Linear(4, 2)
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
        fit_minibatches(list(layer.parameters()), len(x), lambda idx: F.cross_entropy(layer(x[idx]), y[idx]), 10,
                        0.1, 32, "test", torch.Generator().manual_seed(seed), cosine=cosine)
        return torch.cat([layer.weight.flatten(), layer.bias]).detach()

    constant = (end(0, False) - end(1, False)).norm()
    annealed = (end(0, True) - end(1, True)).norm()
    assert annealed < constant / 3


def test_padft_validates_its_arguments():
    with pytest.raises(ValueError, match="signature_rounds"):
        PADFTGuarded(signature_rounds=-1)
    with pytest.raises(ValueError, match="keep"):
        PADFTGuarded(keep=0)
    with pytest.raises(ValueError, match="cluster_ratio"):
        PADFTGuarded(cluster_ratio=1.0)
    with pytest.raises(ValueError, match="clip_quantile"):
        PADFT(clip_quantile=0.4)
    with pytest.raises(ValueError, match="consistency"):
        PADFT(consistency=-1)


# -------------------------------------------------------------------------------- threats


def test_selection_quality_on_a_hand_made_case():
    kept = torch.tensor([2, 4, 5, 6, 7, 8])
    poisoned = torch.tensor([0, 1, 2, 3])
    q = selection_quality(kept, poisoned, 10)
    assert q == {"kept": 6, "of": 10, "poisoned": 4, "poisoned_kept": 1, "clean_precision": pytest.approx(5 / 6),
                 "poison_recall": 0.75, "removed_precision": 0.75}  # removed {0, 1, 3, 9}: three of them poisoned
    assert selection_quality(kept, None, 10) == {"kept": 6, "of": 10}
    assert selection_quality(kept, torch.tensor([], dtype=torch.long), 10) == {"kept": 6, "of": 10}


def test_compare_metrics_gives_delta_ca_and_der():
    out = compare_metrics({"ca": 0.9, "asr": 0.8}, {"ca": 0.85, "asr": 0.1})
    assert out["delta_ca"] == pytest.approx(-0.05)
    assert out["der"] == pytest.approx((0.7 - 0.05 + 1) / 2)
    out = compare_metrics({"ca": 0.8, "asr": 0.2}, {"ca": 0.9, "asr": 0.5})  # better CA, worse ASR: no credit
    assert out["der"] == pytest.approx(0.5) and out["delta_ca"] == pytest.approx(0.1)
    assert compare_metrics({"ca": 0.9}, {"ca": 0.7}) == {"delta_ca": pytest.approx(-0.2)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, encoder, trigger):
    d = tmp_path_factory.mktemp("files")
    return save_encoder(encoder, d / "enc.safetensors"), save_trigger(trigger, d / "trigger.safetensors")


def test_downstream_setup_poisons_holds_clean_data_aside_and_checks_its_input(encoder, files):
    _, trig = files
    cfg = {"downstream": {"dataset": "synthetic", "trigger": str(trig), "target": 0, "poison_rate": 0.1}}
    ds = downstream_setup(cfg, encoder, seed=0)
    assert len(ds.data.train) == 512 and len(ds.test) == 256 and ds.target == 0
    assert len(ds.data.poisoned) == 51 and (ds.data.train.labels[ds.data.poisoned] == 0).all()
    assert ds.data.clean is not None and 20 <= len(ds.data.clean) <= 30
    assert downstream_setup(cfg, encoder, seed=0, clean=False).data.clean is None
    bad = [({"trigger": str(trig)}, "needs downstream.target"),
           ({"trigger": str(trig), "target": 7}, "not a class"),
           ({"clean_fraction": 0.2}, "allow_more"),
           ({"poison_rate": 0.1}, "needs downstream.trigger")]
    for extra, message in bad:
        with pytest.raises(EncoderGuardError, match=message):
            downstream_setup({"downstream": {"dataset": "synthetic", **extra}}, encoder, seed=0)


def test_deployed_classifier_loads_a_given_head(encoder, clf, files, tmp_path):
    d = save_classifier(clf, tmp_path / "deployed")
    cfg = {"downstream": {"dataset": "synthetic", "head": str(d / "head.safetensors")}}
    ds = downstream_setup(cfg, encoder, seed=0, clean=False)
    got = deployed_classifier(cfg, encoder, ds, seed=0)
    assert torch.equal(got.head.linear.weight, clf.head.linear.weight)


# ------------------------------------------------------------------------------------ runner and CLI


def _sets(trigger_file, *extra):
    base = ["downstream.dataset=synthetic", f"downstream.trigger={trigger_file}", "downstream.target=0",
            "downstream.poison_rate=0.1", "train.threads=1", *extra]
    return sum((["--set", s] for s in base), [])


FAST = {"d3-tail": ["defense.steps=10"], "pad-ft": ["defense.score_epochs=3", "defense.epochs=2"],
        "pad-ft-guarded": ["defense.score_epochs=3", "defense.epochs=2"], "tac": ["defense.epochs=2"], "clp-classifier": [],
        "purifier": ["defense.head_epochs=1", "defense.epochs=1"]}


@pytest.mark.parametrize("name", sorted(FAST))
def test_cli_defend_writes_a_classifier_and_before_after_metrics(name, files, tmp_path, capsys):
    enc, trig = files
    out = tmp_path / "run"
    assert main(["defend", name, "--encoder", str(enc), *_sets(trig, *FAST[name]), "--out", str(out)]) == 0
    for f in ("encoder.safetensors", "head.safetensors", "report.json", "config.yaml", "log.txt"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    assert report["defense"] == name and report["wall_seconds_since_resume"] >= 0
    for when in ("before", "after"):
        m = report[when]
        assert 0 <= m["ca"] <= 1 and 0 <= m["asr"] <= 1 and m["target"] == 0 and m["test_size"] == 256
    assert report["delta_ca"] == pytest.approx(report["after"]["ca"] - report["before"]["ca"])
    assert 0 <= report["der"] <= 1
    # the saved classifier is the one that was judged
    cfg = defend_config(name, sets=[a for a in _sets(trig) if a != "--set"])
    loaded = load_classifier(out)
    ds = downstream_setup(cfg, loaded.encoder, seed=0, clean=False)
    assert ds.evaluate(loaded)["ca"] == report["after"]["ca"] and ds.evaluate(loaded)["asr"] == report["after"]["asr"]
    if name.startswith("pad-ft"):
        assert report["selection"]["poisoned"] == 51
    assert (report["data"]["clean_images"] > 0) == DEFENSES.get(name).uses_clean
    # a second run into the same directory is refused with one line
    capsys.readouterr()
    assert main(["defend", name, "--encoder", str(enc), *_sets(trig, *FAST[name]), "--out", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err


def test_run_defense_for_a_classifier_defense_without_a_trigger_reports_ca_only(encoder, tmp_path):
    cfg = defend_config("d3-tail", sets=["downstream.dataset=synthetic", "defense.steps=5", "defense.layers=head"])
    report = run_defense("d3-tail", cfg, encoder, tmp_path / "run")
    assert "asr" not in report["before"] and "asr" not in report["after"] and "der" not in report
    assert report["delta_ca"] == pytest.approx(report["after"]["ca"] - report["before"]["ca"])
    assert load_classifier(tmp_path / "run").num_classes == 4


def test_an_interrupted_classifier_defense_can_be_run_again(encoder, tmp_path, monkeypatch):
    import encoder_guard.runs as runs

    cfg = defend_config("d3-tail", sets=["downstream.dataset=synthetic", "defense.steps=3", "defense.layers=head"])
    real = runs.RunDir.write_json

    def interrupted(self, name, data):
        if name == "report.json":
            raise KeyboardInterrupt
        return real(self, name, data)

    monkeypatch.setattr(runs.RunDir, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_defense("d3-tail", cfg, encoder, tmp_path / "run")
    monkeypatch.setattr(runs.RunDir, "write_json", real)
    assert (tmp_path / "run" / "encoder.safetensors").exists() and not (tmp_path / "run" / "report.json").exists()
    try:
        report = run_defense("d3-tail", cfg, encoder, tmp_path / "run")
    except EncoderGuardError:
        report = run_defense("d3-tail", cfg, encoder, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "report.json").is_file() and "after" in report
