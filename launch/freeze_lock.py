"""Print the lock file (launch/constraints.txt) for the virtualenv whose python runs this: every package
make installs, pinned, for this machine's DALI build and for the other one (their own dependencies,
resolved by pip without installing). torch, torchvision and the CUDA libraries torch pins are left to
TORCH_SPEC in launch/install.sh (a CUDA 12 torch from another index must stay possible).

    python launch/freeze_lock.py   (run by launch/lock.sh, that is by make lock)
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

DALI_BUILDS = ("nvidia-dali-cuda120", "nvidia-dali-cuda130")
LEFT_TO_TORCH_SPEC = {"torch", "torchvision", "triton"}
NOT_LOCKED = {"dali-ba", "pip", "setuptools-scm"}


def normalize(name: str) -> str:
    """PEP 503: pip's names compare case-insensitively, '-', '_' and '.' alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}


def torch_pins() -> set[str]:
    """The packages torch's own metadata pins to one version (its CUDA libraries)."""
    names = set()
    for requirement in metadata.requires("torch") or []:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*==", requirement)
        if match and "extra ==" not in requirement:
            names.add(normalize(match.group(1)))
    return names


def other_dali(pins: dict[str, str]) -> dict[str, str]:
    """The other DALI build at this one's version, with the dependencies pip resolves for it here
    (the common ones held at this lock's versions)."""
    (mine,) = [name for name in DALI_BUILDS if name in pins]
    (other,) = [name for name in DALI_BUILDS if name != mine]
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "c.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if n != mine))
        report = Path(folder) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--dry-run",
             "--ignore-installed", "--report", str(report), "-c", str(constraints), f"{other}=={pins[mine]}"],
            check=True,
        )  # fmt: skip
        resolved = json.loads(report.read_text())["install"]
    return {normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in resolved}


def main() -> None:
    left_out = LEFT_TO_TORCH_SPEC | torch_pins() | NOT_LOCKED
    pins = {name: version for name, version in sorted(installed().items()) if name not in left_out}
    pins.update({name: version for name, version in other_dali(pins).items() if name not in left_out})
    print("# launch/constraints.txt: every Python package make installs, pinned (pip -c). Written by make lock")
    print(f"# (launch/lock.sh) on {datetime.date.today()}, Python {platform.python_version()}, {platform.machine()};")
    print("# edit it only through make lock. Your own versions: DALI_BA_CONSTRAINTS=none make install (or a")
    print("# file of your own); the doctor then says which installed versions differ from this file.")
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
