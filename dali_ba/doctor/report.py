"""What rank 0 prints and writes: a table (a row per node, per rank where ranks differ), the
problems, the verdict, and the JSON of every rank's findings."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from dali_ba.doctor.findings import Problem, ranges, unique
from dali_ba.doctor.verdict import cores_per_rank

COLUMNS = (
    "node",
    "ranks",
    "python",
    "torch",
    "torchvision",
    "DALI",
    "driver",
    "device",
    "HW JPEG",
    "Horovod",
    "engine",
    "MPI",
    "cores/rank",
    "train",
    "val",
    "output",
)


def cells(r: dict, node: dict, cores: int | None) -> dict[str, str]:
    """One rank's row of the table (data and output cells: its node's first rank's findings)."""
    dali, horovod, engine = r.get("dali") or {}, r.get("horovod") or {}, r.get("engine") or {}
    built = "+".join(name for name in ("MPI", "Gloo", "NCCL") if horovod.get(name.lower()))
    data = node.get("data") or {}
    output = node.get("output")

    def split(name: str) -> str:
        if name not in data:
            return "-"
        facts = data[name]
        if not facts["readable"]:
            return "MISSING"
        return f"{facts['samples']} {'ok' if not facts.get('decode_error') else 'bad sample'}"

    device = r.get("device") or "-"
    if device.startswith("cuda"):
        device = f"{device}/{r.get('visible_gpus')} {_short_gpu(r.get('gpu'))}"
    return {
        "python": r.get("python") or "-",
        "torch": r.get("torch") or "MISSING",
        "torchvision": (r.get("torchvision") or "MISSING").split("+")[0],
        "DALI": (
            f"{(dali.get('package') or 'nvidia-dali').removeprefix('nvidia-dali-')} {dali.get('version')}"
            if dali.get("importable")
            else "MISSING"
            if not dali.get("package")
            else "BROKEN"
        ),
        "driver": r.get("driver") or "none",
        "device": device,
        "HW JPEG": {True: "yes", False: "no", None: "-"}[dali.get("hardware_jpeg")],
        "Horovod": (
            f"{horovod['version']} {built or 'no MPI/Gloo'}"
            if horovod.get("version")
            else "BROKEN"
            if horovod.get("error")
            else "none"
        ),
        "engine": engine.get("engine") or "ERROR",
        "MPI": _short_mpi(r.get("mpi")),
        "cores/rank": str(cores) if cores is not None else "-",
        "train": split("train"),
        "val": split("val"),
        "output": "-"
        if output is None
        else (
            "NOT WRITABLE" if not output.get("writable") else "NOT SHARED" if output.get("shared") is False else "ok"
        ),
    }


def _short_gpu(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'."""
    words = [w for w in (name or "").split() if w not in ("NVIDIA", "Tesla", "GeForce", "RTX")]
    return words[0] if words else ""


def _short_mpi(text: str | None) -> str:
    """'Open MPI v4.1.4, package: ...' -> 'Open MPI v4.1.4'."""
    return re.split(r"[,\t]", text)[0].strip()[:24] if text else "-"


def table(ranks: list[dict | None], hosts: list[str]) -> list[list[str]]:
    """Rows of the table: one per node, one per group of ranks within a node whose cells differ.
    Columns that say nothing anywhere (all '-') are left out."""
    present = [r for r in ranks if r is not None]
    first = {r["host"]: r for r in present if r.get("first_on_node")}
    shares = cores_per_rank(present)
    groups: dict[tuple, list[int]] = {}
    for r in present:
        row = cells(r, first.get(r["host"], {}), shares.get(r["host"], {}).get(r["rank"]))
        groups.setdefault((r["host"], *row.values()), []).append(r["rank"])
    rows = [[key[0], ranges(sorted(members)), *key[1:]] for key, members in groups.items()]
    rows += [
        [hosts[rank], ranges([rank]), *["(no report)"] + ["-"] * (len(COLUMNS) - 3)]
        for rank, r in enumerate(ranks)
        if r is None
    ]
    keep = [i for i, name in enumerate(COLUMNS) if any(row[i] not in ("-", "") for row in rows) or i < 2]
    return [[COLUMNS[i] for i in keep], *[[row[i] for i in keep] for row in rows]]


def render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def report(ranks: list[dict | None], problems: list[Problem], recipe, hosts: list[str]) -> list[str]:
    """What rank 0 prints: who is running, the table, the problems, the verdict."""
    present = [r for r in ranks if r is not None]
    root = ranks[0] or {}
    engine = root.get("engine") or {}
    nodes = unique(r["host"] for r in present)
    lines = [
        f"dali-ba doctor: {len(ranks)} rank{'s' if len(ranks) != 1 else ''} on {len(nodes)} "
        f"node{'s' if len(nodes) != 1 else ''}; --engine {recipe.run.engine} -> {engine.get('engine') or 'ERROR'} "
        f"({engine.get('reason') or engine.get('error', '')}); --dali-threads {recipe.data.dali_threads}"
    ]
    slurm = root.get("slurm") or {}
    if slurm.get("SLURM_JOB_ID"):
        lines.append("SLURM: " + ", ".join(f"{k.removeprefix('SLURM_').lower()} {v}" for k, v in slurm.items()))
    if root.get("launcher") == "none":
        lines.append(
            "(one process: launch it as training will be, e.g. srun python -m dali_ba.doctor ..., to check every node)"
        )
    lines += ["", *render(table(ranks, hosts)), ""]
    for p in problems:
        where = f"{', '.join(p.nodes) or '?'} (rank{'s' if len(p.ranks) > 1 else ''} {ranges(p.ranks)})"
        lines.append(f"{p.level.upper()}  {where}  {p.check}: {p.text}")
    fails = sum(p.level == "fail" for p in problems)
    warns = len(problems) - fails
    verdict = (
        f"{fails} problem{'s' if fails != 1 else ''} would stop a run"
        if fails
        else "nothing found that would stop a run"
    )
    if warns:
        verdict += f", {warns} warning{'s' if warns != 1 else ''}"
    return [*lines, *([""] if problems else []), f"doctor: {verdict}"]


def write_json(path: Path, ranks: list[dict | None], problems: list[Problem], status: int, hosts: list[str]) -> None:
    """Everything rank 0 knows, for scripts and tests: per node (data, output), the problems with
    their nodes and ranks, the table, and every rank's findings."""
    present = [r for r in ranks if r is not None]
    nodes = {
        r["host"]: {
            "ranks": [x["rank"] for x in present if x["host"] == r["host"]],
            "data": r.get("data"),
            "output": r.get("output"),
        }
        for r in present
        if r.get("first_on_node")
    }
    document = {
        "ok": status == 0,
        "exit_status": status,
        "ranks": len(ranks),
        "nodes": nodes,
        "problems": [asdict(p) for p in problems],
        "table": table(ranks, hosts),
        "per_rank": [
            r if r is not None else {"rank": rank, "host": hosts[rank], "missing": True} for rank, r in enumerate(ranks)
        ],
    }
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
