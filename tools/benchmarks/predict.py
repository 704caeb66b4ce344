"""Inference throughput of ``python -m tools.predict`` next to plain loops over ``model(...)``, side by side.

    python -m tools.benchmarks.predict                            # 100 synthetic images, synthetic-recipe model
    python -m tools.benchmarks.predict --resume runs/synthetic/checkpoint.pth --num_images 100 --repeats 3

Without --resume the model is the synthetic recipe's (``util.args.SYNTHETIC_RECIPE``) with random weights: the
same computation as a trained one, except for how many detections pass the threshold (and so get drawn).
Each repeat times every variant once, in turn, so that a busy machine slows all of them alike; the table gives the
median images/s of each and its ratio to the bare ``model(...)`` loop.
"""
import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import PIL.Image
import torch

from util.amp import cpu_name

logger = logging.getLogger(__name__)


def synthetic_checkpoint(path: Path) -> Path:
    """A random-weight checkpoint of the synthetic recipe's model (as main.py would write it)."""
    from models import build_model
    from util.args import apply_dataset_recipe, get_args_parser

    args = get_args_parser().parse_args(["--dataset_file", "synthetic"])
    apply_dataset_recipe(args)
    args.num_classes, args.device = 4, "cpu"
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    plain = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    plain["category_names"] = {1: "ellipse", 2: "rectangle", 3: "triangle"}
    torch.save({"model": model.state_dict(), "args": plain}, path)
    return path


def variants(checkpoint: str, folder: Path, out: Path) -> Dict[str, Callable[[], float]]:
    """name -> a function that processes every image of ``folder`` once and returns its wall time in seconds."""
    from datasets.transforms import make_coco_transforms
    from models.detr import PostProcess
    from tools import predict
    from tools.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    model = predictor.model
    files = sorted(folder.glob("*.jpg"))
    transform = make_coco_transforms("val", val_size=predictor.val_size, max_size=predictor.max_size)
    tensors = [transform(PIL.Image.open(f).convert("RGB"), None)[0] for f in files]
    postprocess = PostProcess()

    def bare_loop() -> float:  # preprocessed tensors in memory: the model alone
        start = time.perf_counter()
        with torch.inference_mode():
            for t in tensors:
                model([t])
        return time.perf_counter() - start

    def script_loop() -> float:  # what a user's script would do: read, resize, model, PostProcess
        start = time.perf_counter()
        with torch.inference_mode():
            for f in files:
                image = PIL.Image.open(f).convert("RGB")
                outputs = model([transform(image, None)[0]])
                postprocess(outputs, torch.tensor([[image.height, image.width]]))
        return time.perf_counter() - start

    def command(*extra: str) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            predict.main(["--resume", checkpoint, "--images", str(folder), "--output_dir", str(out), "--overwrite",
                          "--device", "cpu", *extra])
            return time.perf_counter() - start
        return run

    return {
        "model(...) loop, tensors in memory": bare_loop,
        "read + model + PostProcess loop": script_loop,
        "tools.predict --no_draw": command("--no_draw"),
        "tools.predict --no_draw --batch_size 4": command("--no_draw", "--batch_size", "4"),
        "tools.predict (PNGs)": command(),
    }


def benchmark(checkpoint: Optional[str] = None, num_images: int = 100, image_size: int = 128, repeats: int = 3,
              seed: int = 0) -> List[dict]:
    from datasets.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "data", seed=seed, num_train=1, num_val=num_images, image_size=image_size)
        if checkpoint is None:
            checkpoint = str(synthetic_checkpoint(tmp / "random.pth"))
        runs = variants(checkpoint, data / "val2017", tmp / "out")
        for name in ("tools.predict", "tools.inference", "tools.images"):  # else a few lines per command run
            logging.getLogger(name).setLevel(logging.WARNING)
        times: Dict[str, list] = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(run())
    base = num_images / statistics.median(times["model(...) loop, tensors in memory"])
    rows = []
    for name, seconds in times.items():
        rate = num_images / statistics.median(seconds)
        rows.append({"variant": name, "images_per_s": rate, "ratio": rate / base,
                     "spread": (num_images / max(seconds), num_images / min(seconds))})
    return rows


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser("python -m tools.benchmarks.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", default=None, help="checkpoint (default: the synthetic recipe, random weights)")
    parser.add_argument("--num_images", default=100, type=int)
    parser.add_argument("--image_size", default=128, type=int, help="side of the generated synthetic images")
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument("--threads", default=None, type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark(args.resume, args.num_images, args.image_size, args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.num_images} synthetic images of about {args.image_size} px, {cpu_name()} ({os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {load:.1f}), "
          f"model: {args.resume or 'synthetic recipe, random weights'}; median of {args.repeats}")
    print(f"{'variant':42s} {'images/s':>9s} {'ratio':>6s}   range over repeats")
    for r in rows:
        print(f"{r['variant']:42s} {r['images_per_s']:9.1f} {r['ratio']:6.2f}   "
              f"{r['spread'][0]:.1f} .. {r['spread'][1]:.1f}")
    return rows


if __name__ == "__main__":
    main()
