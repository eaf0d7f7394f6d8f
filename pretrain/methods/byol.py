"""BYOL: predict a slowly moving target network's projection of another view, no negatives.

- [0] Bootstrap Your Own Latent, Grill et al., NeurIPS 2020, https://arxiv.org/abs/2006.07733

Built from lightly's ``BYOLProjectionHead``/``BYOLPredictionHead``, ``update_momentum``,
``cosine_schedule`` and ``NegativeCosineSimilarity``. The target's momentum follows the paper's cosine
schedule from ``momentum_base`` to 1.
"""

from __future__ import annotations

import copy
from typing import Any

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor

from encoder_guard.encoders import Encoder
from pretrain.methods.base import SSL_METHODS, SSLMethod


@SSL_METHODS.register("byol")
class BYOL(SSLMethod):
    """Args:
        encoder: the online backbone to train (the one exported).
        proj_hidden_dim / proj_output_dim / pred_hidden_dim: head sizes (paper: 4096/256/4096).
        momentum_base: target EMA momentum at the start (paper: 0.996; 0.99 for short schedules).
    """

    def __init__(
        self,
        encoder: Encoder,
        proj_hidden_dim: int = 1024,
        proj_output_dim: int = 128,
        pred_hidden_dim: int = 1024,
        momentum_base: float = 0.99,
    ) -> None:
        super().__init__(encoder)
        if not 0 <= momentum_base < 1:
            raise ValueError(f"momentum_base must be in [0, 1), got {momentum_base}")
        self.momentum_base = momentum_base
        self.projection_head = BYOLProjectionHead(encoder.feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = BYOLPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.target_encoder)
        deactivate_requires_grad(self.target_projection_head)
        self.criterion = NegativeCosineSimilarity()

    def _online(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.encoder(x)))

    def _target(self, x: Tensor) -> Tensor:
        return self.target_projection_head(self.target_encoder(x)).detach()

    def loss(self, views: list[Tensor]) -> Tensor:
        p0, p1 = self._online(views[0]), self._online(views[1])
        t0, t1 = self._target(views[0]), self._target(views[1])
        with self.full_precision(p0):
            return 0.5 * (self.criterion(p0.float(), t1.float()) + self.criterion(p1.float(), t0.float()))

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = cosine_schedule(step, max(total_steps, 1), self.momentum_base, 1.0)
        update_momentum(self.encoder, self.target_encoder, m=m)
        update_momentum(self.projection_head, self.target_projection_head, m=m)

    def hparams(self) -> dict[str, Any]:
        return {"momentum_base": self.momentum_base}
