"""Writing into the run's output folder when the file system may fill up (or a quota run out).

Every file the run writes (checkpoints, ``metrics.jsonl``, TensorBoard events, ``model.pt``, the
run's summaries) goes through :func:`writing`. A write that fails for want of space ends the run
with :class:`OutputFullError`: one line naming the file, the space left and the last good
checkpoint, and exit code :data:`EXIT_NO_SPACE`; nothing half-written is left under a real name.
After space is freed, ``--resume auto`` continues from that checkpoint exactly.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from dali_ba.errors import OutputFullError

FOLDER = "checkpoints"  # a run's checkpoints, in its output folder
EXIT_NO_SPACE = OutputFullError.exit_code  # 74, EX_IOERR: free space, then --resume auto
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# torch.save reports a short write as a RuntimeError of its zip writer, without an errno.
TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space (an OSError's errno, or torch's zip
    writer reporting a short write)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE_ERRNOS
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in TORCH_SHORT_WRITE)


def free_space(path: Path) -> str:
    """'N MiB free of M MiB' on the file system that holds ``path`` (or its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


def checkpoint_dir(output: Path) -> Path:
    """Where a run's checkpoints are (:mod:`dali_ba.training.checkpoint` writes them)."""
    return Path(output) / FOLDER


def list_checkpoints(output: Path) -> list[Path]:
    """Checkpoint files of a run, newest (highest step) first."""
    folder = checkpoint_dir(output)
    return sorted(folder.glob("step-*.pt"), reverse=True) if folder.is_dir() else []


def last_checkpoint(output: Path) -> str:
    """The newest checkpoint file of the run, as the one line names it."""
    found = list_checkpoints(output)
    return str(found[0]) if found else "none yet"


@contextlib.contextmanager
def writing(path: Path, output: Path, partial: Path | None = None) -> Iterator[None]:
    """Write ``path`` (of the run in ``output``); a failure for want of space becomes
    :class:`OutputFullError`, and ``partial`` (a temporary file) is removed whatever happens."""
    try:
        yield
    except Exception as exc:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        if not is_out_of_space(exc):
            raise
        raise OutputFullError(
            f"no space left to write {path} ({free_space(path)}); the last good checkpoint is "
            f"{last_checkpoint(output)}: free space (or raise the quota), then run the same "
            "command with --resume auto"
        ) from None
    else:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
