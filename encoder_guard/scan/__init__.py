"""Encoder scanners: decide whether a pre-trained encoder is backdoored by trigger inversion (see ``scan.base``)."""

from encoder_guard.scan import collapse, decree, ssl_cleanse  # noqa: F401  (register the scanners)
from encoder_guard.scan.base import SCANNERS, Inversion, Scanner, ScanResult, build_scanner
from encoder_guard.scan.collapse import BudgetCollapse
from encoder_guard.scan.decree import Decree
from encoder_guard.scan.ssl_cleanse import SSLCleanse, anomaly_index, knn_labels

__all__ = ["SCANNERS", "BudgetCollapse", "Decree", "Inversion", "SSLCleanse", "ScanResult", "Scanner", "anomaly_index", "build_scanner",
           "knn_labels"]
