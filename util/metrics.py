import torch
from torch import Tensor


@torch.no_grad()
def accuracy(output: Tensor, target: Tensor, topk: tuple[int, ...] = (1,)) -> list[Tensor]:
    """Top-k accuracy in percent of ``output`` ``[N, C]`` logits against ``target`` ``[N]`` labels."""
    if target.numel() == 0:
        return [torch.zeros([], device=output.device)]
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand(maxk, -1))
    return [correct[:k].reshape(-1).float().sum(0).mul_(100.0 / target.numel()) for k in topk]
