"""Mutual-information estimators on paired samples ``(B, d1) × (B, d2)`` and per-layer MI of an encoder."""

from encoder_guard.mi.base import MI_ESTIMATORS, MIEstimator, build_estimator
from encoder_guard.mi.gaussian import GaussianMI
from encoder_guard.mi.infonce import InfoNCE
from encoder_guard.mi.layers import LayerMI, layer_mutual_information
from encoder_guard.mi.mine import MINE

__all__ = ["MI_ESTIMATORS", "MIEstimator", "build_estimator", "GaussianMI", "InfoNCE", "MINE", "LayerMI",
           "layer_mutual_information"]
