"""Run mypy over the ``check_*.py`` files: what must pass passes, what must fail still fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).parents[2]
CHECKS = sorted(Path(__file__).parent.glob("check_*.py"))


@pytest.mark.parametrize("check", CHECKS, ids=lambda p: p.name)
def test_typing_expectations(check: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "mypy.ini"), "--no-error-summary", str(check.relative_to(ROOT))]
    )
    assert status == 0, f"mypy reported:\n{stdout}{stderr}"
