"""tools.gpu_check: its --smoke mode runs every row tiny on CPU (so the GPU check cannot rot between GPU loans),
and the helpers that read its results."""
import os
import subprocess
import sys
from pathlib import Path

from tools.gpu_check import jobs, report, speed

REPO = Path(__file__).resolve().parents[1]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown table the command prints last: [section, check, status, value]."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| section |"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_smoke_runs_every_section_and_no_row_fails():
    env = {k: v for k, v in os.environ.items() if k not in report.LAUNCH_VARS}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--smoke", "--timeout", "300"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{out[-6000:]}\n{proc.stderr[-3000:]}"
    rows = table_rows(out)
    assert {r[0] for r in rows} == {"machine", *report.SECTIONS}, out[-6000:]
    for section, check, status, *_ in rows:
        assert status == "ok" or (status.startswith("skipped: ") and len(status) > len("skipped: ")), \
            f"{section} / {check}: {status}"
    # each section's checks are all there (a row that silently vanished would pass the loop above)
    names = [r[1] for r in rows]
    assert sum("outputs, cpu vs cpu" in n or "outputs, cuda vs cpu" in n for n in names) == 2
    assert any("--amp fp16 (GradScaler)" in n for n in names) and any("GradScaler state through" in n for n in names)
    assert sum(n.startswith("tiny model inference") for n in names) == 8
    assert sum(n.startswith("tiny model training step") for n in names) == 2
    assert sum(n.startswith("synthetic main job") for n in names) == 2
    assert sum(n.startswith("torchrun") for n in names) == 2
    assert "seconds per section: correctness" in out


def test_missing_package_rows_say_which():
    assert report.missing("pytest") is None
    assert report.missing("pytest", "surely-not-installed-pkg") == "skipped: surely-not-installed-pkg missing"


def test_first_epoch_reaching_the_target_ap50():
    lines = [{"epoch": e, "elapsed_s": 10.0 * (e + 1), "test_coco_eval_bbox": [ap / 2, ap] + [0] * 10}
             for e, ap in enumerate((0.3, 0.79, 0.81, 0.9))]
    assert jobs.first_reaching(lines, 0.80)["epoch"] == 2
    assert jobs.first_reaching(lines, 0.95) is None
    assert jobs.first_reaching(lines, None) is None


def test_speed_values_and_failed_gating_rows():
    status, value = speed.speed_value({"status": "ok", "images_per_s": 20.0, "ms_per_image": 50.0,
                                       "peak_mib": 1536.0}, "")
    assert (status, value) == ("ok", "20.0 img/s, 50.00 ms/img, peak 1536 MiB")
    assert speed.speed_value(None, "timed out after 9 s")[0] == "FAIL"
    assert speed.speed_value({"status": "skipped", "reason": "no --compile"}, "")[0] == "skipped: no --compile"
    table = report.Report(reference=False)
    table.add("speed", "a speed row", "FAIL: out of memory")
    assert table.failed() == []  # speed rows report, they do not gate the exit status
    table.check("correctness", "a correctness row", False, "diff 1", "over 1e-4")
    assert [r[1] for r in table.failed()] == ["a correctness row"]
