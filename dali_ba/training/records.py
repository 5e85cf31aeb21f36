"""The run's records, written on rank 0: ``metrics.jsonl`` (one JSON object per record) and, with
``--tensorboard``, the step and epoch records as TensorBoard scalars. Every write goes through
:func:`dali_ba.training.output.writing`, so a full disk ends the run naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """JSON lines on rank 0 (one object per record, flushed at once); a no-op elsewhere. With
    ``tensorboard`` (a folder) the step and epoch records also go there as TensorBoard scalars."""

    def __init__(self, path: Path | None, append: bool = False, tensorboard: Path | None = None):
        self._path, self._tensorboard = path, tensorboard
        if path is not None and append:
            _drop_partial_line(path)  # a run that stopped on a full disk may have left half a record
        self._file = open(path, "a" if append else "w") if path is not None else None
        self._scalars = TensorBoardScalars(tensorboard) if path is not None and tensorboard is not None else None

    def write(self, kind: str, **fields: Any) -> None:
        """One record (a full disk: :class:`dali_ba.training.output.OutputFullError` naming the file)."""
        from dali_ba.training.output import writing

        if self._file:
            assert self._path is not None  # the file is open only with a path
            with writing(self._path, self._path.parent):
                self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
                self._file.flush()
        if self._scalars:
            assert self._path is not None and self._tensorboard is not None  # scalars are written only with both
            with writing(self._tensorboard, self._path.parent):
                self._scalars.add(kind, fields)

    def close(self) -> None:
        from dali_ba.training.output import writing

        if self._file:
            self._file.close()
        if self._scalars:
            assert self._path is not None and self._tensorboard is not None  # scalars are written only with both
            with writing(self._tensorboard, self._path.parent):
                self._scalars.close()


def _drop_partial_line(path: Path) -> None:
    """Cut ``path`` back to its last complete line (a record cut short by a full disk)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


class TensorBoardScalars:
    """Step records as scalars over the global step (train/loss, train/lr, train/grad_norm,
    train/steps_per_s, time/<phase>_ms: the mean over ranks), epoch records over the epoch
    (epoch/<field>: losses, accuracies, throughput, broken files); torch's SummaryWriter."""

    STEP_FIELDS = ("loss", "lr", "grad_norm")
    EPOCH_FIELDS = (
        "train_loss",
        "train_top1",
        "val_loss",
        "top1",
        "top5",
        "views_top1",
        "views_top5",
        "calibrated_top1",
        "calibrated_top5",
        "steps_per_s",
        "images_per_s",
        "views_per_s",
        "bad_files",
    )

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def add(self, kind: str, fields: dict[str, Any]) -> None:
        add = self._writer.add_scalar
        if kind == "step":
            step = fields["step"]
            for name in self.STEP_FIELDS:
                if name in fields:
                    add(f"train/{name}", fields[name], step)
            for phase, stats in fields["time"].items():
                add(f"time/{phase}_ms", 1e3 * stats["mean"], step)
            if fields["time"]["step"]["mean"] > 0:
                add("train/steps_per_s", 1.0 / fields["time"]["step"]["mean"], step)
        elif kind == "epoch":
            for name in self.EPOCH_FIELDS:
                if name in fields:
                    add(f"epoch/{name}", fields[name], fields["epoch"] + 1)
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()
