"""Bipartite matching between predictions and ground truth (Hungarian algorithm)."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to predictions minimising a weighted matching cost.

    There are usually more predictions than targets; unmatched predictions are "no object".
    The cost of pairing prediction i with target j is
    ``cost_class * -p_i(c_j) + cost_bbox * L1(b_i, b_j) + cost_giou * -GIoU(b_i, b_j)``.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set at least one of the --set_cost_* flags")

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """
        outputs: 'pred_logits' [B, Q, num_classes + 1], 'pred_boxes' [B, Q, 4] (cx, cy, w, h) normalised.
        targets: B dicts with 'labels' [n_i] (int64) and 'boxes' [n_i, 4] (cx, cy, w, h) normalised.
        Returns B pairs (index_i, index_j) of int64 tensors of length min(Q, n_i): prediction index_i[k]
        is matched to target index_j[k].
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]

        # flatten the batch to compute all costs in one go
        out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)  # [B*Q, num_classes + 1]
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # [B*Q, 4]
        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).to(out_bbox.dtype)

        # -prob approximates the NLL of the target class; the constant 1 of 1 - prob does not change the match
        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(bs, num_queries, -1).cpu()  # [B, Q, sum n_i]
        # Non-finite predictions (a diverging step) would make scipy raise; the loss is non-finite anyway and
        # the training loop reports and skips such a step, so match on a finite stand-in instead.
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

        sizes = [len(v["boxes"]) for v in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
