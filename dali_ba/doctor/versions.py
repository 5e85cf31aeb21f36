"""The versions dali-ba supports: setup.cfg is the one place they are written (the installed
package's metadata, where there is no checkout)."""

from __future__ import annotations

import configparser
import contextlib
import re
from email.message import Message
from importlib import metadata
from pathlib import Path
from typing import cast

from dali_ba.install_choice import version_tuple

REPO_SETUP = Path(__file__).resolve().parents[2] / "setup.cfg"  # a source checkout's (editable installs too)


def requirement_floors() -> dict[str, tuple[int, ...]]:
    """The oldest Python, torch, torchvision (and Horovod and DALI, extras) dali-ba supports, from the
    checkout's setup.cfg where this runs from one, else from the installed package's metadata."""
    lines: list[str] = []
    config = configparser.ConfigParser(interpolation=None)
    if REPO_SETUP.is_file() and config.read(REPO_SETUP) and config.get("metadata", "name", fallback="") == "dali-ba":
        options = config["options"]
        extras = config["options.extras_require"]
        lines = [
            f"python{options.get('python_requires', '')}",
            *options.get("install_requires", "").split("\n"),
            *(line for name in extras for line in extras[name].split("\n")),
        ]
    else:
        with contextlib.suppress(metadata.PackageNotFoundError):
            lines = [
                f"python{cast(Message, metadata.metadata('dali-ba')).get('Requires-Python') or ''}",
                *(metadata.requires("dali-ba") or []),
            ]
    floors = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", line.split(";")[0])
        if match:
            floors[match.group(1).lower()] = version_tuple(match.group(2))
    return floors


REPO_LOCK = Path(__file__).resolve().parents[2] / "launch" / "constraints.txt"  # make's lock, in a checkout


def normalize(name: str) -> str:
    """PEP 503: package names compare case-insensitively, '-', '_' and '.' alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = REPO_LOCK) -> dict[str, str]:
    """The lock's pins, name -> version ({} where there is no lock: an installed wheel, not a checkout)."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#", 1)[0].strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def lock_drift(pins: dict[str, str]) -> list[tuple[str, str, str]]:
    """The installed packages whose version is not the lock's: (name, installed, locked), by name. A
    package the lock names that is not installed is no drift (the lock holds both DALI builds)."""
    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return [
        (name, installed[name], pins[name])
        for name in sorted(pins)
        if name in installed and installed[name] != pins[name]
    ]
