"""Which NVIDIA DALI build fits this machine's NVIDIA driver: the one rule that ``launch/install.sh``
follows and ``python -m dali_ba.doctor`` warns by.

DALI ships one wheel per CUDA major version, and each needs a Linux driver at least as new as its
CUDA (DALI's installation guide): ``nvidia-dali-cuda130`` from driver 580, ``nvidia-dali-cuda120``
from 525.60. Many clusters still run 535 or 550, where only the CUDA 12 build loads. torch's CUDA
wheels follow the same rule by their CUDA major (``torch.version.cuda``). A machine without a driver
(no ``nvidia-smi``, or one that finds no GPU) keeps the build this project is tested with on CPU.

    python -m dali_ba.install_choice                   # nvidia-dali-cuda120==2.4.0 on a 550 driver
    python -m dali_ba.install_choice --driver 550.54   # the choice for another machine's driver
    DALI_CUDA=130 python -m dali_ba.install_choice     # or --dali-cuda 130: a build named outright
    python -m dali_ba.install_choice --plan            # install, keep or replace what is installed

``DALI_SPEC`` (a full pip requirement) overrides everything. Standard library only: install.sh runs
it before anything else is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

DALI_VERSION = "2.4.0"
# The oldest DALI the graphs run on (docs/installing.md, the versions table): DALI 1.44 made the dynamic executor
# (``exec_dynamic``, asked for by every pipeline of dali_ba.loading.pipeline) non-experimental (1.42 had it
# only as ``experimental_exec_dynamic``); the auto_aug suites (1.24) and the decoder's ``hw_decoder_load``
# are older. ``python -m dali_ba.doctor`` fails on an older DALI.
MIN_DALI = "1.44"
DRIVER_FLOOR = {13: (580,), 12: (525, 60), 11: (450, 80, 2)}  # CUDA major -> oldest Linux driver
BUILDS = {"120": 12, "130": 13}  # --dali-cuda / DALI_CUDA values -> CUDA major
NO_DRIVER_BUILD = "130"  # CPU-only machines: the build the tests run with here
PROG = "python -m dali_ba.install_choice"


def dali_package(build: str) -> str:
    return f"nvidia-dali-cuda{build}"


def version_tuple(text: str) -> tuple[int, ...]:
    """'550.54.15' -> (550, 54, 15); '2.14.1+cu130' -> (2, 14, 1): the leading numbers, for comparing."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def read_driver() -> str | None:
    """The NVIDIA driver version as ``nvidia-smi`` reports it (first GPU), or None where there is no
    nvidia-smi or it finds no GPU or driver."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines and version_tuple(lines[0]) else None


def driver_supports(cuda_major: int, driver: str) -> bool:
    """Whether a build for CUDA ``cuda_major`` runs on ``driver`` (unknown CUDA majors: assumed to)."""
    floor = DRIVER_FLOOR.get(cuda_major)
    return floor is None or version_tuple(driver) >= floor


class DriverTooOld(ValueError):
    """No DALI build runs on this driver."""


def build_for_driver(driver: str | None) -> tuple[str, str]:
    """The DALI build ('120' or '130') for ``driver`` (None: no driver), and why."""
    if driver is None:
        return NO_DRIVER_BUILD, f"no NVIDIA driver found (nvidia-smi): {dali_package(NO_DRIVER_BUILD)}, the CPU default"
    for build in sorted(BUILDS, reverse=True):  # the newest build this driver runs
        if driver_supports(BUILDS[build], driver):
            newer = [b for b in BUILDS if b > build]
            why = (
                f" ({dali_package(newer[0])} needs driver >= {dotted(DRIVER_FLOOR[BUILDS[newer[0]]])})" if newer else ""
            )
            return build, f"driver {driver}: {dali_package(build)}{why}"
    oldest = min(BUILDS, key=lambda b: DRIVER_FLOOR[BUILDS[b]])
    raise DriverTooOld(
        f"NVIDIA driver {driver} is older than {dotted(DRIVER_FLOOR[BUILDS[oldest]])}, the oldest "
        f"any DALI build supports ({dali_package(oldest)}): update the driver, or name an older DALI "
        "with DALI_SPEC"
    )


@dataclass(frozen=True)
class Choice:
    spec: str  # what pip installs: nvidia-dali-cuda120==2.4.0
    reason: str
    chosen: bool  # a driver or an override decided it (not merely the CPU default)

    @property
    def package(self) -> str:
        return re.split(r"[=<>!~;\[ ]", self.spec, maxsplit=1)[0]


def choose(driver: str | None, dali_cuda: str | None = None, spec: str | None = None) -> Choice:
    """The DALI requirement for this machine: ``spec`` (DALI_SPEC) as given, else the build
    ``dali_cuda`` names, else the build for ``driver``. Raises DriverTooOld, or ValueError for an
    unknown ``dali_cuda``."""
    if spec:
        return Choice(spec, f"DALI_SPEC={spec}", True)
    if dali_cuda:
        if dali_cuda not in BUILDS:
            raise ValueError(f"--dali-cuda / DALI_CUDA must be {' or '.join(BUILDS)}, got {dali_cuda!r}")
        reason = f"--dali-cuda {dali_cuda}"
        if driver is not None and not driver_supports(BUILDS[dali_cuda], driver):
            reason += (
                f" (it needs driver >= {dotted(DRIVER_FLOOR[BUILDS[dali_cuda]])}; this machine has {driver}, "
                "so it runs only on other nodes)"
            )
        return Choice(f"{dali_package(dali_cuda)}=={DALI_VERSION}", reason, True)
    build, reason = build_for_driver(driver)
    return Choice(f"{dali_package(build)}=={DALI_VERSION}", reason, driver is not None)


@dataclass(frozen=True)
class DaliBuild:
    package: str  # nvidia-dali-cuda120
    version: str
    cuda_major: int | None  # from the package name (None: a name without it)


def installed_dali() -> DaliBuild | None:
    """The DALI distribution installed in this Python (None: none is)."""
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("nvidia-dali-cuda"):
            digits = name.removeprefix("nvidia-dali-cuda")
            return DaliBuild(name, dist.version, int(digits[:-1]) if digits.isdigit() and len(digits) > 1 else None)
    return None


def plan(choice: Choice, installed: DaliBuild | None) -> str:
    """What install.sh does: ``install SPEC``, ``keep PACKAGE==VERSION``, or ``replace OLD SPEC`` where
    the installed build is not the chosen one and a driver or an override chose it (without a driver,
    a build installed on purpose, e.g. for GPU nodes from a login node, stays)."""
    if installed is None:
        return f"install {choice.spec}"
    if installed.package != choice.package and choice.chosen:
        return f"replace {installed.package} {choice.spec}"
    return f"keep {installed.package}=={installed.version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dali-cuda",
        default=os.environ.get("DALI_CUDA") or None,
        metavar="|".join(BUILDS),
        help="name the build outright (default: $DALI_CUDA, else by the driver)",
    )
    parser.add_argument(
        "--driver",
        metavar="VERSION",
        help="choose for this driver version instead of asking nvidia-smi (e.g. for the GPU nodes, from a login node)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print what to do with the DALI installed in this Python: "
        "'install SPEC', 'keep PACKAGE==VERSION' or 'replace OLD SPEC'",
    )
    args = parser.parse_args(argv)
    driver = args.driver if args.driver is not None else read_driver()
    try:
        choice = choose(driver, args.dali_cuda, os.environ.get("DALI_SPEC") or None)
    except DriverTooOld as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"DALI: {choice.reason}", file=sys.stderr)
    print(plan(choice, installed_dali()) if args.plan else choice.spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
