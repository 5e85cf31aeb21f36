"""Start-up at ImageNet size: what a training job spends before its first step, per rank, as the data
set grows from 10 k to 1.28 M files, against DALI's own file reader and torchvision's ImageFolder.

    python -m benchmarks.startup [--sizes 10000,100000,1281167] [--ranks 1,2] [--launchers mpirun,torchrun]
                                 [--root /tmp/dali-ba-startup] [--out benchmarks/results]

The data: ImageNet-shaped trees (1,000 class folders) of hard links to a few dozen small JPEGs (ext4
allows about 65,000 links to one file), given as a folder and as a ``<path> <label>`` list, plus tar
shards of a 128 k subset. Each case is one short training run (``--max-steps 1``) of the demo recipe,
run twice: once for time and memory (each rank under ``/usr/bin/time``: its peak RSS), once under
``strace`` (each rank's stat, getdents and open calls on the data set). Seconds to the first step
come from the run's own start-up record where it has one, else from the job's wall time.

Peers, one process each, on the same trees: DALI's ``fn.readers.file`` (folder, and file list) to
its first batch, torchvision's ``ImageFolder`` built and its first sample read, and dali-ba's index
alone (``load_dataset``). Writes <out>/startup.json and <out>/startup.md, with the targets met or
missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dali_ba.machine import describe_machine, machine_line

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m benchmarks.startup"
CLASSES = 1000
SOURCES = 40  # 1.28 M + 100 k + 10 k links over 40 files: about 35,000 links each
SHARD_SUBSET = 128_000
STAT_CALLS = ("stat", "lstat", "newfstatat", "fstatat64", "statx", "access", "faccessat", "faccessat2")
TRACED = (*STAT_CALLS, "getdents64", "openat", "open")
# What each rank runs: under /usr/bin/time for its peak RSS (KiB), or under strace for its calls.
RANK_WRAPPER = """#!/bin/sh
rank=${OMPI_COMM_WORLD_RANK:-${RANK:-0}}
if [ -n "$STARTUP_TRACE" ]; then
  exec strace -f -qq -y --seccomp-bpf -e trace=TRACED -o "$STARTUP_DIR/trace-$rank" \\
    "$STARTUP_PYTHON" -m dali_ba.train "$@"
fi
exec /usr/bin/time -f %M -o "$STARTUP_DIR/rss-$rank" "$STARTUP_PYTHON" -m dali_ba.train "$@"
""".replace("TRACED", ",".join(TRACED))


def make_sources(folder: Path, count: int) -> list[Path]:
    """``count`` distinct small JPEGs (48 px: decoding is not what this measures)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"source-{i:03d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_tree(root: Path, size: int, sources: list[Path]) -> Path:
    """``root/n<size>/c<k>/<i>.jpg``: ``size`` hard links over CLASSES folders; and its list beside it."""
    tree = root / f"n{size}"
    listing = root / f"n{size}.txt"
    if (tree / ".complete").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    lines = []
    for k in range(CLASSES):
        folder = tree / f"c{k:04d}"
        folder.mkdir(parents=True)
        per_class = size // CLASSES + (1 if k < size % CLASSES else 0)
        for i in range(per_class):
            name = f"{k:04d}_{i:07d}.jpg"
            os.link(sources[(k * 7919 + i) % len(sources)], folder / name)
            lines.append(f"n{size}/c{k:04d}/{name} {k}\n")
    listing.write_text("".join(lines))
    (tree / ".complete").touch()
    return tree


def make_val(root: Path, sources: list[Path]) -> tuple[Path, Path]:
    """A small validation folder (10 of the classes, 2 images each) and its list."""
    val = root / "val"
    lines = []
    for k in range(10):
        folder = val / f"c{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            target = folder / f"{i}.jpg"
            if not target.exists():
                os.link(sources[i], target)
            lines.append(f"val/c{k:04d}/{i}.jpg {k}\n")
    (root / "val.txt").write_text("".join(lines))
    return val, root / "val.txt"


def make_shards(root: Path, tree: Path, python: str) -> Path:
    """Tar shards of the first SHARD_SUBSET lines of the tree's list (``dali-ba shards``)."""
    shards = root / f"shards{SHARD_SUBSET}"
    if (shards / ".complete").exists():
        return shards
    shutil.rmtree(shards, ignore_errors=True)
    subset = root / f"subset{SHARD_SUBSET}.txt"
    with open(root / f"{tree.name}.txt") as full:
        subset.write_text("".join(line for _, line in zip(range(SHARD_SUBSET), full)))
    subprocess.run([python, "-m", "dali_ba", "shards", str(subset), str(shards), "--shard-size", "256MiB"], check=True)
    (shards / ".complete").touch()
    return shards


def trace_counts(path: Path, data_root: Path) -> dict[str, int]:
    """One rank's calls that name the data set: by path (stat family, open) or on its folders (getdents)."""
    counts = {"stat": 0, "getdents": 0, "open": 0, "fstat_of_open_files": 0}
    root = str(data_root)
    call = re.compile(r"^(?:\d+ +)?(\w+)\((.*)")
    for line in path.read_text(errors="replace").splitlines():
        found = call.match(line)
        if not found or root not in found.group(2):
            continue
        name, args = found.groups()
        if name == "getdents64":
            counts["getdents"] += 1
        elif name in ("openat", "open"):
            counts["open"] += 1
        elif name in STAT_CALLS:
            by_path = f'"{root}' in args or (args.startswith("AT_FDCWD") and root in args.split(",")[1])
            counts["stat" if by_path else "fstat_of_open_files"] += 1
    return counts


def launch(launcher: str, ranks: int, wrapper: Path) -> list[str]:
    if ranks == 1 and launcher == "none":
        return ["sh", str(wrapper)]
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return ["mpirun", "-np", str(ranks), *root, "--bind-to", "none", "--map-by", "slot", "sh", str(wrapper)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        "--no-python",
        "sh",
        str(wrapper),
    ]


def first_step_seconds(metrics: Path) -> float | None:
    """Seconds from the process's start to the end of its first step, from the run's own records."""
    if not metrics.exists():
        return None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        startup = record.get("startup_s")
        if isinstance(startup, dict) and "total" in startup:
            return float(startup["total"])
    return None


def index_seconds(metrics: Path) -> float | None:
    if not metrics.exists():
        return None
    for line in metrics.read_text().splitlines():
        startup = json.loads(line).get("startup_s")
        if isinstance(startup, dict) and "index" in startup:
            return float(startup["index"])
    return None


def train_case(train: Path, val: Path, launcher: str, ranks: int, work: Path, trace: bool, data_root: Path) -> dict:
    """One short training run; per rank its peak RSS or its calls on the data set."""
    work.mkdir(parents=True, exist_ok=True)
    wrapper = work / "rank.sh"
    wrapper.write_text(RANK_WRAPPER)
    wrapper.chmod(0o755)
    output = work / "run"
    shutil.rmtree(output, ignore_errors=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMPI_MCA_mpi_yield_when_idle": "1",
        "STARTUP_DIR": str(work),
        "STARTUP_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
    }
    if trace:
        env["STARTUP_TRACE"] = "1"
    args = [
        "--recipe",
        str(REPO / "pipelines" / "demo.toml"),
        "--train",
        str(train),
        "--val",
        str(val),
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--batch-size",
        str(16 * ranks),
        "--views",
        "2",
        "--output",
        str(output),
        "--log-every",
        "1",
        "--stall-timeout",
        "0",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        [*launch(launcher, ranks, wrapper), *args], env=env, capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{train} {launcher} x{ranks}: exit {done.returncode}: {done.stderr[-1500:]}")
    result: dict = {"wall_s": wall}
    if trace:
        result["calls"] = [trace_counts(work / f"trace-{r}", data_root) for r in range(ranks)]
    else:
        result["rss_mb"] = [int((work / f"rss-{r}").read_text().split()[-1]) / 1024 for r in range(ranks)]
        result["first_step_s"] = first_step_seconds(output / "metrics.jsonl")
        result["index_s"] = index_seconds(output / "metrics.jsonl")
    return result


PEER_CODE = {
    "dali_index": """
from dali_ba.data.dataset import load_dataset
data = load_dataset(TRAIN)
print(len(data.files))
""",
    "dali_reader_folder": """
from nvidia.dali import fn, pipeline_def
@pipeline_def(batch_size=32, num_threads=2, device_id=None)
def pipe():
    jpegs, labels = fn.readers.file(file_root=TRAIN, random_shuffle=True, name="r")
    return fn.decoders.image(jpegs, device="cpu"), labels
p = pipe(); p.build(); p.run()
""",
    "dali_reader_list": """
import os
from nvidia.dali import fn, pipeline_def
@pipeline_def(batch_size=32, num_threads=2, device_id=None)
def pipe():
    jpegs, labels = fn.readers.file(file_root=os.path.dirname(TRAIN), file_list=TRAIN, random_shuffle=True, name="r")
    return fn.decoders.image(jpegs, device="cpu"), labels
p = pipe(); p.build(); p.run()
""",
    "torchvision_imagefolder": """
from torchvision.datasets import ImageFolder
data = ImageFolder(TRAIN)
data[0]
""",
}


def peer_case(name: str, train: Path, work: Path) -> dict:
    """One peer in its own process: seconds to its first batch (or sample) and peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    code = f"import time; _t = time.perf_counter(); TRAIN = {str(train)!r}\n{PEER_CODE[name]}\n"
    code += "print('SECONDS', time.perf_counter() - _t)\n"
    rss = work / f"rss-{name}"
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    seconds = float(re.search(r"SECONDS (\S+)", done.stdout).group(1))  # type: ignore[union-attr]
    return {"seconds": seconds, "rss_mb": int(rss.read_text().split()[-1]) / 1024}


def targets(results: dict, sizes: list[int]) -> list[dict]:
    """The issue's four targets at the largest size, each met, missed, or not measured."""
    big, small = max(sizes), min(sizes)
    rows = []

    def add(name: str, value: str, ok: bool | None) -> None:
        rows.append({"target": name, "value": value, "verdict": {True: "met", False: "missed", None: "—"}[ok]})

    peers = results["peers"].get(str(big), {})
    ours = peers.get("dali_index_list", {}).get("seconds")
    dali = peers.get("dali_reader_list", {}).get("seconds")
    if ours is not None and dali is not None:
        add(
            "index seconds ≤ 1.5× DALI's list reader",
            f"{ours:.2f} s vs {dali:.2f} s ({ours / dali:.2f}×)",
            ours <= 1.5 * dali,
        )
    traced = [c for c in results["runs"] if c["size"] == big and "calls" in c and c["ranks"] > 1]
    if traced:
        others = [calls["stat"] + calls["getdents"] for c in traced for calls in c["calls"][1:]]
        add("0 metadata calls on the data by ranks that did not list", f"max {max(others)}", max(others) == 0)
    for kind in ("folder", "list"):
        timed = {
            (c["size"], c["launcher"], c["ranks"]): c
            for c in results["runs"]
            if c["kind"] == kind and "rss_mb" in c and c["size"] in (big, small)
        }
        for (size, launcher, ranks), case in sorted(timed.items()):
            if size != big or (small, launcher, ranks) not in timed:
                continue
            base = timed[(small, launcher, ranks)]
            extra_rss = max(case["rss_mb"]) - max(base["rss_mb"])
            label = f"{kind}, {launcher} × {ranks}"
            add(f"RSS per rank ≤ 10 k + 60 MB ({label})", f"+{extra_rss:.0f} MB", extra_rss <= 60)
            key = "first_step_s" if case.get("first_step_s") is not None else "wall_s"
            later = case[key] - base[key]
            add(f"first step ≤ 10 k + 3 s ({label}; {key})", f"+{later:.1f} s", later <= 3)
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Start-up at ImageNet size",
        "",
        f"`{PROG}` on {machine_line(m)}; Python {m['python']}.",
        "",
        "| data | files | launcher | ranks | first step s | wall s | index s | peak RSS MB per rank | "
        "stat / getdents / open per rank (by path) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    merged: dict[tuple, dict] = {}
    for case in results["runs"]:
        merged.setdefault((case["kind"], case["size"], case["launcher"], case["ranks"]), {}).update(case)
    for (kind, size, launcher, ranks), c in sorted(
        merged.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])
    ):
        first = f"{c['first_step_s']:.2f}" if c.get("first_step_s") is not None else "—"
        index = f"{c['index_s']:.2f}" if c.get("index_s") is not None else "—"
        rss = ", ".join(f"{v:.0f}" for v in c.get("rss_mb", [])) or "—"
        calls = "; ".join(f"{x['stat']} / {x['getdents']} / {x['open']}" for x in c.get("calls", [])) or "—"
        wall = f"{c.get('wall_s', 0):.1f}"
        lines.append(f"| {kind} | {size:,} | {launcher} | {ranks} | {first} | {wall} | {index} | {rss} | {calls} |")
    lines += ["", "Peers, one process each (seconds to the first batch or sample; peak RSS):", ""]
    lines += ["| files | peer | seconds | peak RSS MB |", "| ---: | --- | ---: | ---: |"]
    for size, peers in sorted(results["peers"].items(), key=lambda kv: int(kv[0])):
        for name, p in peers.items():
            value = f"{p['seconds']:.2f} | {p['rss_mb']:.0f}" if "seconds" in p else f"error: {p.get('error')} | —"
            lines.append(f"| {int(size):,} | {name} | {value} |")
    lines += ["", "| target (largest size) | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['value']} | {t['verdict']} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1281167", help="training files per tree")
    parser.add_argument("--ranks", default="1,2", help="ranks per run (1: also one process without a launcher)")
    parser.add_argument("--launchers", default="mpirun,torchrun", help="launchers for the runs of more than one rank")
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "dali-ba-startup"), help="data trees")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="startup.json and startup.md")
    parser.add_argument("--no-shards", action="store_true", help="skip the tar shards of a 128 k subset")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    ranks_list = sorted(int(r) for r in args.ranks.split(","))
    launchers = [name for name in args.launchers.split(",") if name]
    for tool in ("strace", "/usr/bin/time", "mpirun"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (make installs strace and Open MPI; time: Debian's time package)")
    root = Path(args.root)
    sources = make_sources(root / "sources", SOURCES)
    val_folder, val_list = make_val(root, sources)
    results: dict = {"machine": describe_machine(), "sizes": sizes, "runs": [], "peers": {}}
    data: list[tuple[str, int, Path, Path]] = []
    for size in sizes:
        built = time.perf_counter()
        tree = make_tree(root, size, sources)
        print(f"{PROG}: tree of {size:,} files ready in {time.perf_counter() - built:.1f} s", flush=True)
        data += [("folder", size, tree, val_folder), ("list", size, root / f"{tree.name}.txt", val_list)]
    if not args.no_shards and max(sizes) >= SHARD_SUBSET:
        shards = make_shards(root, root / f"n{max(sizes)}", sys.executable)
        data.append(("shards", SHARD_SUBSET, shards, val_list))
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    for kind, size, train, val in data:
        cases = [("none", 1)] if 1 in ranks_list else []
        cases += [(launcher, r) for r in ranks_list if r > 1 for launcher in launchers]
        for launcher, ranks in cases:
            for trace in (False, True) if ranks > 1 else (False,):
                case = train_case(train, val, launcher, ranks, work / f"{kind}-{size}-{launcher}-{ranks}", trace, root)
                row = {"kind": kind, "size": size, "launcher": launcher, "ranks": ranks, **case}
                results["runs"].append(row)
                print(f"{PROG}: {json.dumps(row)}", flush=True)
        if kind in ("folder", "list"):
            peers = results["peers"].setdefault(str(size), {})
            names = ["dali_index", "dali_reader_list"] if kind == "list" else ["dali_index", "dali_reader_folder"]
            if kind == "folder":
                names.append("torchvision_imagefolder")
            for name in names:
                peers[f"{name}_{kind}" if name == "dali_index" else name] = peer_case(name, train, work / "peers")
            print(f"{PROG}: peers at {size:,} ({kind}): {json.dumps(peers)}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    results["targets"] = targets(results, sizes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "startup.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
