"""Checkpoint reading, writing and strict loading with readable errors, and the training state of a resumed run.

One schema: ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'scaler'?}`` holding plain types only
(``args`` is ``vars(args)``), so ``torch.load(..., weights_only=True)`` reads it. Checkpoints of the original
implementation hold an ``argparse.Namespace``; they still load (the Namespace is allow-listed, nothing else).
From a checkpoint to a model (its architecture, its weights): ``models.loader``.
"""
import argparse
import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from util import args as arguments
from util.errors import UserFileNotFoundError, UserRuntimeError, UserValueError

logger = logging.getLogger(__name__)

# What --resume restores beyond the weights; flags given on the command line may override it (see resume_schedule).
SCHEDULE_FLAGS = ("epochs", "lr", "lr_backbone", "lr_drop", "weight_decay", "clip_max_norm", "warmup_iters",
                  "accum_steps")

_COMPONENTS = (
    ("backbone.0", "the backbone"),
    ("backbone.1", "the positional encoding"),
    ("transformer.encoder", "the transformer encoder"),
    ("transformer.decoder", "the transformer decoder"),
    ("class_embed", "the class head"),
    ("bbox_embed", "the box head"),
    ("query_embed", "the object queries"),
    ("input_proj", "the input projection"),
    ("bbox_attention", "the segmentation head"),
    ("mask_head", "the segmentation head"),
    ("reference_points", "the spatial prior (--spatial_prior)"),
    ("prior_log_sigma", "the spatial prior (--spatial_prior)"),
)


def component_of(key: str) -> str:
    """Which part of DETR a state-dict key belongs to, in words."""
    bare = key[len("detr."):] if key.startswith("detr.") else key
    for prefix, name in _COMPONENTS:
        if bare.startswith(prefix):
            return name
    return "an unknown module"


def load_checkpoint(path_or_url: str, local_path_ok: bool = True) -> dict:
    """Read a checkpoint from a path or URL (URLs go through the torch hub cache) with ``weights_only``.
    ``local_path_ok``: whether the caller could take a local path instead of the URL (the offline message says so)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        if path_or_url.startswith(("https://", "http://")):
            ckpt = _load_url(path_or_url, local_path_ok)
        else:
            if os.path.isdir(path_or_url):
                inside = os.path.join(path_or_url, "checkpoint.pth")
                raise UserFileNotFoundError(
                    f"checkpoint {path_or_url!r} is a folder, not a checkpoint file"
                    + (f"; did you mean {inside}?" if os.path.isfile(inside) else ""))
            if not os.path.isfile(path_or_url):
                raise UserFileNotFoundError(f"checkpoint {path_or_url!r} does not exist")
            name = os.path.basename(path_or_url)
            if name.startswith(".") and name.endswith(".tmp"):
                final = os.path.join(os.path.dirname(path_or_url), name[1:].split(".pth.", 1)[0] + ".pth")
                raise UserValueError(f"checkpoint {path_or_url!r} is a temporary file that another process is still "
                                 f"writing (or left by a crash); resume from {final} once it is complete")
            try:
                ckpt = torch.load(path_or_url, map_location="cpu", weights_only=True)
            except Exception as err:
                raise UserRuntimeError(
                    f"checkpoint {path_or_url!r} could not be read: it is not a checkpoint readable with "
                    f"torch.load(weights_only=True) ({_cause(err)}). Checkpoints written by main.py and the "
                    f"original's published ones are; if another job is still writing this file, wait until it is "
                    f"complete") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserValueError(f"checkpoint {path_or_url!r}: expected a dict with a 'model' state dict, got {keys}")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open ``path`` for writing so that it appears complete or not at all.

    The data goes to a temporary file beside it (created like a normal ``open()``, so it gets the usual permissions
    under the user's umask, unlike ``tempfile.mkstemp``'s 0600), is flushed to disk, then renamed over ``path``;
    the folder is flushed too, so a crash or a power loss leaves either the old or the new file, never an empty one.
    On any error the temporary file is removed and ``path`` is untouched. ``durable=False`` skips the two flushes
    to disk (still never a partial file under the final name; a power loss may lose it): for many small files
    that a rerun writes again, e.g. an evaluation's per-image PNGs, where an fsync each costs more than the write.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x" + mode.replace("w", "")) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cached_file(url: str) -> str:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _cause(err: Exception) -> str:
    """The gist of torch.load's error, without its advice to load with weights_only=False (which would run any code
    the file holds) or to file a PyTorch issue."""
    message = str(err)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1].strip().split(". ", 1)[0]
    return f"{type(err).__name__}: {message.splitlines()[0] if message else ''}".rstrip(": ")


def _load_url(url: str, local_path_ok: bool = True) -> dict:
    """A checkpoint through the torch hub cache; offline or unreadable, an error that says where to put the file."""
    cached = cached_file(url)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as err:
        if os.path.exists(cached):
            raise UserRuntimeError(f"checkpoint {url}: the cached file {cached} could not be read "
                               f"({type(err).__name__}: {err}); delete it to download it again") from err
        raise UserRuntimeError(
            f"checkpoint {url} could not be downloaded ({type(err).__name__}: {err}). Offline, download it elsewhere "
            f"and put the file at {cached} (the torch hub cache, $TORCH_HOME/hub/checkpoints/, under the name "
            f"{os.path.basename(cached)}; set TORCH_HOME to use another cache folder)"
            + (", or pass a local path instead of the URL." if local_path_ok else ".")) from err


def save_checkpoint(obj: dict[str, Any], path: str) -> None:
    """``torch.save`` through ``atomic_write``: no partial checkpoint is ever left under ``path``."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_args_json(path: Path, args: argparse.Namespace) -> None:
    """OUTPUT_DIR/args.json: every argument of a run as it starts (after the recipe, the checkpoint's flags and the
    derived values such as num_classes), written atomically."""
    with atomic_write(str(path), "w") as f:
        json.dump(vars(args), f, indent=2, default=str)
        f.write("\n")


def _describe(keys: list[str], limit: int = 5) -> str:
    return ", ".join(f"{k} ({component_of(k)})" for k in keys[:limit]) + (" ..." if len(keys) > limit else "")


def load_model_state(model: nn.Module, state_dict: dict, source: str, reinit_class_head: bool = False) -> list[str]:
    """Load ``state_dict`` into ``model``, every key and shape matching, or raise naming the first offending keys.

    With ``reinit_class_head``, class-head weights of another shape (another number of classes) are skipped,
    the fresh initialisation is kept and a warning names them. Returns the skipped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    skipped = []
    if reinit_class_head:
        skipped = [k for k in mismatched if component_of(k) == "the class head"]
        mismatched = [k for k in mismatched if k not in skipped]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit the model:"]
        if missing:
            lines.append(f"  {len(missing)} model keys missing from the checkpoint: {_describe(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} checkpoint keys the model does not have: {_describe(unexpected)}")
        for k in mismatched[:5]:
            lines.append(f"  shape of {k} ({component_of(k)}): checkpoint {list(state_dict[k].shape)}, "
                         f"model {list(own[k].shape)}")
        ckpt_segm = any(k.startswith("detr.") for k in state_dict)
        model_segm = any(k.startswith("detr.") for k in own)
        if ckpt_segm != model_segm:
            lines.append("  hint: the checkpoint is a " + ("segmentation (--masks)" if ckpt_segm else "box-only")
                         + " model and the model is " + ("a segmentation" if model_segm else "a box-only") + " one")
        if any(component_of(k) == "the class head" for k in mismatched):
            lines.append("  hint: another number of classes; to fine-tune, use --finetune (the class head is "
                         "re-initialised) or set --num_classes to the checkpoint's")
        raise UserValueError("\n".join(lines))
    if skipped:
        logger.warning("%s: class head has another number of classes; not loaded, re-initialised: %s",
                       source, skipped)
    state = {k: v for k, v in state_dict.items() if k not in skipped}
    model.load_state_dict(state, strict=not skipped)
    return skipped


# ----------------------------------------------------------------------------------------------
# Training state: what main.py writes each epoch and --resume restores


def checkpoint_dict(model_without_ddp: nn.Module, optimizer, lr_scheduler, epoch: int, args,
                    scaler=None) -> dict:
    """The schema above, of a run at the end of ``epoch``; ``args``' values that are not plain types are left out."""
    args_dict = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args_dict}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """checkpoint.pth every epoch, plus checkpointNNNN.pth before the lr drop and every 100 epochs (the original's)."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % lr_drop == 0 or (epoch + 1) % 100 == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


def resume_training_state(args, checkpoint: dict, optimizer, lr_scheduler, scaler=None) -> None:
    """--resume, once its weights are in the model (``models.loader.load_weights``): unless --eval, the optimizer,
    lr scheduler, epoch (``args.start_epoch``), schedule (``resume_schedule``) and fp16 gradient scaler. Says what was
    restored, and warns when the checkpoint's categories are not this dataset's."""
    restored = ["model"]
    if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
        restored += ["optimizer", "lr_scheduler", f"epoch (continuing at epoch {args.start_epoch})"]
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
            restored.append(f"fp16 gradient scaler (scale {scaler.get_scale():g})")
        elif scaler is not None:
            logger.info("Resume: the checkpoint has no fp16 gradient scaler (it ran without --amp fp16); "
                        "starting a fresh one")
        resume_schedule(args, checkpoint.get("args") or {}, optimizer, lr_scheduler)
    not_restored = [k for k in ("optimizer", "lr_scheduler", "epoch") if not any(r.startswith(k) for r in restored)]
    logger.info("Resumed from %s: restored %s%s", args.resume, ", ".join(restored),
                f"; not restored: {', '.join(not_restored)}" if not_restored else "")
    ckpt_args = checkpoint.get("args") or {}
    for name in ("category_names", "thing_ids"):  # the checkpoint's categories should be this dataset's
        if ckpt_args.get(name) is not None and ckpt_args[name] != getattr(args, name, None):
            logger.warning("Resume: the checkpoint's %s %s differ from this dataset's %s", name, ckpt_args[name],
                           getattr(args, name, None))


def resume_schedule(args, ckpt_args: dict, optimizer, lr_scheduler) -> None:
    """A resumed run keeps its checkpoint's schedule (``SCHEDULE_FLAGS``); only flags given (``util.args.given_flags``:
    on the command line, or for a caller's Namespace without ``explicit_flags``, set to another value than the
    parser's default) override it. Both what is kept and what is overridden are logged when it differs from
    ``args``."""
    given = arguments.given_flags(args)
    overridden = {}
    for name in SCHEDULE_FLAGS:
        if name not in ckpt_args:
            continue
        old, new = ckpt_args[name], getattr(args, name)
        if name in given:
            if new != old:
                overridden[name] = new
                logger.info("Resume: --%s %s from the command line overrides the checkpoint's %s", name, new, old)
        else:
            if new != old:
                logger.info("Resume: keeping the checkpoint's %s %s (--%s not given)", name, old, name)
            setattr(args, name, old)
    if "weight_decay" in overridden:
        for group in optimizer.param_groups:
            group["weight_decay"] = args.weight_decay
    if overridden.keys() & {"lr", "lr_backbone", "lr_drop"}:
        lr_scheduler.base_lrs = [args.lr, args.lr_backbone]
        lr_scheduler.step_size = args.lr_drop
        decay = lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_scheduler.step_size)
        for group, base in zip(optimizer.param_groups, lr_scheduler.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * decay
        logger.info("Resume: learning rates now %s", [g["lr"] for g in optimizer.param_groups])
