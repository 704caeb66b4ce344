"""One training step of a tiny DETR on two fixed images, through the project's own builders and training loop.

Used by tests/test_launch.py to check that data parallelism is exact:

    python tests/dist_one_step.py --coco_path DATA --out one.pth                         # 1 process, batch 2
    torchrun --standalone --nproc_per_node 2 tests/dist_one_step.py --coco_path DATA --out two.pth  # 2 x 1

Both pick the first two val images with the same number of objects, resized to the same size, and save (rank 0)
the weights before the step, the gradients the optimizer saw and the weights after its step.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import datasets  # noqa: E402
from engine import train_one_epoch  # noqa: E402
from main import build_optimizer  # noqa: E402
from models import build_model  # noqa: E402
from util.args import get_args_parser  # noqa: E402
from util.dist import destroy_distributed, get_rank, get_world_size, init_distributed_mode  # noqa: E402
from util.nested_tensor import collate_fn  # noqa: E402

TINY = ["--dataset_file", "synthetic", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
        "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64", "--nheads", "2", "--num_queries", "5",
        "--dropout", "0", "--val_size", "64", "--max_size", "80", "--device", "cpu", "--num_workers", "0"]
SIZE = 64


def two_images(args) -> list:
    """The first two val images with equal object counts, resized to SIZE x SIZE (boxes are relative)."""
    dataset = datasets.build_dataset("val", args)
    items = [dataset[i] for i in range(len(dataset))]
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if len(items[i][1]["boxes"]) == len(items[j][1]["boxes"]):
                pair = [items[i], items[j]]
                break
        else:
            continue
        break
    else:
        raise SystemExit("no two val images with the same number of objects")
    out = []
    for image, target in pair:
        image = F.interpolate(image[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
        out.append((image, dict(target, size=torch.tensor([SIZE, SIZE]))))
    return out


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--coco_path", required=True)
    cli.add_argument("--out", required=True)
    own, rest = cli.parse_known_args()
    args = get_args_parser().parse_args(TINY + ["--coco_path", own.coco_path] + rest)
    init_distributed_mode(args)
    args.num_classes = datasets.default_num_classes(args)
    device = torch.device(args.device)

    torch.manual_seed(0)  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
    model, criterion, _ = build_model(args)
    model_without_ddp = model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model_without_ddp, args)
    grads = {}

    def keep_grads(opt, *_):
        grads.update({n: p.grad.detach().clone() for n, p in model_without_ddp.named_parameters()
                      if p.grad is not None})
    optimizer.register_step_pre_hook(keep_grads)

    pair = two_images(args)
    batch = pair if get_world_size() == 1 else [pair[get_rank()]]
    assert get_world_size() in (1, 2), "one process (batch 2) or two (batch 1 each)"
    train_one_epoch(model, criterion, [collate_fn(batch)], optimizer, device, epoch=0, max_norm=args.clip_max_norm)
    if get_rank() == 0:
        params = {k: v.detach().clone() for k, v in model_without_ddp.state_dict().items()}
        torch.save({"grads": grads, "params": params, "before": before, "world_size": get_world_size(),
                    "image_ids": [int(t["image_id"]) for _, t in pair]}, own.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
