"""Data and output, checked by the first rank of each node: the splits indexed and a sample decoded
as training does, the output folder writable; a marker file per node tells rank 0 which nodes share
the output folder."""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any

from dali_ba.doctor.findings import Findings, first_line


def check_data(found: Findings, recipe, wanted: dict[str, bool], world) -> None:
    """Each split asked for: indexed as training indexes it, and its first sample decoded as DALI's
    CPU decoder decodes it (Pillow where DALI does not import); then the checks that need the number
    of ranks (the batch per rank, memory for the views on this node)."""
    from dali_ba.errors import UsageError
    from dali_ba.recipe import effective
    from dali_ba.training.checks import check_labels, check_world

    loaded: dict[str, Any] = {}
    for split in ("train", "val"):
        if wanted[split]:
            with found.checking("data"):
                loaded[split] = check_split(
                    found, f"--{split}", getattr(recipe.data, split), loaded.get("train"), recipe.data.max_image_pixels
                )
    try:
        if loaded.get("train") and loaded.get("val"):
            check_labels(loaded["train"], loaded["val"])
        check_world(effective(recipe), world, *(d for d in loaded.values() if d))
    except UsageError as exc:  # a flag to change, named in the message
        found.fail("data", str(exc))


def check_split(found: Findings, flag: str, path: str, train, max_pixels: int):
    """One split: its dataset, or None after a problem naming the flag."""
    from dali_ba.data.dataset import load_dataset
    from dali_ba.errors import UsageError
    from dali_ba.loading.probe import size_problem

    facts = found.facts.setdefault("data", {})[flag.lstrip("-")] = {"path": path, "readable": False}
    started = time.perf_counter()
    try:
        dataset = load_dataset(path, classes=train.classes if train is not None else None)
    except UsageError as exc:
        facts["error"] = str(exc)
        found.fail(
            "data",
            f"{flag} {path}: {exc} — make the data readable at this path on every node (a file system "
            "all nodes mount, or a copy at the same path), or correct the flag",
        )
        return None
    facts.update(
        readable=True,
        samples=len(dataset),
        classes=dataset.num_classes,
        sample=dataset.files[0],
        index_seconds=round(time.perf_counter() - started, 3),
    )
    try:
        data = dataset.read(0)
    except OSError as exc:
        found.fail(
            "data",
            f"{flag} {path}: its first sample {dataset.files[0]} cannot be read ({exc.strerror or exc}) "
            "— make the files readable on every node",
        )
        return dataset
    problem = size_problem(io.BytesIO(data), max_pixels)
    decoder, shape, error = None, None, problem
    if not problem:
        decoder, shape, error = decode_sample(data)
    facts.update(decoded_by=decoder, shape=shape, decode_error=error)
    if error:
        found.warn(
            "data",
            f"{flag} {path}: its first sample {dataset.files[0]} does not decode ({error}) — list every "
            f"broken file with dali-ba check-data {path}",
        )
    return dataset


def decode_sample(data: bytes) -> tuple[str, list[int] | None, str | None]:
    """Decode one encoded image as training's CPU path does (DALI's cpu decoder), or with Pillow where
    DALI does not import: (decoder, HWC shape, error)."""
    import numpy as np

    try:
        from nvidia.dali import fn, pipeline_def, types
    except Exception:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return "Pillow", [image.height, image.width, len(image.getbands())], None
        except Exception as exc:
            return "Pillow", None, first_line(exc)
    encoded = np.frombuffer(data, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode():
        source = fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8)
        return fn.decoders.image(source, device="cpu", output_type=types.RGB)

    try:
        pipe = decode()
        pipe.build()
        (images,) = pipe.run()
        return "DALI cpu", list(np.asarray(images[0]).shape), None
    except Exception as exc:
        return "DALI cpu", None, first_line(exc)


MARKER = ".dali-ba-doctor-{host}-{pid}"


def check_output(found: Findings, output: str, resume: str) -> None:
    """The output folder: not holding a run (unless resumed), creatable and writable here; a marker
    file written in it tells, after the next gather, which nodes see the same folder."""
    from dali_ba.errors import UsageError
    from dali_ba.training.checks import check_not_a_run

    path = Path(output)
    facts = found.facts["output"] = {
        "path": output,
        "absolute": str(path.absolute()),
        "writable": False,
        "created": [],
        "marker": None,
    }
    try:
        check_not_a_run(path, resume)
    except UsageError as exc:
        found.fail("output", str(exc))
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / MARKER.format(host=found.facts["host"], pid=os.getpid())
        marker.write_text("written by python -m dali_ba.doctor; removed when it ends\n")
    except OSError as exc:
        facts["error"] = exc.strerror or str(exc)
        found.fail(
            "output",
            f"--output {output}: cannot create or write it here ({exc.strerror or exc}) — pick a "
            "folder every node can write, on a file system they share",
        )
        remove_folders(missing)
        return
    facts.update(writable=True, created=[str(p) for p in missing], marker=marker.name)


def output_seen(output: str, markers: list[str | None]) -> list[str]:
    """The markers of ``markers`` (one per rank, None where a rank wrote none) visible here."""
    return [m for m in markers if m and (Path(output) / m).exists()]


def remove_marker(facts: dict[str, Any]) -> None:
    output = facts.get("output") or {}
    if output.get("marker"):
        with contextlib.suppress(OSError):
            (Path(output["path"]) / output["marker"]).unlink()


def remove_folders(folders: list[Path]) -> None:
    """Folders the doctor created, deepest first, each only if empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def mark_shared_output(ranks: list[dict | None]) -> None:
    """Set each node's ``output.shared``: whether it sees rank 0's marker, so the same folder (rank 0
    writes the checkpoints there, and every rank reads them on --resume). None: nothing to compare."""
    root = (ranks[0] or {}).get("output") or {}
    for r in ranks:
        output = (r or {}).get("output")
        if output and r.get("first_on_node"):  # type: ignore[union-attr]  # an output: r is set
            output["shared"] = (
                root["marker"] in output.get("sees", []) if root.get("marker") and output["writable"] else None
            )
