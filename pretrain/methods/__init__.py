"""SSL methods, by name: ``SSL_METHODS.get('simclr')``."""

from pretrain.methods import byol, simclr  # noqa: F401  (register)
from pretrain.methods.base import SSL_METHODS, SSLMethod

__all__ = ["SSL_METHODS", "SSLMethod"]
