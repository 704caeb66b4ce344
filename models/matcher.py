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
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """``forward`` for the outputs of several decoder layers at once (the last one and the aux_outputs):
        the costs of all layers are computed together on the outputs' device, in fp32 whatever the autocast
        state, and copied to the host once. Returns one list of B index pairs per layer."""
        with torch.autocast(layers[0]["pred_logits"].device.type, enabled=False):
            return self._match_layers(layers, targets)

    def _match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        num_layers = len(layers)
        bs, num_queries = layers[0]["pred_logits"].shape[:2]
        # flatten layers and batch to compute all costs in one go
        logits = torch.stack([out["pred_logits"] for out in layers]).float()  # [L, B, Q, num_classes + 1]
        out_prob = logits.flatten(0, 2).softmax(-1)  # [L*B*Q, num_classes + 1]
        out_bbox = torch.stack([out["pred_boxes"] for out in layers]).float().flatten(0, 2)  # [L*B*Q, 4]
        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).float()

        # -prob approximates the NLL of the target class; the constant 1 of 1 - prob does not change the match
        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(num_layers, bs, num_queries, -1).cpu()  # [L, B, Q, sum n_i]: the one host transfer
        # Non-finite predictions (a diverging step) would make scipy raise; the loss is non-finite anyway and
        # the training loop reports and skips such a step, so match on a finite stand-in instead.
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

        sizes = [len(v["boxes"]) for v in targets]
        matches = []
        for layer_cost in cost:
            indices = [linear_sum_assignment(c[i]) for i, c in enumerate(layer_cost.split(sizes, -1))]
            matches.append([(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
                            for i, j in indices])
        return matches


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
