"""What the reader's source costs the training thread per batch: this tree against an earlier commit.

    python -m benchmarks.source_callback --before COMMIT [--data data/demo/train] [--repeat 10]
        [--batch-size 256] [--views 1,4] [--steps 8] [--warmup 2] [--out benchmarks/results]

DALI calls the external source inside ``next()``, on the training thread: what the source does there
is not overlapped with anything. Each tree (this one, then ``--before`` checked out in a temporary git
worktree) runs ``dali-ba profile views`` in one process on the GPU path's view graph, here on DALI's
CPU operators (``--view-stage dali --decoder cpu``), so that the source serves the view parameters
as it does on a GPU. The table gives each tree's ``source_callback_time`` (the calling thread's
seconds in the source per batch handed over, in the loader-fed window) and step times, same files,
same cores, one run. ``--before`` must have that row (e468130 or later). The data is a file list of
``--data``'s images ``--repeat`` times over: long epochs, so that few batches are the first of a pass
(read with nothing read ahead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dali_ba.machine import describe_machine, machine_line  # noqa: E402

PROG = "python -m benchmarks.source_callback"


def repeated_list(folder: str, times: int, path: Path) -> Path:
    """A ``<path> <label>`` list of the images of ``folder`` (class folders), ``times`` times over."""
    from dali_ba.data.dataset import load_dataset

    dataset = load_dataset(folder)
    lines = [f"{Path(file).resolve()} {label}" for file, label in zip(dataset.files, dataset.labels)]
    path.write_text("\n".join(lines * times) + "\n")
    return path


def profile(tree: Path, data: Path, args: argparse.Namespace, out: Path) -> dict:
    """``profile views`` run from ``tree`` (its own dali_ba) on the file list ``data``, the result's JSON."""
    command = [
        *(sys.executable, "-m", "dali_ba.tools.profile", "views", "--recipe", "pipelines/demo.toml"),
        *("--train", str(data), "--val", str(data)),
        *("--batch-size", str(args.batch_size)),
        *("--views", args.views, "--view-stage", "dali", "--decoder", "cpu", "--cache-batches", "2"),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)),
    ]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{PROG}: error: profile views failed in {tree}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "profile_views.json").read_text())


def commit_of(ref: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit to compare with")
    parser.add_argument("--data", default="data/demo/train", help="a folder of class folders")
    parser.add_argument("--repeat", type=int, default=10, help="times over the folder's images in an epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--views", default="1,4")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = repeated_list(args.data, args.repeat, Path(scratch) / "train.txt")
        before = Path(scratch) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(before), args.before], cwd=REPO, check=True)
        try:
            for label, tree, commit in (
                ("before", before, commit_of(args.before)),
                ("after", REPO, commit_of("HEAD")),
            ):
                result = profile(tree, data, args, Path(scratch) / label)
                for row in result["results"]:
                    rows.append(dict(tree=label, commit=commit, **{k: row[k] for k in ROW_KEYS}))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
    machine = describe_machine()
    lines = [
        f"# The source's time on the training thread, B = {args.batch_size}",
        "",
        f"`{PROG} --before {args.before}`: {machine_line(machine)}; {args.data} {args.repeat} times over, "
        f"profile views with the view graph on DALI's CPU operators, {args.steps} steps after {args.warmup} "
        "per window.",
        "",
        "| tree | commit | M | source ms/batch | ms/step (loader) | data wait ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['tree']} | {r['commit']} | {r['views']} | {1e3 * r['source_callback_time']:.2f} "
        f"| {1e3 * r['step_time']:.1f} | {1e3 * r['data_wait']:.1f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "source_callback.json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=2) + "\n")
    (args.out / "source_callback.md").write_text(text)
    print(f"wrote {args.out / 'source_callback.md'}, {args.out / 'source_callback.json'}")
    return 0


ROW_KEYS = ("views", "source_callback_time", "step_time", "data_wait", "samples_per_s")

if __name__ == "__main__":
    sys.exit(main())
