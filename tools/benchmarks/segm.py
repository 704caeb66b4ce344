"""Peak memory of the mask post-processing (``PostProcessSegm``) for one image, variant by variant.

    python -m tools.benchmarks.segm                 # 100 queries, an 800x1066 image (DETR's COCO evaluation size)

The original upsamples the mask logits of every query of the batch to the padded image size at once;
``PostProcessSegm(chunk_size=100)`` does the same for 100 queries, so it stands for the original here. Each variant
runs in a fresh process and reports how far its peak resident memory rose above the process's memory just before
the call (the peak reset there, /proc/self/clear_refs); all variants produce the same masks for the queries they keep.
"""
import argparse
import json
import re
import resource
import subprocess
import sys
from typing import List, Optional

import torch

from util.amp import cpu_name

VARIANTS = {
    "all queries at once (the original's way)": {"chunk_size": 100},
    "chunks of 10 queries (default)": {"chunk_size": 10},
    "chunks of 10, only scores > 0.7": {"chunk_size": 10, "score_threshold": 0.7},
}


def peak_rise_mib(num_queries: int, height: int, width: int, kwargs: dict) -> float:
    """Runs one post-processing in this process; returns the rise of peak RSS in MiB (Linux: ru_maxrss in KiB)."""
    from models.segmentation import PostProcessSegm

    torch.manual_seed(0)
    outputs = {"pred_masks": torch.randn(1, num_queries, 1, height // 4, width // 4)}
    scores = torch.rand(num_queries)
    results = [{"scores": scores, "labels": torch.zeros(num_queries, dtype=torch.long),
                "boxes": torch.rand(num_queries, 4)}]
    size = torch.tensor([[height, width]])
    before = _reset_peak_kib()
    PostProcessSegm(**kwargs)(results, outputs, size, size)
    return (_peak_kib() - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_kib() -> int:
    """Resets the peak resident memory to the current one where Linux allows it (writing 5 to
    /proc/self/clear_refs), so that a peak reached earlier (imports, allocator state) cannot hide the one measured;
    returns the memory the rise is counted from."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser("python -m tools.benchmarks.segm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_queries", default=100, type=int)
    parser.add_argument("--height", default=800, type=int)
    parser.add_argument("--width", default=1066, type=int)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, in a fresh process
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(peak_rise_mib(args.num_queries, args.height, args.width, json.loads(args.child))))
        return []
    print(f"CPU: {cpu_name()}; {args.num_queries} queries, image {args.height}x{args.width}")
    rows = []
    for name, kwargs in VARIANTS.items():
        out = subprocess.run([sys.executable, "-m", "tools.benchmarks.segm", "--num_queries", str(args.num_queries),
                              "--height", str(args.height), "--width", str(args.width), "--child", json.dumps(kwargs)],
                             check=True, capture_output=True, text=True)
        rows.append({"variant": name, "peak_mib": float(out.stdout.strip().splitlines()[-1])})
    base = rows[0]["peak_mib"]
    print(f"{'variant':<45} {'peak rise MiB':>14} {'ratio':>7}")
    for row in rows:
        ratio = f"{row['peak_mib'] / base:>7.2f}" if base > 0 else f"{'-':>7}"  # tiny sizes: no measurable rise
        print(f"{row['variant']:<45} {row['peak_mib']:>14.0f} {ratio}")
    return rows


if __name__ == "__main__":
    main()
