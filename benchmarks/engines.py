"""The two engines side by side: the same training run under horovodrun (Horovod) and torchrun
(torch.distributed + DDP), on the same data, cores and recipe.

    python -m benchmarks.engines [--recipe pipelines/demo.toml] [--ranks 2] [--epochs 3] [--repeats 2]
                                 [--out benchmarks/results]

Runs are interleaved (horovod, torch, horovod, torch, ...) so that a change in machine load hits both
alike. Each run's steady-state timing comes from its own `summary` record (the first
`--timing-warmup` steps of every epoch left out); the table gives, per engine, the mean over runs of
steps/s, unique and augmented images/s and the per-step phase times, and the final model digests,
which should agree between engines. Writes <out>/engines.json and <out>/engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m benchmarks.engines"
PHASES = ("data", "h2d", "forward_backward", "allreduce_step", "step")


def launch_command(engine: str, ranks: int) -> list[str]:
    if engine == "horovod":
        return ["horovodrun", "-np", str(ranks), sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]


def run_once(engine: str, ranks: int, recipe: str, epochs: int, extra: list[str], output: Path) -> dict:
    """One training run under ``engine``'s launcher; its summary and start records."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMPI_MCA_mpi_yield_when_idle": "1",
    }
    command = [
        *launch_command(engine, ranks),
        "-m",
        "dali_ba.train",
        "--recipe",
        recipe,
        "--epochs",
        str(epochs),
        "--output",
        str(output),
        "--engine",
        engine,
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{PROG}: {engine} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    (summary,) = [r for r in records if r["kind"] == "summary"]
    (start,) = [r for r in records if r["kind"] == "start"]
    return {
        "engine": engine,
        "backend": start["engine_backend"],
        "wall_s": time.perf_counter() - started,
        "steps_per_s": summary["steps_per_s"],
        "images_per_s": summary["images_per_s"],
        "views_per_s": summary["views_per_s"],
        "top1": summary["top1"],
        "steady_steps": summary["steady_steps"],
        "phases_ms": {p: 1e3 * summary["timing"][p]["mean"] for p in PHASES},
        "param_digest": summary["param_digests"][0],
        "params_identical": summary["params_identical"],
    }


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| engine | backend | runs | steps/s | img/s | views/s | data ms | forward_backward ms | "
        "allreduce_step ms | step ms | val top-1 % |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine in ("horovod", "torch"):
        mine = [r for r in runs if r["engine"] == engine]
        rate = np.array([r["steps_per_s"] for r in mine])
        phase = {p: np.mean([r["phases_ms"][p] for r in mine]) for p in PHASES}
        lines.append(
            f"| {engine} | {mine[0]['backend']} | {len(mine)} | {rate.mean():.2f} ± {rate.std():.2f} | "
            f"{np.mean([r['images_per_s'] for r in mine]):.0f} | {np.mean([r['views_per_s'] for r in mine]):.0f} | "
            f"{phase['data']:.1f} | {phase['forward_backward']:.1f} | {phase['allreduce_step']:.1f} | "
            f"{phase['step']:.1f} | {np.mean([r['top1'] for r in mine]):.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pipelines/demo.toml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine, interleaved")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("extra", nargs="*", help="more training flags (after --)")
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.epochs < 1 or args.repeats < 1:
        parser.error("--ranks, --epochs and --repeats must be >= 1")
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="dali-ba-engines-") as tmp:
        for repeat in range(args.repeats):
            for engine in ("horovod", "torch"):
                run = run_once(
                    engine, args.ranks, args.recipe, args.epochs, args.extra, Path(tmp) / f"{engine}{repeat}"
                )
                print(
                    f"{engine:8} run {repeat + 1}: {run['steps_per_s']:.2f} steps/s, "
                    f"step {run['phases_ms']['step']:.1f} ms "
                    f"(allreduce_step {run['phases_ms']['allreduce_step']:.1f} ms)",
                    flush=True,
                )
                runs.append(run)
    same_model = len({r["param_digest"] for r in runs}) == 1
    lines = [
        f"{args.ranks} ranks, `{args.recipe}`, {args.epochs} epochs per run, {args.repeats} runs per engine "
        f"(interleaved); {os.cpu_count()} cores, load average {load:.2f} at the start; steady-state steps only.",
        "",
        *table(runs),
        "",
        f"Final parameters {'identical' if same_model else 'DIFFERENT'} across all {len(runs)} runs (SHA-256 digests).",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.md").write_text("\n".join(lines) + "\n")
    (out / "engines.json").write_text(
        json.dumps(
            {
                "recipe": args.recipe,
                "ranks": args.ranks,
                "epochs": args.epochs,
                "repeats": args.repeats,
                "extra": args.extra,
                "cores": os.cpu_count(),
                "load_at_start": load,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "same_model": same_model,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out / 'engines.md'} and {out / 'engines.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
