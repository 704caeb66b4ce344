"""Plots of training logs and precision/recall curves, written to PNG files.

    from pathlib import Path
    from util.plot_utils import plot_logs, plot_precision_recall
    fig, axs, png = plot_logs([Path('outputs/run1'), Path('outputs/run2')])
    fig, axs, png = plot_precision_recall([Path('outputs/run1/eval/latest.pth')])

Figures are drawn on matplotlib's Agg canvas (never an interactive window) and returned, so they can
also be shown in a notebook.
"""
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = Union[str, Path]

# 'mAP' is AP@[.50:.95], the COCO metric (element 0 of test_coco_eval_bbox). The original DETR
# plotted element 1 (AP@.50) under the name 'mAP'; ask for 'AP50' to get that curve.
COCO_STATS_FIELDS = {"mAP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5,
                     "AR1": 6, "AR10": 7, "AR100": 8}


def _as_paths(paths, what: str) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"no {what} given")
    return paths


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a log.txt (blank lines skipped)."""
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_number}: not a JSON line ({e.msg})") from e
    return rows


def _column(rows: list[dict], key: str, index: Optional[int] = None) -> np.ndarray:
    """One value per row, NaN where the row lacks it."""
    values = []
    for row in rows:
        value = row.get(key)
        if index is not None:
            value = value[index] if isinstance(value, (list, tuple)) and len(value) > index else None
        values.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return np.array(values, dtype=np.float64)


def ewm_mean(values: np.ndarray, com: float) -> np.ndarray:
    """Exponentially weighted mean with centre of mass `com` (pandas' ewm(com).mean(), adjust=True);
    NaNs are skipped. com=0 returns the values."""
    alpha = 1.0 / (1.0 + com)
    out = np.full_like(values, math.nan)
    weighted_sum, weight = 0.0, 0.0
    for i, value in enumerate(values):
        weighted_sum *= 1 - alpha
        weight *= 1 - alpha
        if not math.isnan(value):
            weighted_sum += value
            weight += 1.0
        if weight > 0 and not math.isnan(value):
            out[i] = weighted_sum / weight
    return out


def _new_figure(ncols: int, figsize=(16, 5)):
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axs = fig.subplots(ncols=ncols, squeeze=False)[0]
    return fig, axs


def plot_logs(logs: Union[PathLike, Sequence[PathLike]],
              fields: Sequence[str] = ("class_error", "loss_bbox_unscaled", "mAP"),
              ewm_col: float = 0, log_name: str = "log.txt", output: Optional[PathLike] = None):
    """Plot fields of the JSON-lines logs of one or more runs, one panel per field.

    logs: run folders, each holding `log_name` (as main.py writes it with --output_dir), or the log files
        themselves.
    fields: a metric logged as `train_<field>` / `test_<field>` (drawn solid / dashed), or a COCO
        statistic of `test_coco_eval_bbox`: 'mAP' (AP@[.50:.95]; the original plotted AP@.50 under
        this name), 'AP50', 'AP75', ... (see COCO_STATS_FIELDS).
    ewm_col: centre of mass of the exponential smoothing (0: none).
    output: PNG path; default `plot_logs.png` in the first run's folder.
    Returns (figure, axes, png_path).
    """
    files = []
    for path in _as_paths(logs, "log folders"):
        if path.is_file():  # the log file itself
            files.append(path)
        elif not path.is_dir():
            raise FileNotFoundError(f"{path} not found: expected a run's folder (its --output_dir, holding "
                                    f"{log_name}) or a log file")
        elif not (path / log_name).is_file():
            raise FileNotFoundError(f"{path / log_name} not found (is {path} a run's --output_dir?)")
        else:
            files.append(path / log_name)
    logs = [f.parent for f in files]
    runs = [read_log(f) for f in files]

    fig, axs = _new_figure(len(fields))
    colours = [f"C{i % 10}" for i in range(len(logs))]
    for rows, colour in zip(runs, colours):
        epochs = _column(rows, "epoch")
        x = epochs if not np.isnan(epochs).any() else np.arange(len(rows), dtype=np.float64)
        for ax, field in zip(axs, fields):
            if field in COCO_STATS_FIELDS:
                series = [(_column(rows, "test_coco_eval_bbox", COCO_STATS_FIELDS[field]), "-")]
            else:
                series = [(_column(rows, f"{prefix}_{field}"), style) for prefix, style in (("train", "-"),
                                                                                            ("test", "--"))]
            for y, style in series:
                # epochs without the value (e.g. not evaluated: --eval_every) are skipped, the line joins the others
                keep = ~np.isnan(y)
                ax.plot(x[keep], ewm_mean(y[keep], ewm_col), style, color=colour)
    names = [folder.name or str(folder) for folder in logs]
    for ax, field in zip(axs, fields):
        handles = ax.get_lines()
        if field in COCO_STATS_FIELDS:
            ax.legend(handles, names)
        else:  # two lines per run: label the train one with the run, the test one "(test)"
            ax.legend(handles, [f"{n}{suffix}" for n in names for suffix in ("", " (test)")])
        ax.set_title(field)
        ax.set_xlabel("epoch")

    png = Path(output) if output is not None else logs[0] / "plot_logs.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    return fig, axs, png


def _nanmean(values: np.ndarray, axis=None):
    with warnings.catch_warnings():  # all-NaN slices (no ground truth at all) are NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _load_eval(path: Path):
    """An eval file: plain types (main.py's) load with weights_only; a raw COCOeval.eval (the original's)
    holds a pycocotools Params object, which needs full unpickling: only open files you trust."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def _as_numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def plot_precision_recall(files: Union[PathLike, Sequence[PathLike]], naming_scheme: str = "iter",
                          output: Optional[PathLike] = None):
    """Precision/recall and score/recall curves at IoU 0.5, all areas, 100 detections, averaged over
    the categories that have ground truth, from saved COCOeval.eval dicts.

    files: .pth files holding a dict with 'precision' [T, R, K, A, M] (and optionally 'recall'
        [T, K, A, M], 'scores' like precision, 'params' with recThrs, as a Params object or a dict),
        e.g. a saved COCOeval.eval or the eval/latest.pth that main.py writes.
    naming_scheme: 'iter' names a curve by the file stem, 'exp_id' by the run folder
        (<run>/eval/<file>.pth).
    output: PNG path; default `<folder of the first file>/precision_recall.png`.
    Returns (figure, axes, png_path). Unlike the original, categories without ground truth
    (precision -1) are left out of the averages instead of being averaged in as -1.
    """
    files = _as_paths(files, "eval files")
    if naming_scheme == "exp_id":
        names = [f.parts[-3] if len(f.parts) >= 3 else f.stem for f in files]
    elif naming_scheme == "iter":
        names = [f.stem for f in files]
    else:
        raise ValueError(f"naming_scheme {naming_scheme!r} not supported: expected 'iter' or 'exp_id'")

    fig, axs = _new_figure(2)
    colours = [f"C{i % 10}" for i in range(len(files))]
    for path, colour, name in zip(files, colours, names):
        if not path.is_file():
            raise FileNotFoundError(f"eval file {path} not found")
        data = _load_eval(path)
        if not isinstance(data, dict) or "precision" not in data:
            raise ValueError(f"{path}: expected a COCOeval.eval dict with 'precision', found "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
        precision = _as_numpy(data["precision"]).astype(np.float64)  # [T, R, K, A, M]
        precision[precision < 0] = np.nan  # -1: category without ground truth
        params = data.get("params")  # a pycocotools Params, or a plain dict of its fields
        rec_thrs = params.get("recThrs") if isinstance(params, dict) else getattr(params, "recThrs", None)
        rec_thrs = _as_numpy(rec_thrs) if rec_thrs is not None else np.linspace(0, 1, precision.shape[1])
        curve = _nanmean(precision[0, :, :, 0, -1], axis=1)  # IoU .5, all areas, max dets: [R]
        axs[0].plot(rec_thrs, curve, color=colour)
        summary = f"{naming_scheme} {name}: mAP@50={_nanmean(curve) * 100:05.1f}"
        if data.get("scores") is not None:
            scores = _as_numpy(data["scores"]).astype(np.float64)
            scores[scores < 0] = np.nan
            score_curve = _nanmean(scores[0, :, :, 0, -1], axis=1)
            axs[1].plot(rec_thrs, score_curve, color=colour)
            summary += f", score={_nanmean(score_curve):0.3f}"
        if data.get("recall") is not None:
            recall = _as_numpy(data["recall"]).astype(np.float64)  # [T, K, A, M]
            recall[recall < 0] = np.nan
            prec, rec = _nanmean(curve), _nanmean(recall[0, :, 0, -1])
            summary += f", f1={2 * prec * rec / (prec + rec + 1e-8):0.3f}"
        print(summary)
    axs[0].set_title("Precision / Recall")
    axs[0].set_xlabel("recall")
    axs[0].legend(names)
    axs[1].set_title("Scores / Recall")
    axs[1].set_xlabel("recall")
    if axs[1].get_lines():
        axs[1].legend(names)

    png = Path(output) if output is not None else files[0].parent / "precision_recall.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    return fig, axs, png
