"""A pytest plugin for the GPU check's ``tests`` step: each failure's report is appended to the file that
``GPU_CHECK_FAILURES`` names as soon as it happens, so a file killed at its limit still says why its
tests failed (pytest's own summary and JUnit report are written only at the end; the first GPU run
lost them)."""

from __future__ import annotations

import os

import pytest

ENV = "GPU_CHECK_FAILURES"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(ENV)
    if path and report.failed:
        with open(path, "a") as out:
            out.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-8000:]}\n\n")
