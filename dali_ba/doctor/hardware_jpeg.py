"""Whether nvImageCodec (the library DALI's mixed decoder decodes with) decodes JPEGs with its hardware
backend alone, asked in a child process under a time limit.

A doctor must never hang, and this is the one call in it that drives a hardware engine through a library of
its own. On the first GPU run (``benchmarks/results/gpu/2026-12-04-h200-1``) the doctor and the GPU check's
env step (inside its hardware-decoder measurements) were cut at their limits, 15 and 25 s, before either
reported; the rerun on a fresh H200 showed the probe answering (64 of 64 files; the doctor in 12 s, the env
step in 31.5 s), so that was a cold machine against too tight a limit. The child stays: one that gives no
answer in time is killed, and the answer says so and where it was stuck (its Python stack, dumped by
:mod:`faulthandler` just before the limit).
:func:`main` is the child."""

from __future__ import annotations

import faulthandler
import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PROBE_TIMEOUT_S = 20.0


def decodes(gpu_index: int | None, files: Sequence[str] = (), timeout: float = PROBE_TIMEOUT_S) -> int | str:
    """How many of ``files`` (one small JPEG made in memory where none are given) nvImageCodec decodes
    with its hardware backend alone on GPU ``gpu_index`` (with its CPU backend where that is None); or,
    where it cannot tell, why: the library does not import, its backend failed, or it gave no answer
    within ``timeout`` seconds (then the line of Python it was stuck in)."""
    child = f"import sys; from {__name__} import main; sys.exit(main(sys.argv[1:]))"  # not a command of its own
    command = [sys.executable, "-c", child, "cpu" if gpu_index is None else str(gpu_index), str(timeout), *files]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return f"nvImageCodec gave no answer in {timeout:.0f} s{stuck_at(exc.stderr)}"
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        error = done.stderr.decode(errors="replace").strip().splitlines()
        return f"the probe ended with status {done.returncode}: {error[-1] if error else 'no output'}"[:300]
    return answer["decoded"] if "decoded" in answer else answer["error"]


def stuck_at(stderr: bytes | str | None) -> str:
    """``" (stuck at File ..., line N in f)"``: the innermost frame of the first thread in a faulthandler
    dump (the current thread's comes first), or nothing where there is no dump."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    frame = next((line.strip() for line in text.splitlines() if line.strip().startswith("File ")), None)
    return f" (stuck at {frame})" if frame else ""


def small_jpeg() -> bytes:
    """A 64x64 baseline 4:2:0 JPEG, made in memory."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str]) -> int:
    """The child: ``GPU|cpu TIMEOUT [FILE ...]``; prints ``{"decoded": N}`` or ``{"error": "..."}``."""
    device, timeout, files = argv[0], float(argv[1]), argv[2:]
    faulthandler.dump_traceback_later(max(0.5, timeout - 2), exit=False)  # where it hangs, before the kill
    try:
        import nvidia.nvimgcodec as nv
    except ImportError as exc:
        print(json.dumps({"error": f"nvImageCodec does not import: {exc}"[:300]}))
        return 0
    backend = "CPU" if device == "cpu" else "hardware"
    try:
        if device == "cpu":
            kind, options = nv.BackendKind.CPU_ONLY, {"device_id": nv.NVIMGCODEC_DEVICE_CPU_ONLY}
        else:
            kind, options = nv.BackendKind.HW_GPU_ONLY, {"device_id": int(device)}
        decoder = nv.Decoder(backends=[nv.Backend(kind)], **options)
        streams = [nv.CodeStream(Path(f).read_bytes()) for f in files] or [nv.CodeStream(small_jpeg())]
        images = decoder.decode(streams)
    except Exception as exc:
        print(json.dumps({"error": f"nvImageCodec's {backend} backend failed: {exc}"[:300]}))
        return 0
    print(json.dumps({"decoded": sum(image is not None for image in images)}))
    return 0
