"""Training compute and step time of the synthetic recipe next to the previous ones, side by side in one run.

    python -m tools.benchmarks.recipe                # 32 batches for the FLOP count, 3 x 10 timed steps
    python -m tools.benchmarks.recipe --flop_batches 8 --timed_steps 4 --repeats 1     # quicker

For each recipe (``RECIPES``: the synthetic recipe before the speed work, the intermediate one, today's
``util.args.SYNTHETIC_RECIPE``) it builds the model and criterion as ``main.py`` does and, on the same training
batches (same shuffling seed, so the same padded sizes), counts forward + backward FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` and times optimizer-free training steps (forward, loss, backward).
The whole run's training compute is FLOPs per iteration x iterations (epochs x batches per epoch). Timed steps
alternate between the recipes, so that a busy machine slows all of them alike; the table gives the median.
"""
import argparse
import copy
import statistics
import time
from typing import Any, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from util.amp import cpu_name

# what each earlier recipe changed with respect to today's SYNTHETIC_RECIPE
RECIPES: Dict[str, Dict[str, Any]] = {
    "before (2 dec layers, 13 ep)": {"dec_layers": 2, "backbone_blocks": 0, "epochs": 13, "lr_drop": 10},
    "6 dec layers, 9 ep": {"dec_layers": 6, "backbone_blocks": 0, "epochs": 9, "lr_drop": 7},
    "today (1-block trunk, 11 ep)": {},
}


def build(overrides: Dict[str, Any], coco_path: Optional[str] = None):
    """(args, model, criterion) of the synthetic recipe with ``overrides``."""
    from models import build_model
    from util import args as arguments

    args = arguments.get_args_parser().parse_args(["--dataset_file", "synthetic"])
    recipe = copy.deepcopy(arguments.SYNTHETIC_RECIPE)
    recipe.update(overrides)
    for name, value in recipe.items():
        setattr(args, name, value)
    args.num_classes, args.device, args.coco_path = 4, "cpu", coco_path
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.train()
    return args, model, criterion


def step(model, criterion, samples, targets) -> None:
    """One training step without the optimizer: forward, loss, backward."""
    outputs = model(samples)
    losses = criterion(outputs, targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flop_batches", type=int, default=32, help="batches whose FLOPs are counted")
    parser.add_argument("--timed_steps", type=int, default=10, help="timed steps per recipe and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coco_path", default=None,
                        help="a synthetic dataset folder (default: the one main.py generates and caches)")
    opts = parser.parse_args(argv)

    from datasets import build_dataset
    from util.nested_tensor import collate_fn

    built = {name: build(over, opts.coco_path) for name, over in RECIPES.items()}
    # the recipes share the data flags (batch size, image sizes): one loader, the same batches for all
    reference = next(iter(built))
    ref_args = built[reference][0]
    loader = torch.utils.data.DataLoader(build_dataset("train", ref_args), batch_size=ref_args.batch_size,
                                         shuffle=True, collate_fn=collate_fn, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = []
    for samples, targets in loader:
        batches.append((samples, list(targets)))
        if len(batches) == max(opts.flop_batches, opts.timed_steps):
            break

    flops: Dict[str, float] = {}
    for name, (_, model, criterion) in built.items():
        total = 0
        for samples, targets in batches[: opts.flop_batches]:
            counter = FlopCounterMode(display=False)
            with counter:
                step(model, criterion, samples, targets)
            total += counter.get_total_flops()
        flops[name] = total / opts.flop_batches

    times: Dict[str, List[float]] = {name: [] for name in built}
    for name, (_, model, criterion) in built.items():  # warm-up
        step(model, criterion, *batches[0])
    for _ in range(opts.repeats):
        for name, (_, model, criterion) in built.items():
            for samples, targets in batches[: opts.timed_steps]:
                start = time.perf_counter()
                step(model, criterion, samples, targets)
                times[name].append(time.perf_counter() - start)

    ref_iters = len(loader) * ref_args.epochs
    ref_time = statistics.median(times[reference])
    lines = [f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; FLOPs on {opts.flop_batches} batches of "
             f"{ref_args.batch_size} (the same for every recipe), step time median of "
             f"{opts.repeats} x {opts.timed_steps} steps",
             "| recipe | GFLOP/iter | iterations | run PFLOP | run compute vs first | s/step | step time vs first "
             "| steps x s/step (min) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (args, _, _) in built.items():
        iters = len(loader) * args.epochs
        run = flops[name] * iters
        median = statistics.median(times[name])
        lines.append(f"| {name} | {flops[name] / 1e9:.2f} | {iters} | {run / 1e15:.4f} | "
                     f"{run / (flops[reference] * ref_iters):.3f}x | {median:.3f} | {median / ref_time:.2f}x "
                     f"| {iters * median / 60:.1f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
