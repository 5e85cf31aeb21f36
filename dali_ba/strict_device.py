"""The GPU's contract, enforced on the CPU: a stand-in device whose tensors act as if they lived off the host.

On a GPU, code that reads device data on the host or mixes it with host tensors fails or waits, and
the CPU shows neither: such code passes every test here and breaks in the rare GPU window. Under the
strict device mode (``DALI_BA_STRICT_DEVICE=1``, or a folder for a report; ``pytest --strict-device``)
the training device is a stand-in, ``cpu:0`` (:data:`STANDIN`), and what lives on it is a
:class:`DeviceTensor` (ordinary CPU memory, so DALI, Horovod and Gloo still work on it) that:

- refuses what CUDA refuses: ``.numpy()``, and mixing it with a host tensor of one or more
  dimensions in one operation (a 0-d host tensor, a Python number or a host index is allowed, as on
  CUDA); the message names the call and where it was made;
- refuses implicit host reads in the package and its benchmarks (``bool()``, ``float()``, ``int()``,
  ``.item()``, ``.tolist()``, ``in``, formatting; iterating gives device rows, whose reads are
  refused in turn): a read that waits for the GPU is spelled
  ``.cpu()`` there. In tests (an ``assert (a == b).all()``) and inside torch and other libraries
  such reads are counted, not refused, as CUDA allows them;
- counts, with its call site, every host synchronisation a CUDA run would make: ``.cpu()`` /
  ``.to("cpu")``, host reads, ``new_tensor`` / ``torch.tensor`` of host data onto the device,
  blocking host-to-device copies, boolean-mask indexing, ``nonzero``, ``masked_select``,
  ``unique``, and the step clock's waits (:func:`record`).

``.to(STANDIN)`` of a host tensor gives a device tensor; a module's parameters become device
parameters in place (an optimizer made before keeps them). :func:`mark_step` (called by the step
clock) splits the count into steps; with a folder given, each process writes
``syncs-<pid>.json`` there at exit. What it cannot see: the speed of anything, pinned memory
(pinning needs a GPU), CUDA streams and events, and syncs inside C++ extensions.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ENV = "DALI_BA_STRICT_DEVICE"
STANDIN = torch.device("cpu", 0)  # the training device under the strict mode; the host is plain "cpu"
_PACKAGE = Path(__file__).resolve().parent
_ROOT = _PACKAGE.parent
_OURS = (str(_ROOT / "dali_ba"), str(_ROOT / "tests"), str(_ROOT / "benchmarks"))
_PACKAGE_CODE = (str(_ROOT / "dali_ba"), str(_ROOT / "benchmarks"))  # where an implicit host read is refused
_SKIP = (str(Path(torch.__file__).parent), __file__)


class StrictDeviceError(RuntimeError):
    """Code that would fail (or silently wait) on a GPU, found on the CPU."""


class SyncLog:
    """Host synchronisations so far: (kind, call site) each, and where each step began."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.step_starts: list[int] = []

    def per_step(self) -> list[int]:
        """Syncs from each step's start to the next one's (the last: to now)."""
        bounds = [*self.step_starts, len(self.events)]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def report(self) -> dict:
        rank = next(
            (os.environ[k] for k in ("OMPI_COMM_WORLD_RANK", "RANK", "PMI_RANK", "SLURM_PROCID") if k in os.environ),
            None,
        )
        starts = self.step_starts
        step_of = [sum(1 for s in starts if s <= i) - 1 for i in range(len(self.events))]
        return {
            "rank": None if rank is None else int(rank),
            "pid": os.getpid(),
            "steps": len(starts),
            "per_step": self.per_step(),
            "total": len(self.events),
            "syncs": [{"kind": kind, "site": site, "step": step} for (kind, site), step in zip(self.events, step_of)],
        }


LOG = SyncLog()
_mode: TorchFunctionMode | None = None


def enabled() -> bool:
    """Whether this process runs under the strict device mode (once :func:`enable` ran, or asked by ``ENV``)."""
    return _mode is not None or os.environ.get(ENV, "") not in ("", "0")


def enable() -> torch.device:
    """Turn the mode on for this process (idempotent); returns the stand-in device."""
    global _mode
    if _mode is None:
        _mode = _HostMode()
        _mode.__enter__()
        folder = os.environ.get(ENV, "")
        if folder not in ("", "0", "1"):
            atexit.register(_write_report, Path(folder))
    return STANDIN


@contextlib.contextmanager
def active() -> Iterator[SyncLog]:
    """The mode for a block (tests of the mode itself), with a sync log of its own; restores what was."""
    global _mode, LOG
    was, saved = _mode, LOG
    LOG = SyncLog()
    if was is None:
        enable()
    try:
        yield LOG
    finally:
        if was is None and _mode is not None:
            _mode.__exit__(None, None, None)
            _mode = None
        LOG = saved


def _write_report(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"syncs-{os.getpid()}.json").write_text(json.dumps(LOG.report(), indent=1) + "\n")


def record(kind: str) -> None:
    """Count one host synchronisation of ``kind`` at the caller's site (a no-op outside the mode)."""
    if _mode is not None:
        LOG.events.append((kind, _site()))


def mark_step() -> None:
    """A training step starts here: syncs from now on are the new step's."""
    if _mode is not None:
        LOG.step_starts.append(len(LOG.events))


def is_device(device: Any) -> bool:
    """Whether ``device`` names the stand-in device."""
    if device is None or isinstance(device, (int, torch.dtype)):
        return False
    try:
        return torch.device(device) == STANDIN
    except (RuntimeError, TypeError):
        return False


def is_host(device: Any) -> bool:
    try:
        return (
            device is not None and not isinstance(device, torch.dtype) and torch.device(device) == torch.device("cpu")
        )
    except (RuntimeError, TypeError):
        return False


# --- where a call came from ------------------------------------------------------------------------------


def _frames() -> list[traceback.FrameSummary]:
    """The stack, innermost first, without this module's and torch's own frames."""
    stack = traceback.extract_stack()[::-1]
    return [f for f in stack if not f.filename.startswith(_SKIP)]


def _site() -> str:
    """'file:line (function)' of the innermost frame outside torch, and the project's frame below it when
    that differs."""
    frames = _frames()
    if not frames:
        return "?"
    first = frames[0]
    text = f"{_short(first.filename)}:{first.lineno} ({first.name})"
    if not first.filename.startswith(_OURS):
        ours = next((f for f in frames if f.filename.startswith(_OURS)), None)
        if ours:
            text += f" via {_short(ours.filename)}:{ours.lineno} ({ours.name})"
    return text


def _short(filename: str) -> str:
    return os.path.relpath(filename, _ROOT) if filename.startswith(str(_ROOT)) else filename.split("site-packages/")[-1]


def _called_from_package() -> bool:
    frames = _frames()
    return bool(frames) and frames[0].filename.startswith(_PACKAGE_CODE)


# --- the device tensor -------------------------------------------------------------------------------------


def _host(tensor: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.as_subclass(torch.Tensor)


def _device(tensor: torch.Tensor) -> DeviceTensor:
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.as_subclass(DeviceTensor)


def _name(func) -> str:
    """``Tensor.add``, ``torch.stack``, ``torch.nn.functional.conv2d``: the call as a user writes it."""
    name = cast(str, getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func)))
    if name.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + name.split(".", 1)[1]
    module = getattr(func, "__module__", None) or "torch"
    if name.startswith("_VariableFunctionsClass.") or module.startswith("torch._C"):
        return "torch." + name.split(".")[-1]
    return f"{module}.{name}"


T = torch.Tensor
_READS = {
    T.item: ".item()",
    T.tolist: ".tolist()",
    T.__bool__: "bool()",
    T.__float__: "float()",
    T.__int__: "int()",
    T.__index__: "int()/index",
    T.__complex__: "complex()",
    T.__contains__: "in",
    T.__format__: "format()",
}
_SYNCING = {
    torch.nonzero: "nonzero",
    T.nonzero: "nonzero",
    torch.masked_select: "masked_select",
    T.masked_select: "masked_select",
    torch.unique: "unique",
    T.unique: "unique",
    torch.argwhere: "argwhere",
    T.argwhere: "argwhere",
}
_MIXABLE = {
    T.to,
    T.copy_,
    T.__getitem__,
    T.__setitem__,
    T.index_select,
    torch.index_select,
    T.new_tensor,
    T.type_as,
    T.__reduce_ex__,
    T.__deepcopy__,
    T.__repr__,
    T.__format__,
    T.__str__,
}
_STACKING = {torch.cat, torch.stack, torch.concat, torch.concatenate, torch.hstack, torch.vstack}


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device (see the module): CPU memory, GPU manners."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _getter(func) is T.device:
            return STANDIN
        if func in (T.numpy, T.__array__):
            raise StrictDeviceError(
                f"can't convert a device tensor to numpy ({_name(func)} at {_site()}): take .cpu() first, as on a GPU"
            )
        if func in _READS:
            return _read(func, args, kwargs)
        if func is T.cpu or (func is T.to and _to_host(args, kwargs)):
            record(".cpu()" if func is T.cpu else '.to("cpu")')
            kwargs = {k: v for k, v in kwargs.items() if k != "non_blocking"}
            return _host(_run(func, args, kwargs)).clone()  # a copy, as from a GPU: writes to it stay on the host
        if func is T.__reduce_ex__:  # a device tensor pickles (torch.save) as a host one, after a copy
            record("torch.save of a device tensor")
            return _host(args[0]).__reduce_ex__(*args[1:])
        if func in _SYNCING:
            record(_SYNCING[func])
        elif func in (T.__getitem__, T.__setitem__) and _bool_index(args[1] if len(args) > 1 else None):
            record("boolean-mask indexing")
        elif func is T.new_tensor:
            record("new_tensor of host data onto the device")
        elif (
            func is T.copy_
            and len(args) > 1
            and isinstance(args[0], DeviceTensor) != isinstance(args[1], DeviceTensor)
            and not kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        ):
            record("blocking copy_ between host and device")
        if func not in _MIXABLE:
            _check_mixing(func, args, kwargs)
        return _run(func, args, kwargs)


class DeviceParameter(DeviceTensor, torch.nn.Parameter):
    """A module's parameter moved to the stand-in device, in place (same object)."""


def _run(func, args: tuple, kwargs: dict):
    """``func`` as torch runs it, the tensors it returns on the device. A new tensor becomes a
    DeviceTensor in place (the same object: ``p.grad.set_(...)`` still reaches the gradient, and
    autograd sees no extra node); an input returned (an in-place op on a host tensor) is aliased."""
    with torch._C.DisableTorchFunctionSubclass():
        result = func(*args, **kwargs)
    if func is T.__setitem__:
        return result
    inputs = {id(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
    return _adopted(result, inputs)


def _adopted(result, inputs: set[int]):
    if isinstance(result, (tuple, list)):
        return type(result)(_adopted(r, inputs) for r in result)
    if not isinstance(result, torch.Tensor) or isinstance(result, DeviceTensor):
        return result
    if type(result) is torch.Tensor and id(result) not in inputs:
        result.__class__ = DeviceTensor
        return result
    return _device(result)


def _getter(func):
    """The property whose getter ``func`` is (``Tensor.grad.__get__`` -> ``Tensor.grad``), else None."""
    return getattr(func, "__self__", None) if getattr(func, "__name__", "") == "__get__" else None


def _read(func, args, kwargs):
    what = _READS[func]
    if _called_from_package():
        raise StrictDeviceError(
            f"{what} of a device tensor at {_site()} reads it on the host, which waits for the "
            "GPU; take .cpu() where the read is meant (and keep it out of the step)"
        )
    record(what)
    result = func(_host(args[0]), *args[1:], **kwargs)
    return result


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to(...)`` call names the host ("cpu") as its target device."""
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, torch.Tensor):
        return type(target) is not DeviceTensor
    return is_host(target)


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _check_mixing(func, args: tuple, kwargs: dict) -> None:
    """CUDA's "Expected all tensors to be on the same device": a device tensor and a host tensor
    of one or more dimensions (of any, for cat/stack) in one operation."""
    flat, _ = tree_flatten((args, kwargs))
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    if not any(isinstance(x, DeviceTensor) for x in tensors):
        return
    for x in tensors:
        if not isinstance(x, DeviceTensor) and (x.dim() > 0 or func in _STACKING):
            raise StrictDeviceError(
                f"{_name(func)} at {_site()} mixes a device tensor with a host tensor of shape {tuple(x.shape)}: "
                "on a GPU, 'Expected all tensors to be on the same device'; move it with .to(device) first"
            )


# --- onto the device: .to(STANDIN), factories with device=STANDIN ----------------------------------------------

_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    T.new_zeros,
    T.new_ones,
    T.new_empty,
    T.new_full,
    T.new_tensor,
}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_COPYING = {
    torch.tensor: "torch.tensor of host data onto the device",
    T.new_tensor: "new_tensor of host data onto the device",
}


class _HostMode(TorchFunctionMode):
    """Puts what is asked for on :data:`STANDIN` there; everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is T.to and args and not isinstance(args[0], DeviceTensor):
            return _onto_device(func, args, kwargs)
        if func in _FROM_DATA and args and isinstance(args[0], DeviceTensor) and kwargs.get("device") is None:
            return _adopted(func(*args, **kwargs), set())  # torch sees no tensor argument here: it stays where it was
        if func in _FACTORIES and is_device(kwargs.get("device")):
            if func in _COPYING or (func is torch.as_tensor and not isinstance(args[0], torch.Tensor)):
                record(_COPYING.get(func, "torch.as_tensor of host data onto the device"))
            result = func(*args, **{**kwargs, "device": "cpu"})
            return _device(result)
        return func(*args, **kwargs)


def _onto_device(func, args: tuple, kwargs: dict):
    """``host_tensor.to(...)``: onto the stand-in device (a blocking copy unless non_blocking), or as usual."""
    source = args[0]
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, torch.Tensor):  # .to(other): other's device and dtype
        if not isinstance(target, DeviceTensor):
            return func(*args, **kwargs)
        non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        args = (source, _host(target), *args[2:])
    elif is_device(target):
        positional = len(args) > 1 and not isinstance(args[1], torch.dtype)
        non_blocking = kwargs.get("non_blocking", args[3] if positional and len(args) > 3 else False)
        args = tuple("cpu" if i == 1 and positional else a for i, a in enumerate(args))
        kwargs = {**kwargs, **({"device": "cpu"} if "device" in kwargs else {})}
    else:
        return func(*args, **kwargs)
    if not non_blocking:
        record("blocking copy host -> device")
    result = func(*args, **kwargs)
    if type(source) is torch.nn.Parameter:  # a module's .to(device): its parameters move in place
        source.__class__ = DeviceParameter
        return source if result is source else _device(result)
    return _device(result)
