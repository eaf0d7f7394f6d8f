"""Downstream evaluation: cached frozen features, linear probe, faiss kNN, CA/ASR metrics."""

from downstream.evaluate import EvalConfig, evaluate_encoder
from downstream.knn import knn_predict
from downstream.linear import fit_linear_probe
from downstream.metrics import accuracy, attack_success_rate, defense_effectiveness_rating, robust_accuracy

__all__ = ["EvalConfig", "accuracy", "attack_success_rate", "defense_effectiveness_rating", "evaluate_encoder",
           "fit_linear_probe", "knn_predict", "robust_accuracy"]
