"""Section 1 of ``tools.gpu_check``: CUDA computes what the CPU computes (TF32 off).

The hub models ``detr_resnet50`` and ``detr_resnet50_panoptic`` (random weights, ``pretrained=False``, built through
hubconf, nothing downloaded) give the CPU's outputs within 1e-4 on CUDA; one training step of the R50 model
(main.py's defaults, dropout 0 so that both devices compute the same function) gives the CPU's losses within 1e-4
and gradients within 1e-3 relative (per parameter, max abs diff over max |grad|); ``--amp bf16`` and ``--amp fp16``
steps (fp16 with its GradScaler) are finite and within 2% of the fp32 loss; the fp16 scaler's state round-trips
through a checkpoint written and read by ``util.checkpoint`` on CUDA.
"""
import copy
import os
import tempfile

from tools.gpu_check.report import Report, error_text
# the speed worker's inputs and model arguments, so that both sections feed the models the same way
from tools.gpu_check.speed_worker import normalised_images, parser_defaults, random_targets, tf32, weighted_loss


def model_args(cfg: dict, **overrides):
    """main.py's defaults (util.args: no pycocotools needed), the tiny model's with --smoke, on the CPU, for a model
    built outside main.py; dropout 0: its random masks differ between devices."""
    args = parser_defaults(cfg["model"])
    args.dropout = 0.0
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def hub_model(name: str, cfg: dict):
    """The hub model (random weights) or, with --smoke, a tiny model of the same kind."""
    import torch

    torch.manual_seed(0)
    if cfg["model"] == "r50":
        import hubconf

        return getattr(hubconf, name)(pretrained=False)
    from models import build_model

    masks = name.endswith("panoptic")  # the mask head's GroupNorm(8) needs hidden_dim % 128 == 0 and 8 heads
    args = model_args(cfg, masks=masks, aux_loss=False, **(dict(hidden_dim=128, nheads=8) if masks else {}))
    return build_model(args)[0]


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest |a - b| over the tensors of two output dicts, and the key where it is."""
    import torch

    worst, where = 0.0, ""
    for k, v in a.items():
        if torch.is_tensor(v) and v.is_floating_point():
            d = (v.detach().float().cpu() - b[k].detach().float().cpu()).abs().max().item()
            if not d <= worst:  # NaN counts as the worst
                worst, where = d, k
    return worst, where


def check_outputs(report: Report, cfg: dict, device, versus: str) -> None:
    import torch

    label = "hub {}" if cfg["model"] == "r50" else "tiny stand-in for hub {}"
    shapes = cfg["check_shapes"]
    for name in ("detr_resnet50", "detr_resnet50_panoptic"):
        row = f"{label.format(name)} outputs, {versus}, 2 images {shapes[0][0]}x{shapes[0][1]} + " \
              f"{shapes[1][0]}x{shapes[1][1]}"
        try:
            model = hub_model(name, cfg).eval()
            images = normalised_images(shapes)
            with torch.no_grad():
                ref = model(images)
                out = copy.deepcopy(model).to(device)([image.to(device) for image in images])
            diff, where = max_abs_diff(ref, out)
            report.check("correctness", row, diff <= 1e-4, f"max abs diff {diff:.1e} ({where}); tolerance 1e-4",
                         "over 1e-4")
        except Exception as err:
            report.add("correctness", row, f"FAIL: {error_text(err)}")


def loss_and_grads(model, criterion, images, targets, amp: str, device, scaler=None):
    """One forward + backward as engine.train_one_epoch does it: autocast around the model only, losses in fp32;
    with ``scaler`` the loss is scaled and the gradients unscaled in place. Returns (losses, total, grads)."""
    from util.amp import autocast, to_float

    model.zero_grad(set_to_none=True)
    with autocast(device, amp):
        outputs = model(images)
    losses = criterion(to_float(outputs), targets)
    total = weighted_loss(losses, criterion.weight_dict)
    (scaler.scale(total) if scaler is not None else total).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, total.detach(), grads


def check_training(report: Report, cfg: dict, device, versus: str) -> None:
    import torch
    from models import build_model

    name = "R50" if cfg["model"] == "r50" else "tiny"
    torch.manual_seed(0)
    # dropout 0 (model_args); frozen batch norm: train mode is otherwise eval's function
    model, criterion, _ = build_model(model_args(cfg))
    model.train()
    counts = [3 + i for i in range(len(cfg["check_shapes"]))]  # boxes per image
    images, targets = normalised_images(cfg["check_shapes"]), random_targets(counts)
    dev_model, dev_criterion = copy.deepcopy(model).to(device), copy.deepcopy(criterion).to(device)
    dev_images, dev_targets = [image.to(device) for image in images], random_targets(counts, device)  # the same

    row = f"{name} training step (fp32, aux losses): losses, {versus}"
    try:
        ref_losses, ref_total, ref_grads = loss_and_grads(model, criterion, images, targets, "off", torch.device("cpu"))
        losses, total, grads = loss_and_grads(dev_model, dev_criterion, dev_images, dev_targets, "off", device)
        # the weighted losses (class_error and cardinality_error are logged metrics, not losses)
        diffs = {k: abs(losses[k].item() - v.item()) for k, v in ref_losses.items() if k in criterion.weight_dict}
        diffs["total"] = abs(total.item() - ref_total.item())
        worst = max(diffs, key=lambda k: diffs[k] if diffs[k] == diffs[k] else float("inf"))
        report.check("correctness", row, all(d <= 1e-4 for d in diffs.values()),
                     f"{len(diffs)} losses, max abs diff {diffs[worst]:.1e} ({worst}); total {ref_total.item():.4f}",
                     "over 1e-4")
        rel = {}
        for n, g in ref_grads.items():
            scale = max(g.abs().max().item(), 1e-12)
            rel[n] = (grads[n].float().cpu() - g).abs().max().item() / scale
        worst = max(rel, key=lambda k: rel[k] if rel[k] == rel[k] else float("inf"))
        same_set = grads.keys() == ref_grads.keys()
        report.check("correctness", f"{name} training step (fp32): gradients, {versus}",
                     same_set and rel[worst] <= 1e-3,
                     f"{len(rel)} parameters, max abs diff / max abs grad {rel[worst]:.1e} ({worst}); tolerance 1e-3",
                     "over 1e-3" if same_set else "not the same parameters have gradients")
    except Exception as err:
        report.add("correctness", row, f"FAIL: {error_text(err)}")
        return
    fp32_total = total.item()
    del model, criterion, ref_grads
    fp16 = check_amp(report, name, dev_model, dev_criterion, dev_images, dev_targets, device, fp32_total)
    check_scaler_checkpoint(report, fp16, dev_criterion, dev_images, dev_targets, device)


def check_amp(report: Report, name: str, model, criterion, images, targets, device, fp32_total: float):
    """--amp bf16 and fp16 steps: finite, and within 2% of the fp32 loss. Returns the fp16 GradScaler (None on
    failure). fp16 gets up to 17 tries: an overflow at the scaler's first scale (65536) is what the scaler is for:
    it skips the step and halves the scale, as in training (the tiny model overflows down to 2048)."""
    import torch
    from util.amp import grad_scaler

    fp16_scaler = None
    for amp in ("bf16", "fp16"):
        row = f"{name} training step --amp {amp}{' (GradScaler)' if amp == 'fp16' else ''} on {device.type}"
        try:
            net = copy.deepcopy(model)
            optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
            scaler = grad_scaler(device, amp)
            tries = 17 if scaler is not None else 1
            for attempt in range(1, tries + 1):
                optimizer.zero_grad(set_to_none=True)
                _, total, grads = loss_and_grads(net, criterion, images, targets, amp, device, scaler)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                finite = all(torch.isfinite(g).all() for g in grads.values())
                if scaler is None:
                    optimizer.step()
                    break
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
                scaler.update()
                if finite:
                    break
            rel = abs(total.item() - fp32_total) / abs(fp32_total)
            params_finite = all(torch.isfinite(p).all() for p in net.parameters())
            value = f"loss {total.item():.4f} vs fp32 {fp32_total:.4f} ({100 * rel:.2f}%); gradients " \
                    f"{'finite' if finite else 'NOT finite'}"
            if scaler is not None:
                value += f"; step taken at try {attempt} (scale {scale:g})" if finite else f" after {tries} tries"
            ok = bool(torch.isfinite(total)) and finite and params_finite and rel <= 0.02
            report.check("correctness", row, ok, value, "not finite" if not (finite and params_finite)
                         else "over 2% from fp32")
            if amp == "fp16" and ok:
                fp16_scaler = (net, optimizer, scaler)
        except Exception as err:
            report.add("correctness", row, f"FAIL: {error_text(err)}")
    return fp16_scaler


def check_scaler_checkpoint(report: Report, fp16, criterion, images, targets, device) -> None:
    """The fp16 GradScaler's state (with the model and optimizer) through util.checkpoint (atomic write,
    weights_only read) into a fresh scaler on the same device, which then scales one more step."""
    import torch
    from util.checkpoint import load_checkpoint, save_checkpoint

    row = f"fp16 GradScaler state through a checkpoint on {device.type}"
    if fp16 is None:
        report.add("correctness", row, "FAIL: no fp16 step to take the scaler from (see the row above)")
        return
    net, optimizer, scaler = fp16
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "checkpoint.pth")
            save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                             "args": {"amp": "fp16"}, "scaler": scaler.state_dict()}, path)
            checkpoint = load_checkpoint(path)
        restored = torch.amp.GradScaler(device.type)
        restored.load_state_dict(checkpoint["scaler"])
        same = restored.state_dict() == scaler.state_dict() and restored.get_scale() == scaler.get_scale()
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = restored.state_dict()
        # the restored scaler works: one more step, scaled, unscaled, taken (or skipped on overflow) and updated
        _, total, _ = loss_and_grads(net, criterion, images, targets, "fp16", device, restored)
        restored.unscale_(optimizer)
        restored.step(optimizer)
        restored.update()
        finite = bool(torch.isfinite(total))
        report.check("correctness", row, same and finite,
                     f"scale {state['scale']:g}, growth tracker {state['_growth_tracker']}; equal to the saved "
                     f"scaler's: {same}; next step's loss {total.item():.4f}, scale then {restored.get_scale():g}",
                     "restored state differs" if not same else "next step not finite")
    except Exception as err:
        report.add("correctness", row, f"FAIL: {error_text(err)}")


def correctness(report: Report, cfg: dict, device) -> None:
    versus = f"{device.type} vs cpu" + (" (no GPU: the CPU against itself)" if device.type == "cpu" else "")
    with tf32(False):
        check_outputs(report, cfg, device, versus)
        check_training(report, cfg, device, versus)
