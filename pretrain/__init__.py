"""Everything that makes encoders: SSL methods, batched augmentation, the resumable trainer."""

from pretrain.trainer import pretrain

__all__ = ["pretrain"]
