"""Raw-pixel baselines under the same protocol: an encoder that does not beat them has learned nothing."""

from __future__ import annotations

from typing import Any

from downstream.evaluate import EvalConfig
from downstream.knn import knn_predict
from downstream.linear import fit_linear_probe
from downstream.metrics import accuracy
from encoder_guard.data import ImageDataset


def raw_pixel_metrics(train: ImageDataset, test: ImageDataset, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """CA of the linear probe and kNN on flattened ``[0, 1]`` pixels."""
    cfg = cfg or EvalConfig()
    f_train = train.float_images().flatten(1)
    f_test = test.float_images().flatten(1)
    n_cls = train.num_classes
    probe = fit_linear_probe(f_train, train.labels, n_cls, cfg.probe_weight_decay, cfg.probe_max_iter, cfg.seed)
    return {
        "ca_linear": accuracy(probe.predict(f_test), test.labels),
        "ca_knn": accuracy(knn_predict(f_train, train.labels, f_test, n_cls, cfg.knn_k, cfg.knn_temperature), test.labels),
    }
