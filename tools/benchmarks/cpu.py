"""Speed of DETR on this machine, measured side by side in one run: one table of ratios.

    python -m tools.benchmarks.cpu            # everything below (about 10 minutes on 2 CPU cores)
    python -m tools.benchmarks.cpu --compile  # also torch.compile (adds minutes of compilation)
    python -m tools.benchmarks.cpu --quick    # tiny sizes: checks that every row runs (the tests use it)

Rows: the machine (CPU model, the ISA flags that matter, measured matmul peak per dtype); R50 inference at
800x1066, batch 1 (our plain fp32 path, our optimised fp32 path = what a hub model in eval mode does, bf16 and fp16
autocast); an R50 training step (batch 2, 512x683; fp32 vs bf16); COCO evaluation of 5,000 images x 100 detections
(pycocotools vs hotcoco); the matcher per training step (6 decoder layers matched one by one vs together); data
loading (images/s of the synthetic training set); with --compile, torch.compile against eager.

"Plain" is the reference path this project had before its speed work, still selectable: frozen batch norm as its
own module after each convolution, contiguous (NCHW) tensors, attention computing its weights. Where the CPU has
no native bf16/fp16, reduced precision is emulated and very slow: those rows are measured at 1/16 of the pixels
against fp32 at the same size, and say so. Absolute times depend on the machine and its load; compare ratios.
"""
import argparse
import copy
import os
import platform
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from util.amp import autocast, cpu_flags, cpu_name, has_native

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls (the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def flops_of(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, size: int = 1024, budget_s: float = 2.0) -> float:
    """Measured GFLOP/s of a size x size matmul in ``dtype`` (repeated for about ``budget_s``)."""
    a, b = torch.rand(size, size).to(dtype), torch.rand(size, size).to(dtype)
    a @ b
    start, n = time.perf_counter(), 0
    while True:
        a @ b
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed > budget_s or (n >= 3 and elapsed > budget_s / 4):
            return 2 * size ** 3 * n / elapsed / 1e9


def plain_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` on the plain path: unfolded frozen batch norm, NCHW, attention with weights."""
    from models.backbone import unfold_frozen_batch_norms

    plain = copy.deepcopy(model)
    unfold_frozen_batch_norms(plain)
    for module in plain.modules():
        if hasattr(module, "channels_last"):
            module.channels_last = False
        if hasattr(module, "need_weights"):
            module.need_weights = True
    return plain


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def section(self, title: str) -> None:
        self.rows.append((f"**{title}**", "", "", "", ""))

    def add(self, name: str, seconds: Optional[float], ratio: Optional[float] = None, gflops: Optional[float] = None,
            peak: Optional[float] = None, note: str = "") -> None:
        rate = f"{gflops / seconds:.0f}" if gflops and seconds else ""
        if rate and peak:
            rate += f" ({100 * gflops / seconds / peak:.0f}% of peak)"
        self.rows.append((name, "" if seconds is None else f"{seconds:.3f}",
                          "" if ratio is None else f"{ratio:.2f}x", rate, note))
        print(f"  {name}: {'' if seconds is None else f'{seconds:.3f} s'} {'' if ratio is None else f'{ratio:.2f}x'}"
              f" {note}", flush=True)

    def markdown(self) -> str:
        head = ("| row | seconds | ratio | GFLOP/s | note |", "|---|---:|---:|---|---|")
        return "\n".join(head + tuple("| " + " | ".join(r) + " |" for r in self.rows))


def machine(table: Table, quick: bool) -> dict[str, float]:
    flags = cpu_flags()
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    print(f"CPU: {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ISA: {isa}; load average {os.getloadavg()[0]:.1f}", flush=True)
    table.section(f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, ISA: {isa}, "
                  f"torch {torch.__version__}")
    size = 256 if quick else 1024
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        native = name == "fp32" or has_native(name)
        # an emulated 1024^2 matmul takes seconds: measure it smaller (its rate hardly depends on the size)
        peaks[name] = matmul_peak(dtype, size if native else size // 4, budget_s=0.5 if quick else 2.0)
        table.add(f"matmul peak {name}", None, gflops=None,
                  note=f"{peaks[name]:.1f} GFLOP/s" + ("" if native else " (no native support: emulated)"))
    return peaks


def _images(shape: tuple[int, int], batch: int):
    from util.nested_tensor import nested_tensor_from_tensor_list

    torch.manual_seed(0)
    return nested_tensor_from_tensor_list([torch.rand(3, *shape) for _ in range(batch)])


def r50_inference(table: Table, peaks: dict, quick: bool) -> None:
    import hubconf

    shape = (200, 266) if quick else (800, 1066)
    small = (shape[0] // 4, shape[1] // 4)
    table.section(f"R50 inference, batch 1, {shape[0]}x{shape[1]} (hub detr_resnet50, random weights, eval)")
    model = hubconf.detr_resnet50().eval()
    plain = plain_reference(model)
    samples = _images(shape, 1)
    repeats = 1 if quick else 3
    with torch.no_grad():
        gflop = flops_of(lambda: model(samples)) / 1e9
        t_plain = timed(lambda: plain(samples), repeats)
        t_fast = timed(lambda: model(samples), repeats)
        table.add("fp32, plain path", t_plain, 1.0, gflop, peaks["fp32"], f"{gflop:.1f} GFLOP per image")
        table.add("fp32, optimised (the default)", t_fast, t_fast / t_plain, gflop, peaks["fp32"],
                  "folded frozen BN + channels-last + fused attention")
        for amp in ("bf16", "fp16"):
            if has_native(amp):
                with autocast(torch.device("cpu"), amp):
                    t = timed(lambda: model(samples), repeats)
                    t_torch = timed(lambda: plain(samples), repeats)
                table.add(f"{amp} autocast, optimised", t, t / t_plain, gflop, peaks[amp])
                table.add(f"{amp} autocast, plain path", t_torch, t_torch / t_plain, gflop, peaks[amp],
                          "what torch gives the unoptimised model")
            else:
                low = _images(small, 1)
                t32 = timed(lambda: model(low), repeats)
                with autocast(torch.device("cpu"), amp):
                    t = timed(lambda: model(low), 1, warmup=0)
                    t_torch = timed(lambda: plain(low), 1, warmup=0)
                table.add(f"{amp} autocast, optimised", t, t / t32, None, None,
                          f"emulated {amp}: at {small[0]}x{small[1]}, ratio to fp32 optimised at that size")
                table.add(f"{amp} autocast, plain path", t_torch, t_torch / t32, None, None,
                          "same size; what torch gives the unoptimised model under the caller's autocast")


def r50_train_step(table: Table, peaks: dict, quick: bool) -> None:
    from models import build_model
    from util.args import get_args_parser

    shape = (128, 171) if quick else (512, 683)
    table.section(f"R50 training step, batch 2, {shape[0]}x{shape[1]} (aux losses, frozen BN, backbone lr 1e-5)")
    args = get_args_parser().parse_args([])
    args.device, args.backbone_weights, args.num_classes = "cpu", "none", 91
    if quick:
        args.enc_layers = args.dec_layers = 1
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.train()
    samples = _images(shape, 2)
    targets = [{"labels": torch.tensor([1, 5, 17]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .4],
                                                                           [.5, .4, .6, .5]])}] * 2

    def step(amp: str, images=samples) -> None:
        from util.amp import to_float

        with autocast(torch.device("cpu"), amp):
            outputs = model(images)
        losses = criterion(to_float(outputs), targets)
        sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
        model.zero_grad(set_to_none=True)

    gflop = flops_of(lambda: step("off")) / 1e9
    t32 = timed(lambda: step("off"), 1 if quick else 3)
    table.add("fp32", t32, 1.0, gflop, peaks["fp32"], f"{gflop:.0f} GFLOP forward + backward")
    if has_native("bf16"):
        t = timed(lambda: step("bf16"), 1 if quick else 3)
        table.add("bf16 autocast", t, t / t32, gflop, peaks["bf16"])
    else:
        low = _images((shape[0] // 4, shape[1] // 4), 2)
        t_low = timed(lambda: step("off", low), 1)
        t = timed(lambda: step("bf16", low), 1, warmup=0)
        table.add("bf16 autocast", t, t / t_low, None, None,
                  f"emulated bf16: at {shape[0] // 4}x{shape[1] // 4}, ratio to fp32 at that size")


def coco_evaluation(table: Table, quick: bool) -> None:
    from tools.benchmarks.coco_eval import benchmark_backends

    n = 200 if quick else 5000
    table.section(f"COCO evaluation, {n} images x 100 detections (bbox)")
    result = benchmark_backends(n, 100)
    reference = result["backends"]["pycocotools"]["seconds"]
    for name, row in result["backends"].items():
        table.add(name, row["seconds"], row["seconds"] / reference, None, None,
                  f"{reference / row['seconds']:.0f}x faster; same 12 stats: {row['identical_stats']}")


def matcher(table: Table, quick: bool) -> None:
    from models.matcher import HungarianMatcher

    layers, batch, queries = 6, 2, 100
    table.section(f"Matcher per training step ({layers} decoder layers, batch {batch}, {queries} queries, 91 classes)")
    g = torch.Generator().manual_seed(0)
    outputs = [{"pred_logits": torch.randn(batch, queries, 92, generator=g),
                "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25} for _ in range(layers)]
    targets = [{"labels": torch.randint(1, 91, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3}
               for n in (7, 12)]
    m = HungarianMatcher(1, 5, 2)
    repeats = 5 if quick else 50
    one_by_one = timed(lambda: [m(o, targets) for o in outputs], repeats)
    together = timed(lambda: m.match_layers(outputs, targets), repeats)
    table.add("layer by layer (one host copy each)", one_by_one, 1.0)
    table.add("all layers together (one host copy)", together, together / one_by_one)


def data_loading(table: Table, quick: bool) -> None:
    import tempfile

    from datasets import build_dataset
    from datasets.synthetic import generate
    from util.args import SYNTHETIC_RECIPE, get_args_parser
    from util.nested_tensor import collate_fn

    table.section("Data loading, synthetic training set (JPEG decode + DETR transforms + collate), main process")
    with tempfile.TemporaryDirectory() as folder:
        root = generate(os.path.join(folder, "data"), seed=0, num_train=32 if quick else 256, num_val=2)
        args = get_args_parser().parse_args(["--dataset_file", "synthetic", "--coco_path", str(root)])
        for name, value in SYNTHETIC_RECIPE.items():
            setattr(args, name, value)
        dataset = build_dataset("train", args)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_fn, num_workers=0)
        seconds = timed(lambda: [None for _ in loader], 1)
        table.add("synthetic recipe (128 px)", seconds / len(dataset), None, None, None,
                  f"{len(dataset) / seconds:.0f} images/s (seconds per image)")
        args.scales, args.max_size, args.val_size = [800], 1333, 800  # COCO's sizes, upscaling the small images
        dataset = build_dataset("train", args)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn, num_workers=0)
        seconds = timed(lambda: [None for _ in loader], 1)
        table.add("COCO sizes (shorter side 800)", seconds / len(dataset), None, None, None,
                  f"{len(dataset) / seconds:.0f} images/s (seconds per image)")


def compiled(table: Table, peaks: dict, quick: bool) -> None:
    import hubconf

    shape = (200, 266) if quick else (800, 1066)
    table.section(f"torch.compile (inductor), R50 inference batch 1 {shape[0]}x{shape[1]}")
    model = hubconf.detr_resnet50().eval()
    samples = _images(shape, 1)
    with torch.no_grad():
        gflop = flops_of(lambda: model(samples)) / 1e9
        eager = timed(lambda: model(samples), 1 if quick else 3)
        try:
            fast = torch.compile(model)
            start = time.perf_counter()
            fast(samples)
            compile_s = time.perf_counter() - start
            t = timed(lambda: fast(samples), 1 if quick else 3, warmup=0)
        except Exception as err:  # no C++ compiler, unsupported platform ...: say so, as main.py --compile does
            table.add("compiled", None, note=f"torch.compile failed here: {type(err).__name__}: {err}"[:200])
            return
    table.add("eager, optimised", eager, 1.0, gflop, peaks["fp32"])
    table.add("compiled", t, t / eager, gflop, peaks["fp32"], f"first call (compilation) {compile_s:.0f} s")


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description="DETR speed on this machine, side by side.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that every row runs")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=("inference", "train", "coco_eval", "matcher", "data", "compile"),
                        help="run only these sections (the machine section always runs)")
    args = parser.parse_args(argv)
    table = Table()
    peaks = machine(table, args.quick)
    sections = {"inference": lambda: r50_inference(table, peaks, args.quick),
                "train": lambda: r50_train_step(table, peaks, args.quick),
                "coco_eval": lambda: coco_evaluation(table, args.quick),
                "matcher": lambda: matcher(table, args.quick),
                "data": lambda: data_loading(table, args.quick),
                "compile": lambda: compiled(table, peaks, args.quick)}
    chosen = args.only if args.only is not None else [s for s in sections if s != "compile" or args.compile]
    for name in chosen:
        sections[name]()
    text = table.markdown()
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
