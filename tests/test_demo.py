"""`python manage.py demo --exit-when-done` on the embedded defaults: rounds run, then nothing is left running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[str]:
    result = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if text in line and "ps -eo" not in line]


@pytest.mark.slow
def test_demo_runs_two_rounds_and_leaves_no_process(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environment["VAR_DIR"] = str(tmp_path / "var")
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "demo",
            "--sites",
            "2",
            "--rounds",
            "2",
            "--port",
            "8791",
            "--exit-when-done",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    round_lines = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert len(round_lines) == 2, result.stdout
    for line in round_lines:
        assert "2 site(s) contributed" in line and "federated mean Dice" in line and "epsilon spent" in line
    assert "Dashboard: http://127.0.0.1:8791/" in result.stdout
    # Everything it started (web, worker, agents, the embedded Redis in its var folder) is gone.
    assert _processes_mentioning(str(tmp_path)) == []
    assert _processes_mentioning("127.0.0.1:8791") == []
