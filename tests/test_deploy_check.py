"""Configuration: production values pass Django's deploy check; bad values fail at start-up."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args, env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DEBUG")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "q8v$2mZ!pL0x@7rT^kW3nY6bH9cJ1dF5gS4aE8uI0oP2-Zr7Kp1Lw9Qx4Vn8Mb3",
    "ALLOWED_HOSTS": "cs.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://cs.example.com",
    "CSP_HTTPS": "true",
}


def test_deploy_check_passes_with_production_settings(tmp_path):
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env={**PRODUCTION, "CSP_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_check_fails_with_development_defaults(tmp_path):
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env={"DEBUG": "true", "CSP_DATA_DIR": str(tmp_path)})
    assert result.returncode != 0


@pytest.mark.parametrize(
    "name, value",
    [
        ("DEBUG", "maybe"),
        ("DATABASE_URL", "nosuchdb://x"),
        ("REDIS_URL", "http://localhost:6379"),
        ("CSP_PORT", "eighty"),
        ("CSP_API_THROTTLE_USER", "lots"),
        ("CSP_LANGUAGE", "fr"),
        ("SECRET_KEY", "short"),
    ],
)
def test_bad_value_fails_at_start_up_naming_the_variable(tmp_path, name, value):
    result = _manage("check", env={"CSP_DATA_DIR": str(tmp_path), name: value})
    assert result.returncode != 0
    assert name in result.stderr
