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


PRODUCTION = {
    "DEBUG": "False",
    "SECRET_KEY": "x" * 30 + "production-secret-key-of-enough-length",
    "ALLOWED_HOSTS": "fl.example.org",
}

# Signs in over HTTPS (and asks once over plain HTTP) with the production settings, on a fresh
# database, and prints what the responses carried.
SIGN_IN_OVER_HTTPS = """
import json
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

call_command("migrate", verbosity=0)
get_user_model().objects.create_user("alice", password="alice-password-123")
client = Client(HTTP_HOST="fl.example.org")
plain = client.get("/login/")
form = client.get("/login/", secure=True)
signed_in = client.post("/login/", {"username": "alice", "password": "alice-password-123"}, secure=True)
cookies = {name: dict(cookie) for name, cookie in client.cookies.items()}
print(json.dumps({
    "plain": [plain.status_code, plain.get("Location")],
    "form": [form.status_code, dict(form.headers)],
    "signed_in": [signed_in.status_code, dict(signed_in.headers)],
    "cookies": cookies,
}))
"""


def test_production_https_responses_carry_hsts_and_secure_http_only_cookies(tmp_path):
    import json

    from coordinator.security import CONTENT_SECURITY_POLICY

    result = _manage(
        "shell", "-c", SIGN_IN_OVER_HTTPS, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", **PRODUCTION
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["plain"] == [301, "https://fl.example.org/login/"]
    form_status, form_headers = seen["form"]
    assert form_status == 200
    assert form_headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert form_headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert seen["signed_in"][0] == 302
    assert "includeSubDomains" in seen["signed_in"][1]["Strict-Transport-Security"]
    for name in ("sessionid", "csrftoken"):
        assert seen["cookies"][name]["secure"] is True, name
        assert seen["cookies"][name]["httponly"] is True, name
        assert seen["cookies"][name]["samesite"] == "Lax", name


def test_a_rate_limit_of_zero_is_refused():
    result = _manage("check", TOKEN_FAILURES_PER_IP="0")
    assert result.returncode != 0 and "TOKEN_FAILURES_PER_IP must be 1 or more" in result.stderr
