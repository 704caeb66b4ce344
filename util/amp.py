"""Mixed precision (``--amp off|bf16|fp16``): the autocast context, the fp16 gradient scaler, and a check that
warns once when the CPU has no native bf16 (emulated bf16 is much slower than fp32 there)."""
import contextlib
import functools
import logging
import time
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for ``--amp bf16|fp16`` on ``device``; a no-op context for ``off``."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp: expected off, bf16 or fp16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for fp16 (its range needs loss scaling); None for bf16 and fp32."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def to_float(obj: Any) -> Any:
    """Floating-point tensors of a (nested) model output as fp32: losses, matching and post-processing run in fp32
    whatever the autocast state."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float(v) for v in obj)
    return obj


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


# the /proc/cpuinfo flags of CPUs that compute each reduced precision natively
NATIVE_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}


def has_native(amp: str) -> bool:
    """Whether the CPU computes ``amp`` ('bf16' or 'fp16') natively, as read from /proc/cpuinfo."""
    return bool(cpu_flags() & NATIVE_FLAGS[amp])


def slowdown(amp: str, size: int = 256, repeats: int = 3) -> float:
    """Measured time of a bf16/fp16 matmul over the same fp32 one (a tiny probe, well under a second)."""
    a = torch.rand(size, size)
    times = {}
    for dtype in (torch.float32, AMP_DTYPES[amp]):
        x = a.to(dtype)
        x @ x  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            x @ x
        times[dtype] = time.perf_counter() - start
    return times[AMP_DTYPES[amp]] / max(times[torch.float32], 1e-9)


@functools.lru_cache(maxsize=None)
def warn_if_emulated(device_type: str, amp: str) -> bool:
    """Warn once per process when ``--amp bf16|fp16`` runs on a CPU that emulates that precision. Returns whether
    it warned."""
    if device_type != "cpu" or amp == "off" or has_native(amp):
        return False
    logger.warning(
        "--amp %s: this CPU (%s) has no native %s (none of %s in /proc/cpuinfo), so torch emulates it: a %s "
        "matmul just ran %.0fx slower than fp32. Training and evaluation will be SLOWER than with --amp off (fp32) "
        "on this machine; %s pays on CPUs with %s, and on GPUs.",
        amp, cpu_name(), amp, "/".join(sorted(NATIVE_FLAGS[amp])), amp, slowdown(amp), amp,
        " or ".join(sorted(NATIVE_FLAGS[amp])))
    return True
