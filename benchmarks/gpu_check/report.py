"""The GPU check's report: the targets met or missed (ratios measured in one run), and the three
files of ``--out`` rewritten after every step (benchmarks/gpu_check/driver.py runs the steps).

- ``gpu_check.json`` — the machine, every step's status, time and result, the targets;
- ``gpu_check.md`` — the same as Markdown tables, a section per step;
- ``details.tar.gz`` — every step's log and raw outputs.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from dali_ba.loading.feed import MIXED_DECODE_TOLERANCE

ARCHIVED = (".log", ".json", ".jsonl", ".md", ".png", ".txt", ".toml", ".xml")  # what details.tar.gz keeps
HOST_SYNCS = "host syncs in a steady training step = 0"
BATCH_INTACT = (
    "batch tensor intact two batches later (DALI's GPU memory through DLPack): largest difference from its clone = 0"
)
DECODER_DIFFERENCE = "mixed decoder's largest pixel difference from the cpu decoder <= MIXED_DECODE_TOLERANCE"
AUTO_AUGMENT_SCALING = "randaugment on DALI's graph: a batch at M = 10 costs <= 2.5 x one at M = 4"
GPU_ONLY = (HOST_SYNCS, BATCH_INTACT, DECODER_DIFFERENCE)  # measured on CUDA only: "not measured" in a smoke run


def _ratio_target(name: str, views: int, value: float | None, detail: str, threshold: float) -> dict:
    met = None if value is None else value >= threshold
    return dict(target=name, views=views, value=value, threshold=threshold, met=met, detail=detail)


def targets(steps: dict[str, dict]) -> list[dict]:
    """The issue's targets as ratios measured in this one run; ``met`` is None where a step gave no number."""
    loader = {(r["method"], r["views"]): r for r in steps.get("loader", {}).get("result", {}).get("results", [])}
    out = []

    def ratio(peer: str, views: int, key: str) -> tuple[float | None, str]:
        """dali-ba's running rate over the peer's, and the numbers behind it (whole-epoch ratio too)."""
        ours, theirs = loader.get(("a", views), {}), loader.get((peer, views), {})
        if not (ours.get(f"running_{key}") and theirs.get(f"running_{key}")):
            return None, "not measured"
        value = ours[f"running_{key}"] / theirs[f"running_{key}"]
        return value, (
            f"a {ours[f'running_{key}']:.0f} / {peer} {theirs[f'running_{key}']:.0f} {key.replace('_per_s', '/s')}"
            f" (whole epochs: {ours[key] / theirs[key]:.2f})"
        )

    for m in (4, 10):
        out.append(
            _ratio_target(
                "dali-ba views/s >= 3 x torchvision DataLoader (16 workers)",
                m,
                *ratio("c", m, "views_per_s"),
                threshold=3.0,
            )
        )
    out.append(
        _ratio_target(
            "dali-ba samples/s at M = 1 >= 0.7 x DALI's decode alone (ceiling)",
            1,
            *ratio("f", 1, "samples_per_s"),
            threshold=0.7,
        )
    )
    source, rows = figure5_rows(steps)
    for row in rows or [dict(views=m) for m in (1, 4, 10)]:
        stall = row.get("data_stall")
        out.append(
            dict(
                target="data stall <= 2 % of the step",
                views=row["views"],
                value=stall,
                threshold=0.02,
                met=None if stall is None else stall <= 0.02,
                detail=f"from {source}",
            )
        )
        fed, memory = row.get("images_per_s"), row.get("memory_images_per_s")
        out.append(
            _ratio_target(
                "training images/s fed by the loader >= 0.95 x from in-memory batches",
                row["views"],
                fed / memory if fed and memory else None,
                f"{fed or 0:.0f} / {memory or 0:.0f} img/s, from {source}",
                threshold=0.95,
            )
        )
        if row["views"] == 4:  # torch's sync debug mode over the timed loader-fed steps, after the warm-up
            syncs = row.get("syncs_per_step")
            sites = ", ".join(row.get("sync_sites", [])[:3]) or "none"
            out.append(
                dict(
                    target=HOST_SYNCS,
                    views=4,
                    value=syncs,
                    threshold=0,
                    met=None if syncs is None else syncs == 0,
                    detail=f"most in one step over the ranks; sites: {sites}; from {source}",
                )
            )
    out.append(_auto_augment_scaling(steps.get("augment", {}).get("result", {}).get("results", [])))
    facts = steps.get("loader", {}).get("result", {})  # benchmarks/gpu_check/facts.py's, measured by the loader step
    lifetime = facts.get("batch_lifetime")
    out.append(_fact_target(BATCH_INTACT, lifetime, _intact, 0, (lifetime or {}).get("views")))
    out.append(_fact_target(DECODER_DIFFERENCE, facts.get("decoder_difference"), _decoded, MIXED_DECODE_TOLERANCE))
    return out


def _auto_augment_scaling(results: list[dict]) -> dict:
    """The augment step's randaugment batch cost (M over views/s) at M = 10 over M = 4."""
    cases = {(r["augment"], r["views"]): r for r in results}
    low, high = cases.get(("randaugment", 4), {}), cases.get(("randaugment", 10), {})
    if not (low.get("views_per_s") and high.get("views_per_s")):
        value, detail = None, "not measured: the augment step has no randaugment M = 4 and M = 10"
    else:
        value = (10 / high["views_per_s"]) / (4 / low["views_per_s"])
        detail = f"{low['views_per_s']:.0f} views/s at M = 4, {high['views_per_s']:.0f} at M = 10; from augment"
    met = None if value is None else value <= 2.5
    return dict(target=AUTO_AUGMENT_SCALING, views=10, value=value, threshold=2.5, met=met, detail=detail)


def _fact_target(
    target: str, fact: dict | None, read: Callable[[dict], tuple[int, str]], threshold: int, views: int | None = None
) -> dict:
    """A fact of the loader step as a target row, met when its value is at most ``threshold``. Unmeasured
    (value and met None), and why, where the step has no number for it: on the CPU (the smoke run), after
    an error, or when the step did not get to it."""
    if not fact:
        value, detail = None, "not measured: the loader step recorded nothing"
    elif "skipped" in fact:
        value, detail = None, f"unmeasured on the CPU: {fact['skipped'].split(':')[0]}"
    elif "error" in fact:
        value, detail = None, f"not measured: {fact['error']}"
    else:
        value, detail = read(fact)
    met = None if value is None else value <= threshold
    return dict(target=target, views=views, value=value, threshold=threshold, met=met, detail=f"{detail}; from loader")


def _yes(flag: bool | None) -> str:
    return "unknown" if flag is None else "yes" if flag else "no"


def _intact(fact: dict) -> tuple[int, str]:
    """batch_lifetime's largest difference from a clone made at once, a kept batch's or a late read's."""
    kept, late = fact["kept"], fact["late"]
    return max(kept["max_abs_difference"], late["max_abs_difference"]), (
        f"kept: intact {_yes(kept['equal'])} (largest difference {kept['max_abs_difference']}; a later batch in its "
        f"memory: {_yes(kept['memory_reused'])}); let go, read by a copy queued behind {late['queued_s']} s of GPU "
        f"work: intact {_yes(late['equal'])} (largest difference {late['max_abs_difference']}; the copy still queued "
        f"when the two batches were made: {_yes(late['queued'])}); {fact['decoder']} decoder, B = {fact['batch']}"
    )


def _decoded(fact: dict) -> tuple[int, str]:
    """decoder_difference's largest pixel difference on whole images, and the views' beside it."""
    whole, views = fact["whole"], fact["as_views"]
    return whole["max_abs_difference"], (
        f"{whole['arrays']} files decoded whole: mean difference {whole['mean_abs_difference']:.3g}, "
        f"{100 * whole['share_differing']:.3g} % of values differ; as dali-ba's views (M = {fact['views']}, "
        f"{fact['view_size']} px, the same boxes and flips, DALI's GPU operators against its CPU ones): max "
        f"{views['max_abs_difference']}, mean {views['mean_abs_difference']:.3g}; hw_decoder_load "
        f"{fact['hw_decoder_load']}"
    )


def figure5_rows(steps: dict[str, dict]) -> tuple[str, list[dict]]:
    """Figure 5's rows from the figure5 step, or from the views step where figure5 measured nothing."""
    rows = steps.get("figure5", {}).get("result", {}).get("results", [])
    if rows:
        return "figure5 (profile step)", rows
    return "views (profile views)", steps.get("views", {}).get("result", {}).get("results", [])


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def archive(details: Path) -> bytes:
    """details.tar.gz: the logs and small outputs of every step (no checkpoints, models or images)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(details.rglob("*")):
            if path.is_file() and path.suffix in ARCHIVED and path.stat().st_size < 4 * 2**20:
                tar.add(path, arcname=str(Path("details") / path.relative_to(details)))
    return buffer.getvalue()


def fmt(value) -> str:
    """None as a dash, floats with 3 significant digits (or whole above 1000)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> list[str]:
    """A Markdown table, its cells as :func:`fmt` writes them."""
    return (
        ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
        + [""]
    )


def markdown(report: dict) -> str:
    """gpu_check.md: the run, the machine, the steps, the targets, then each step's numbers."""
    m, steps = report["machine"], {s["name"]: s for s in report["steps"]}
    result = {name: s.get("result", {}) for name, s in steps.items()}
    lines = [f"# GPU check: {m.get('gpu', '?')}", ""]
    if report["smoke"]:
        lines += [f"> **{report['note']}**", ""]
    lines += [
        f"Started {report['started']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget: "
        f"`{report['command']}`",
        "",
        "## Machine",
        "",
    ]
    keys = (
        "gpu",
        "gpu_memory_gib",
        "compute_capability",
        "driver",
        "torch_cuda",
        "cudnn",
        "torch",
        "torchvision",
        "dali",
        "nvimgcodec",
        "python",
        "cores",
        "cpu",
        "memory_gib",
        "os",
    )
    lines += table(["what", "value"], [[key, m.get(key)] for key in keys])
    lines += ["## Steps", ""] + table(
        ["step", "what", "status", "seconds", "limit s", "budget s"],
        [
            [
                s["name"],
                s["title"],
                s["status"],
                s.get("seconds"),
                s.get("limit_s"),
                f"{s.get('budget_s')} (optional: on what is left)" if s.get("optional") else s.get("budget_s"),
            ]
            for s in report["steps"]
        ],
    )
    verdicts = {True: "met", False: "**missed**", None: "not measured"}
    lines += ["## Targets (ratios measured in this one run)", ""] + table(
        ["target", "M", "value", "threshold", "", "from"],
        [
            [t["target"], t["views"], t["value"], t["threshold"], verdicts[t["met"]], t["detail"]]
            for t in report["targets"]
        ],
    )
    where = " (smoke run: CPU values at tiny sizes, no GPU numbers)" if report["smoke"] else ""
    for name, render in RENDERERS:
        if result.get(name):
            lines += [f"## {steps[name]['title']}{where}", ""] + render(result[name])
    return "\n".join(lines)


def _env_md(r: dict) -> list[str]:
    hw = r.get("hardware_decoder", {})
    runs = [(key, hw[key]) for key in ("dali_mixed_hw_load_0", "dali_mixed_default", "dali_cpu") if key in hw]
    return [
        f"Hardware JPEG decoder in use by DALI: **{hw.get('in_use', '–')}** (evidence: {hw.get('evidence', '–')}); "
        f"nvImageCodec's {hw.get('nvimgcodec_backend', '?')} backend decoded {hw.get('nvimgcodec_decoded', '–')} "
        f"of {min(64, hw.get('files', 0))} files; nvidia-smi JPG utilisation samples: "
        f"{hw.get('nvidia_smi_jpg_utilisation', '–')}.",
        "",
    ] + table(
        ["DALI decode", "hw_decoder_load", "images/s", "CPU ms per image", "cores busy"],
        [
            [key, v.get("hw_decoder_load"), v.get("images_per_s"), v.get("cpu_ms_per_image"), v.get("cores_busy")]
            if "error" not in v
            else [key, v["error"], None, None, None]
            for key, v in runs
        ],
    )


def _doctor_md(r: dict) -> list[str]:
    d = r.get("doctor", {})
    lines = [
        f"`python -m dali_ba.doctor --dali-threads 1`: {d.get('status', '–')} (rc {d.get('rc')}) in "
        f"{d.get('seconds', '–')} s; verdict: **{d.get('verdict') or 'none printed'}**.",
        "",
    ]
    return lines + [f"- {problem}" for problem in d.get("problems", [])] + [""]


def _tests_md(r: dict) -> list[str]:
    counts = ", ".join(f"{n} {kind.lower()}" for kind, n in r.get("counts", {}).items()) or "none ran"
    lines = [
        f"On CUDA: {r.get('cuda')}. Results: {counts}. {len(r.get('files', []))} files, each in its own pytest "
        f"process under its own limit ({r.get('parallel')} at once). `-k {r.get('select', '')}`",
        "",
    ]
    lines += table(
        ["file", "status", "seconds", "limit s", "outcomes", "failed"],
        [
            [
                name,
                f.get("status"),
                f.get("seconds"),
                f.get("limit_s"),
                ", ".join(f"{n} {kind.lower()}" for kind, n in f.get("counts", {}).items()) or None,
                len(f.get("failed", [])) or None,
            ]
            for name, f in r.get("per_file", {}).items()
        ],
    )
    reasons = r.get("reasons", {})
    lines += [f"- failed: `{name}`" + (f": {reasons[name]}" if name in reasons else "") for name in r.get("failed", [])]
    lines += [f"- deselected `{key}`: {why}" for key, why in r.get("deselected", {}).items()]
    return lines + [""]


def _demo_md(r: dict) -> list[str]:
    runs = r.get("runs", {})
    lines = table(
        ["run", "flags", "rc", "device", "decoder", "engine", "top-1 %", "top-5 %", "steps/s", "seconds"],
        [
            [
                name,
                v.get("flags"),
                v.get("rc"),
                v.get("device"),
                v.get("decoder"),
                f"{v.get('engine')} ({v.get('engine_backend')})",
                v.get("top1"),
                v.get("top5"),
                v.get("steps_per_s"),
                v.get("seconds"),
            ]
            for name, v in runs.items()
        ],
    )
    acc, resume = r.get("accuracy", {}), r.get("resume", {})
    stop = resume.get("stop", {})
    lines += [
        f"Accuracy: bf16 top-1 {acc.get('gpu_bf16_top1')} % here against {acc.get('cpu_demo_top1')} % for the "
        f"CPU demo (docs/measured.md; 2 ranks), difference {acc.get('difference')}.",
        "",
        f"Resume: stopped at step {stop.get('step')} of {stop.get('steps_per_epoch')} per epoch (mid-epoch: "
        f"{stop.get('mid_epoch')}, rc {stop.get('rc')}); resumed bit-identical to the uninterrupted run: "
        f"**{resume.get('exact')}**; two uninterrupted runs identical (deterministic): {resume.get('deterministic')}"
        + (
            f"; max |difference| resumed {resume['max_abs_difference_resumed']:.3g}, run to run "
            f"{resume['max_abs_difference_run_to_run']:.3g}"
            if "max_abs_difference_resumed" in resume
            else ""
        )
        + f". The runs compared trained with --deterministic: {r.get('deterministic_flag')}.",
        "",
    ]
    return lines


def _loader_md(r: dict) -> list[str]:
    lines = [
        f"{r.get('files')} JPEGs (~500x375, ~110 KB), B = {r.get('batch')}, {r.get('view_size')} px views, "
        f"{r.get('workers')} DataLoader workers / DALI threads, epochs cut at {r.get('epoch_seconds')} s; "
        "running = without each epoch's start. Cases in the order they ran: "
        f"{', '.join(r.get('order') or []) or '–'} ({r.get('order_rule', 'round-robin')}).",
        "",
    ]
    headers = r.get("headers") or {}
    if "samples_per_s" in headers:
        lines += [
            f"Headers read first, as a run's first pass over data does (then kept for the run): "
            f"{headers['samples_per_s']:.0f} samples/s on {headers['threads']} threads "
            f"({headers['cores_busy']:.1f} cores busy); dali-ba's cases (a, f) are timed with those sizes "
            "cached, as from a run's second epoch on.",
            "",
        ]
    elif headers:
        lines += [f"Headers read first: {headers.get('error')}; each dali-ba case read its own.", ""]
    return (
        lines
        + table(
            [
                "method",
                "M",
                "samples/s",
                "views/s",
                "running samples/s",
                "running views/s",
                "cores used",
                "first batch s",
            ],
            [
                [
                    f"({x['method']}) {x['name']}",
                    x["views"],
                    f"error: {x['error']}" if "error" in x else x.get("samples_per_s"),
                    x.get("views_per_s"),
                    x.get("running_samples_per_s"),
                    x.get("running_views_per_s"),
                    x.get("cores_used"),
                    x.get("first_batch_s"),
                ]
                for x in r.get("results", [])
            ],
        )
        + _hw_load_md(r)
    )


def _hw_load_md(r: dict) -> list[str]:
    hw = r.get("hw_decoder_load")
    if not hw:
        return []
    loads = ", ".join(map(str, hw.get("loads", [])))
    head = f"The mixed decoder at `hw_decoder_load` {loads} (dali-ba's default: {hw.get('default')})"
    if "skipped" in hw:
        return [f"{head}: skipped, {hw['skipped']}.", ""]
    notes = [hw[key] for key in ("loader_note", "cut") if key in hw]
    rows = []
    for x in hw.get("rows", []):
        decode, loader = x.get("decode", {}), x.get("loader", {})
        rows.append(
            [
                f"{x['hw_decoder_load']}" + (" (default)" if x.get("default") else ""),
                decode.get("images_per_s", decode.get("error")),
                decode.get("cpu_ms_per_image"),
                loader.get("views_per_s", loader.get("error")),
                loader.get("running_views_per_s"),
                loader.get("cores_used"),
            ]
        )
    return [
        f"{head}; DALI's decode alone, and dali-ba at M = {hw.get('views')}" + "".join(f"; {n}" for n in notes) + ":",
        "",
    ] + table(
        [
            "hw_decoder_load",
            "decode images/s",
            "decode CPU ms/image",
            "dali-ba views/s",
            "running views/s",
            "cores used",
        ],
        rows,
    )


def _augment_md(r: dict) -> list[str]:
    lines = [
        f"{r.get('files')} JPEGs, B = {r.get('batch')}, {r.get('view_size')} px views, {r.get('threads')} DALI "
        f"threads, the recipe's defaults (randaugment n = 2, m = 9); graph s: the first batch ever (graph defined "
        f"and built); epoch start s: the next epoch's first batch (the same graph); rates over "
        f"{r.get('seconds_per_case')} s after them.",
        "",
    ]
    lines += table(
        ["augment", "M", "decoder / stage", "graph s", "epoch start s", "views/s", "samples/s"],
        [
            [
                x["augment"],
                x["views"],
                f"{x['decoder']} / {x['stage']}",
                x["graph_s"],
                x["epoch_start_s"],
                x["views_per_s"],
                x["samples_per_s"],
            ]
            for x in r.get("results", [])
        ],
    )
    lines += [f"- {case}: {error}" for case, error in r.get("errors", {}).items()]
    return lines + ([f"- {r['cut']}"] if "cut" in r else []) + [""]


PHASES = ("data", "h2d", "forward_backward", "allreduce_step")


def _figure5_md(r: dict) -> list[str]:
    return table(
        [
            "M",
            "steps/s",
            "img/s, loader",
            "img/s, memory",
            "data stall",
            "data wait",
            "loader alone samples/s",
            *[f"{p} ms" for p in PHASES],
        ],
        [
            [
                _cut(x),
                x["steps_per_s"],
                x["images_per_s"],
                x["memory_images_per_s"],
                x["data_stall"],
                x["data_wait_share"],
                x["loader_alone_samples_per_s"],
                *[x["phases_ms"].get(p) for p in PHASES],
            ]
            for x in r.get("results", [])
        ],
    )


def _cut(row: dict) -> str:
    """M, and where its profile was cut at its limit, the windows it finished."""
    if row.get("complete", True):
        return str(row["views"])
    return f"{row['views']} (cut: {', '.join(row.get('windows') or []) or 'no'} window done)"


def _views_md(r: dict) -> list[str]:
    cut = (
        ""
        if r.get("complete", True)
        else f" Cut at its limit: M = {', '.join(map(str, r.get('measured') or [])) or 'none'} measured."
    )
    head = f"Free views (step time within {r.get('tolerance')} of M = 1's): M = {r.get('free_views')}.{cut}"
    return [head, ""] + table(
        ["M", "steps/s", "img/s", "views/s", "img/s, memory", "data stall", "step time / M=1's", "source ms/batch"],
        [
            [
                x["views"],
                x["steps_per_s"],
                x["images_per_s"],
                x["views_per_s"],
                x["memory_images_per_s"],
                x["data_stall"],
                x["step_time_ratio"],
                x.get("source_ms"),
            ]
            for x in r.get("results", [])
        ],
    )


def _compile_md(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"Skipped: {r['skipped']}.", ""]
    compiled, plain = r.get("compiled") or {}, r.get("uncompiled") or {}
    compile_s = fmt(r["compile_s"]) + " s" if r.get("compile_s") is not None else r.get("compile_note", "–")
    return [
        f"M = {r.get('views')}, {r.get('arch')}, {r.get('steps')} steps after {r.get('warmup')} per window: "
        f"compile time **{compile_s}** with inductor's cache {r.get('inductor_cache', '–')} (this run "
        f"{fmt(r.get('seconds'))} s, figure5's uncompiled run at this M {fmt(r.get('uncompiled_seconds'))} s; "
        f"each less its steps: {r.get('compile_rule', 'the difference')}); "
        f"steps/s compiled {fmt(compiled.get('steps_per_s'))} against {fmt(plain.get('steps_per_s'))} uncompiled "
        f"(speed-up {fmt(r.get('speedup'))}); data stall compiled {fmt(compiled.get('data_stall'))}.",
        "",
    ]


RENDERERS = (
    ("env", _env_md),
    ("doctor", _doctor_md),
    ("tests", _tests_md),
    ("demo", _demo_md),
    ("loader", _loader_md),
    ("augment", _augment_md),
    ("figure5", _figure5_md),
    ("views", _views_md),
    ("compile", _compile_md),
)


def write_report(out: Path, report: dict, details: Path) -> None:
    """Rewrite the three files of ``out`` (each atomically: a kill never leaves half a file)."""
    write_atomic(out / "gpu_check.json", (json.dumps(report, indent=1, default=str) + "\n").encode())
    write_atomic(out / "gpu_check.md", markdown(report).encode())
    write_atomic(out / "details.tar.gz", archive(details))
