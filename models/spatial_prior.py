"""A convergence aid for training DETR from scratch in minutes; NOT part of the published DETR.

SMCA-style spatial prior (Gao et al. 2021, "Fast Convergence of DETR with Spatially Modulated
Co-Attention"), simplified: each object query owns a learnable reference point (initialised on a grid
over the image) and a learnable width sigma. Every decoder cross-attention logit of the query gets the
additive bias ``-d^2 / (2 sigma^2)``, d being the key's distance to the point in normalised image
coordinates, and the query's box centre is predicted as an offset from the point (in logit space).

``DETR(..., spatial_prior=SpatialPrior(num_queries))`` switches it on (``--spatial_prior``); the published
model has none. Its state-dict keys are ``reference_points`` and ``prior_log_sigma`` at the level of the
DETR module (see ``DETR``), as checkpoints written before this module existed have them.
"""
import math

import torch
from torch import Tensor, nn


class SpatialPrior(nn.Module):
    def __init__(self, num_queries: int, sigma: float = 0.15):
        super().__init__()
        self.reference_points = nn.Parameter(grid_points(num_queries))  # [Q, 2] (x, y) in (0, 1)
        self.prior_log_sigma = nn.Parameter(torch.full((num_queries,), math.log(sigma)))  # [Q]

    def attention_bias(self, mask: Tensor) -> Tensor:
        """mask: [B, H, W] True on padding. Returns the [B, Q, H*W] additive cross-attention bias."""
        not_mask = ~mask
        # key centres in normalised image coordinates (padding excluded from the extent)
        y = (not_mask.cumsum(1, dtype=torch.float32) - 0.5) / not_mask.sum(1, keepdim=True).clamp(min=1)
        x = (not_mask.cumsum(2, dtype=torch.float32) - 0.5) / not_mask.sum(2, keepdim=True).clamp(min=1)
        keys = torch.stack([x.flatten(1), y.flatten(1)], dim=-1)  # [B, HW, 2]
        d2 = ((keys[:, None, :, :] - self.reference_points[None, :, None, :]) ** 2).sum(-1)  # [B, Q, HW]
        sigma2 = torch.exp(2 * self.prior_log_sigma)[None, :, None]
        return -d2 / (2 * sigma2)

    def offset_centres(self, box_logits: Tensor) -> Tensor:
        """[..., Q, 4] box-head outputs before the sigmoid: centres become offsets from the reference points."""
        ref = torch.logit(self.reference_points.clamp(1e-4, 1 - 1e-4))  # [Q, 2]
        return torch.cat([box_logits[..., :2] + ref, box_logits[..., 2:]], dim=-1)


def grid_points(n: int) -> Tensor:
    """[n, 2] (x, y) centres of the first n cells of a ceil(sqrt(n)) x ceil(sqrt(n)) grid over (0, 1)^2."""
    side = math.ceil(math.sqrt(n))
    ticks = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)[:n].clone()
