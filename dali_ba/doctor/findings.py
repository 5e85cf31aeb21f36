"""What one rank finds: facts and problems, and a check that raises is itself a problem, so every
rank still reaches the gather. Also the small helpers the verdict and the report share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Problem:
    level: str  # fail: a run would stop; warn: it would run, worse
    check: str  # python, torch, gpu, dali, horovod, engine, mpi, cores, data, output, versions, ranks
    text: str  # what is wrong - what to do (no host or rank in it: the same problem on many ranks is one line)
    ranks: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)


class Findings:
    """One rank's facts (JSON-ready) and problems; a check that raises is itself a problem."""

    def __init__(self, rank: int, host: str) -> None:
        self.facts: dict[str, Any] = {"rank": rank, "host": host, "pid": os.getpid()}
        self.problems: list[Problem] = []

    def fail(self, check: str, text: str) -> None:
        self.problems.append(Problem("fail", check, text))

    def warn(self, check: str, text: str) -> None:
        self.problems.append(Problem("warn", check, text))

    @contextlib.contextmanager
    def checking(self, check: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.fail(
                check,
                f"the {check} check stopped with {type(exc).__name__}: {first_line(exc)} — "
                "fix what it names (a broken install?) and run the doctor again",
            )


def first_line(exc: BaseException) -> str:
    """An exception's message as one short line (a problem's text is one line)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def unique(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, in first-seen order (hosts in rank order)."""
    return list(dict.fromkeys(items))


def ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(f"{start}" if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(parts)
