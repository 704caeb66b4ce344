"""The git revision of the code a run used, printed at start as the original did."""
import os
import subprocess


def get_sha() -> str:
    """'sha: <commit>, status: <clean|has uncommitted changes>, branch: <name>' of this repository, or 'N/A' values
    when git or the repository is unavailable (e.g. a copy without .git)."""
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*command: str) -> str:
        return subprocess.check_output(["git", *command], cwd=cwd, stderr=subprocess.DEVNULL).decode().strip()

    sha, diff, branch = "N/A", "clean", "N/A"
    try:
        sha = run("rev-parse", "HEAD")
        diff = "has uncommitted changes" if run("status", "--porcelain", "--untracked-files=no") else "clean"
        branch = run("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"sha: {sha}, status: {diff}, branch: {branch}"
