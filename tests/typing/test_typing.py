"""Run mypy and pyright over the ``check_*.py`` files: what must pass passes, what must fail still fails.

A line that must fail carries ``# type: ignore[<mypy code>]``. Both checkers honour it, and
both are set to report an ignore that suppresses nothing (mypy's ``warn_unused_ignores``
under ``--strict``, pyright's ``reportUnnecessaryTypeIgnoreComment``), so a misuse that
starts to type-check fails the run under either checker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).parents[2]
CHECKS = sorted(Path(__file__).parent.glob("check_*.py"))


@pytest.mark.parametrize("check", CHECKS, ids=lambda p: p.name)
def test_mypy_expectations(check: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "mypy.ini"), "--no-error-summary", str(check.relative_to(ROOT))]
    )
    assert status == 0, f"mypy reported:\n{stdout}{stderr}"


def _pyright() -> list[str]:
    found = shutil.which("pyright")
    if found is None:
        pytest.fail("pyright is not installed: it is in the dev extra (pip install -e '.[dev]')")
    return [found]


def test_pyright_expectations() -> None:
    """One pyright run over every check file (pyright starts slowly; one run covers them all)."""
    command = [*_pyright(), "--outputjson", *map(str, CHECKS)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not run:\n{result.stdout}{result.stderr}")
    problems = [
        f"{Path(d['file']).name}:{d['range']['start']['line'] + 1}: {d['message']}"
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    ]
    assert not problems, "pyright reported:\n" + "\n".join(problems)
    assert report["summary"]["filesAnalyzed"] >= len(CHECKS), sys.exc_info()
