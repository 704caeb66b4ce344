"""The table ``tools.gpu_check`` prints, and the helpers its sections share: optional packages, error texts and
subprocesses (each in a session of its own, without any launcher's variables, stopped with its children)."""
import contextlib
import importlib.util
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

from tools.gpu_check.speed_worker import error_text  # noqa: F401 (for the sections; defined where the worker has it)

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("correctness", "speed", "jobs", "torchrun")
GATING = ("correctness", "torchrun")  # a FAIL here makes the exit status 1
OPTIONAL_PACKAGES = {"pycocotools": "pycocotools", "hotcoco": "hotcoco", "submitit": "submitit",
                     "panopticapi-lite": "panopticapi"}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Report:
    def __init__(self, reference: bool):
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.reference = reference
        self.seconds: dict[str, float] = {}

    def add(self, section: str, name: str, status: str, value: str = "", original: str = "") -> None:
        self.rows.append((section, name, status, value, original))
        print(f"[{section}] {name}: {status}{'  ' + value if value else ''}"
              f"{'  | original: ' + original if original else ''}", flush=True)

    def check(self, section: str, name: str, passed: bool, value: str, why: str = "") -> None:
        self.add(section, name, "ok" if passed else f"FAIL{': ' + why if why else ''}", value)

    def failed(self, sections=GATING) -> list[tuple]:
        return [r for r in self.rows if r[0] in sections and r[2].startswith("FAIL")]

    def markdown(self) -> str:
        head = ["section", "check", "status", "value"]
        if self.reference:
            head.append("original (facebookresearch/detr)")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = list(row if self.reference else row[:4])
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        lines.append("")
        lines.append("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items())
                     + f"; total {sum(self.seconds.values()) / 60:.1f} min")
        return "\n".join(lines)


def missing(*packages: str) -> Optional[str]:
    """'skipped: <package> missing' for the first of ``packages`` (pip names) that cannot be imported, else None."""
    for name in packages:
        if importlib.util.find_spec(OPTIONAL_PACKAGES.get(name, name)) is None:
            return f"skipped: {name} missing"
    return None


# -- subprocesses ----------------------------------------------------------------------------------------------

def subprocess_env(smoke: bool) -> dict:
    """This environment without any launcher's variables, with this checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = str(REPO)
    if smoke:  # several small processes at once on a few cores: one thread each
        env["OMP_NUM_THREADS"] = "1"
    return env


def start(cmd: list, env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process in a session of its own (so that a stop ends its children too), its output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End ``proc`` and its children (its process group): SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_to_end(cmd: list, env: dict, log: Path, timeout: float, cwd: Path = REPO) -> tuple[Optional[int], str]:
    """Run ``cmd`` for at most ``timeout`` seconds: (exit status, or None when stopped at the timeout; its output)."""
    proc = start(cmd, env, log, cwd)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        code = None
    return code, log.read_text(errors="replace")


def tail(text: str, n: int = 3) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-n:])[-400:]

