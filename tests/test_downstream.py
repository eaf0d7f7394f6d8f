import math

import pytest
import torch
import torch.nn.functional as F

from downstream.knn import knn_predict
from downstream.linear import fit_linear_probe
from downstream.metrics import accuracy, attack_success_rate, defense_effectiveness_rating, robust_accuracy


def naive_knn(train, labels, test, num_classes, k, t):
    """Reference: brute-force cosine similarity and weighted vote in plain Python loops."""
    tr = F.normalize(train, dim=1)
    te = F.normalize(test, dim=1)
    preds = []
    for q in te:
        sims = (tr @ q).tolist()
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    test = torch.randn(50, 16, generator=g)
    for k, t in [(1, 0.1), (20, 0.07), (200, 0.1), (500, 0.5)]:
        assert torch.equal(knn_predict(train, labels, test, 5, k, t), naive_knn(train, labels, test, 5, k, t))


def test_knn_agrees_with_scikit_learn_brute_force_neighbours():
    from sklearn.neighbors import NearestNeighbors

    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(500, 32, generator=g), torch.randn(40, 32, generator=g)
    from downstream.knn import knn_search

    _, idx = knn_search(F.normalize(train, dim=1), F.normalize(test, dim=1), 10)
    nn = NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute").fit(train.numpy())
    _, ref = nn.kneighbors(test.numpy())
    assert (idx.numpy() == ref).mean() > 0.99


def test_linear_probe_fits_separable_data_and_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 10, generator=g)
    probe = fit_linear_probe(x[:300], y[:300], 4)
    ours = accuracy(probe.predict(x[300:]), y[300:])
    xs = ((x - x[:300].mean(0)) / x[:300].std(0)).numpy()
    ref = LogisticRegression(C=1 / (1e-4 * 300), max_iter=2000).fit(xs[:300], y[:300].numpy())
    assert ours > 0.9
    assert abs(ours - ref.score(xs[300:], y[300:].numpy())) <= 0.02
    # deterministic
    again = fit_linear_probe(x[:300], y[:300], 4)
    assert torch.allclose(again.layer.weight, probe.layer.weight)


def test_asr_counts_non_target_images_only():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    target = 1
    triggered = torch.tensor([1, 0, 1, 1, 1, 2])  # of the 4 non-target images, two go to the target
    assert attack_success_rate(triggered, labels, target) == 0.5
    assert robust_accuracy(triggered, labels, target) == 0.5
    assert accuracy(torch.tensor([0, 0, 1, 0, 2, 2]), labels) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="undefined"):
        attack_success_rate(torch.tensor([1, 1]), torch.tensor([1, 1]), 1)


def test_der_is_backdoorbenchs_formula():
    assert defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0
    assert defense_effectiveness_rating(0.9, 1.0, 0.9, 1.0) == 0.5
    assert defense_effectiveness_rating(0.9, 0.5, 0.8, 0.1) == pytest.approx((0.4 - 0.1 + 1) / 2)
