"""Settings refuse to run production without a real secret, and pass Django's deploy checks."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_debug_off_without_secret_key_refuses_to_start():
    result = _manage("check", DEBUG="False", SECRET_KEY="")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_bad_boolean_is_named():
    result = _manage("check", DEBUG="perhaps")
    assert result.returncode != 0 and "DEBUG must be true or false" in result.stderr


def test_check_deploy_is_clean_with_production_settings():
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DEBUG="False",
        SECRET_KEY="x" * 30 + "production-secret-key-of-enough-length",
        ALLOWED_HOSTS="fl.example.org",
    )
    assert result.returncode == 0, result.stderr


def test_processes_starting_at_once_share_one_embedded_redis(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    environment["VAR_DIR"] = str(tmp_path)
    starters = [
        subprocess.Popen(
            [sys.executable, "manage.py", "embedded_redis", "status"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(4)
    ]
    try:
        assert [starter.wait(timeout=60) for starter in starters] == [0, 0, 0, 0]
        servers = subprocess.run(["pgrep", "-f", f"unixsocket:{tmp_path}"], capture_output=True, text=True)
        assert len(servers.stdout.split()) == 1, servers.stdout
    finally:
        _manage("embedded_redis", "stop", VAR_DIR=str(tmp_path))
