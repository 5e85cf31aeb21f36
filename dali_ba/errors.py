"""The one exception type users see: a bad input, reported as a single line; and the command-line
parser every tool shares, whose usage mistakes are one line too."""

import argparse
import math
from typing import NoReturn


class UsageError(Exception):
    """Bad input (flag, recipe, data). Command-line entry points print it as one line and exit 2."""


class UnreadableImageError(UsageError):
    """A data file that cannot be decoded, found by one rank while training, so reported by that rank."""


class RunStopped(Exception):
    """A run that cannot go on though its input is fine: one line from rank 0, an exit code of its
    own, and a last good checkpoint to resume from. ``every_rank``: raised on all ranks together
    (after a collective), so they can leave together once rank 0 has written its last record."""

    exit_code = 1

    def __init__(self, message: str = "", every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


class OutputFullError(RunStopped):
    """The output's file system is full or over quota (:mod:`dali_ba.training.output`)."""

    exit_code = 74  # EX_IOERR


class DivergedError(RunStopped):
    """The training loss is not finite or above ``--max-loss``: the weights are no longer worth saving.
    Decided from the loss summed over ranks, so always on every rank."""

    exit_code = 4

    def __init__(self, message: str = "") -> None:
        super().__init__(message, every_rank=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (NaN passes every range check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
