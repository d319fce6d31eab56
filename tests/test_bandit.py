"""bandit, the Python security linter, finds nothing of high severity in the project's code."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parents[1]


def test_bandit_reports_no_high_severity_issue():
    result = subprocess.run(
        # llm/ and tests/support/ hold code that was under csplatform/, training/ and chat/ before
        [sys.executable, "-m", "bandit", "-q", "-r", "csplatform", "llm", "knowledge", "training", "chat", "benchmarks", "tests/support",
         "manage.py",
         "-x", "*/tests/*", "--severity-level", "high", "-f", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(result.stdout)
    assert report["errors"] == []  # every file was parsed
    assert report["metrics"]["_totals"]["loc"] > 5000  # it really read the code
    found = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"]]
    assert found == []
