"""The architecture written down in .importlinter holds (STYLE.md rule 2): llm/ imports no Django
and no app, the apps are stacked knowledge <- training <- chat, and no package's modules import
each other in a circle. import-linter (`lint-imports`) checks the contracts; its report is the
failure message.

The contracts are checked once more on a scratch copy of the code with one breach planted each, so
that a contract that matches nothing (a wrong wildcard in an ignore, a renamed package) fails here
instead of passing forever.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm", "knowledge", "training", "chat", "csplatform")  # root_packages in .importlinter
CONTRACTS = (
    "llm/ (the model work) imports no Django and no app",
    "the apps are stacked knowledge <- training <- chat",
    "no import circles between the modules of a package",
)


def lint_imports(cwd):
    """(exit status, report) of `lint-imports` on the code and .importlinter in `cwd`."""
    result = subprocess.run(
        [Path(sys.executable).with_name("lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    return result.returncode, result.stdout + result.stderr


def verdicts(report):
    """{contract: "KEPT" or "BROKEN"} from the report's summary (it wraps long names)."""
    flat = " ".join(report.split())
    found = {}
    for name in CONTRACTS:
        if name in flat:
            after = flat[flat.index(name):]
            found[name] = min(("KEPT", "BROKEN"), key=lambda word: after.find(f" {word}") % (len(after) + 1))
    return found


def test_the_import_contracts_hold():
    status, report = lint_imports(ROOT)
    assert verdicts(report) == dict.fromkeys(CONTRACTS, "KEPT"), report  # each one checked, none missing
    assert status == 0, report


# Each breach: files written into a scratch copy, the contract it must break, and a name the
# report must show (the contract may be broken by the real code too; the breach must be seen).
BREACHES = {
    "django-in-llm": ({"llm/breach.py": "from django.db import models\n"}, CONTRACTS[0], "llm.breach"),
    "app-in-llm": ({"llm/breach.py": "def late():\n    from training.models import TrainingRun\n"}, CONTRACTS[0], "llm.breach"),
    "knowledge-imports-chat": ({"knowledge/breach.py": "from chat.models import Message\n"}, CONTRACTS[1], "knowledge.breach"),
    "training-imports-chat": ({"training/breach.py": "def late():\n    import chat.serving\n"}, CONTRACTS[1], "training.breach"),
    "circle-in-a-package": (
        {
            "llm/engine/circle_a.py": "from llm.engine import circle_b\n",
            "llm/engine/circle_b.py": "def late():\n    from llm.engine import circle_a\n",
        },
        CONTRACTS[2],
        ".circle_",
    ),
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_a_planted_breach_breaks_its_contract(breach, tmp_path):
    files, contract, culprit = BREACHES[breach]
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    for path, text in files.items():
        (tmp_path / path).write_text(text, encoding="utf-8")
    status, report = lint_imports(tmp_path)
    assert status != 0 and verdicts(report)[contract] == "BROKEN", report
    assert culprit in report.split("Broken contracts", 1)[1], report
