"""``python -m tools.gpu_check``: the command (see the package's docstring for what it checks and how to run it)."""
import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from tools.gpu_check.correctness import correctness
from tools.gpu_check.jobs import jobs, torchrun
from tools.gpu_check.report import OPTIONAL_PACKAGES, SECTIONS, Report, error_text, missing
from tools.gpu_check.speed import speed

# the tiny model as main.py flags, for --smoke's jobs (every flag explicit, so the synthetic recipe applies to
# none of them)
TINY_FLAGS = ["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_layer", "layer4",
              "--hidden_dim", "32", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64",
              "--nheads", "2", "--num_queries", "10", "--dropout", "0", "--scales", "64", "--max_size", "80",
              "--val_size", "64", "--crop_scales", "--warmup_iters", "0", "--lr_drop", "100", "--batch_size", "4"]


def sizes(smoke: bool) -> dict:
    """What each row runs on: the full check, or --smoke's tiny version of every row."""
    if smoke:
        return dict(model="tiny", check_shapes=[(48, 64), (56, 48)], infer_shape=(64, 80), infer_batches=[1, 2],
                    train_shape=(64, 80), train_batch=2, warmup=1, iters=1, compile_backend="eager",
                    job_data=dict(num_train=16, num_val=8, image_size=64), job_flags=TINY_FLAGS + ["--epochs", "1"],
                    target_ap50=None, run_data=dict(num_train=8, num_val=4, image_size=64), run_flags=TINY_FLAGS)
    return dict(model="r50", check_shapes=[(480, 640), (512, 576)], infer_shape=(800, 1066), infer_batches=[1, 8],
                train_shape=(800, 1066), train_batch=4, warmup=3, iters=10, compile_backend="inductor",
                job_data=None, job_flags=[], target_ap50=0.80,
                run_data=dict(num_train=64, num_val=16, image_size=128), run_flags=["--epochs", "1"])


# -- 0. the machine --------------------------------------------------------------------------------------------

def machine(report: Report, device) -> None:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        what = "CPU (no CUDA device: rows compare the CPU with itself)"
    report.add("machine", "device", "ok", f"{what}; torch {torch.__version__}")
    found = [p for p in OPTIONAL_PACKAGES if missing(p) is None]
    lacking = [p for p in OPTIONAL_PACKAGES if p not in found]
    report.add("machine", "packages", "ok", f"found: {', '.join(found) or 'none'}"
               + (f"; missing: {', '.join(lacking)} (their rows are skipped)" if lacking else ""))


# -- the command -----------------------------------------------------------------------------------------------

def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                     description="One prepared check of DETR's CUDA path: correctness against the "
                                                 "CPU, speed, the synthetic main job, torchrun with NCCL.")
    parser.add_argument("--smoke", action="store_true",
                        help="every row tiny (tiny model, small images, 1-epoch jobs, gloo): runs on CPU in a minute")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    parser.add_argument("--skip_jobs", action="store_true", help="leave out the synthetic main jobs (section 3)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a checkout of facebookresearch/detr: its speed rows beside ours (same GPU)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (with --smoke)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds allowed to each subprocess")
    parser.add_argument("--job_cap", type=float, default=100,
                        help="seconds after which a synthetic job is stopped if AP50 >= 0.80 was not reached")
    parser.add_argument("--serial_jobs", action="store_true",
                        help="run the fp32 and bf16 synthetic jobs one after the other instead of at once (up to "
                             "twice the time)")
    parser.add_argument("--job_workers", type=int, default=None,
                        help="--num_workers of the synthetic jobs (default 4; 0 with --smoke)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("tools.gpu_check: no CUDA device here; the full check is for a GPU. On CPU run "
                         "`python -m tools.gpu_check --smoke`.")
    if args.reference is not None and not (args.reference / "hubconf.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no hubconf.py there (expected a facebookresearch/detr "
                         f"checkout)")
    cfg = sizes(args.smoke)
    if args.smoke:  # tiny tensors gain nothing from threads, and a shared CPU loses much to their spinning
        torch.set_num_threads(1)
    sections = list(args.only or SECTIONS)
    if args.skip_jobs and "jobs" in sections:
        sections.remove("jobs")
    workers = args.job_workers if args.job_workers is not None else (0 if args.smoke else 4)
    report = Report(reference=args.reference is not None)
    machine(report, device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        work = Path(folder)
        runs = {"correctness": lambda: correctness(report, cfg, device),
                "speed": lambda: speed(report, cfg, device, args.timeout, args.smoke,
                                       args.reference.resolve() if args.reference else None, work),
                "jobs": lambda: jobs(report, cfg, device, args.timeout, args.job_cap, workers, args.smoke, work,
                                     args.serial_jobs),
                "torchrun": lambda: torchrun(report, cfg, device, args.timeout, args.smoke, work)}
        for section in SECTIONS:
            if section not in sections:
                continue
            start_s = time.time()
            try:
                runs[section]()
            except Exception as err:  # a section that cannot run at all is one failed row, the others still run
                report.add(section, "section", f"FAIL: {error_text(err)}")
            report.seconds[section] = time.time() - start_s
    print("\n" + report.markdown(), flush=True)
    failed = report.failed()
    if failed:
        print(f"\n{len(failed)} correctness/torchrun row(s) FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
