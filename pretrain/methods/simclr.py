"""SimCLR: contrast two views of each image against the rest of the batch.

- [0] A Simple Framework for Contrastive Learning of Visual Representations, Chen et al., ICML 2020,
  https://arxiv.org/abs/2002.05709

Built from lightly's ``SimCLRProjectionHead`` and ``NTXentLoss`` (which gathers negatives across DDP
processes when ``gather_distributed``).
"""

from __future__ import annotations

from typing import Any

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor

from encoder_guard.encoders import Encoder
from pretrain.methods.base import SSL_METHODS, SSLMethod


@SSL_METHODS.register("simclr")
class SimCLR(SSLMethod):
    """Args:
        encoder: the backbone to train.
        temperature: NT-Xent temperature τ (the paper's CIFAR value 0.5).
        proj_hidden_dim / proj_output_dim: projection head sizes ("a MLP with one hidden layer", [0] §2.1).
        gather_distributed: gather negatives from every process under DDP.
    """

    def __init__(
        self,
        encoder: Encoder,
        temperature: float = 0.5,
        proj_hidden_dim: int = 512,
        proj_output_dim: int = 128,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(encoder)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.projection_head = SimCLRProjectionHead(encoder.feature_dim, proj_hidden_dim, proj_output_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def loss(self, views: list[Tensor]) -> Tensor:
        z0, z1 = (self.projection_head(self.encoder(v)) for v in views)
        with self.full_precision(z0):
            return self.criterion(z0.float(), z1.float())

    def hparams(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
