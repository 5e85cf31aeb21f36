"""The reader stage: threads reading the encoded bytes of each sample of a pass over data, fed to a
DALI graph by an external source. (Which files and labels a data set has is decided before, once:
:mod:`dali_ba.data.dataset`.)

A loader builds its DALI graph once per run and keeps it; every pass over data (an epoch, an epoch
resumed mid-way, an evaluation) is a new :class:`DataPass` handed to the same :class:`SampleSource`.
The source reads a few batches ahead in a thread pool while DALI decodes (reads wait on the file
system, not the CPU), and parses each sample's header as it reads it: the decoded size that the
view parameters are drawn from (kept for the rest of the run), and the problems that make a
sample a broken file before any decoder sees it (an unreadable file or header, an image larger
than ``max_pixels``). A broken sample is reported (``on_broken``) and its slot refilled with the
first good sample of its batch: the same batch as a pass that knew of the file from the start.

Each batch read ahead is also put together ahead, on a batch thread: its arrays and its view
parameters (a Philox generator per sample). DALI calls the source inside ``next()``, on the training
thread, which then only takes the finished batch (:attr:`SampleSource.callback_seconds` times that).
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from dali_ba.activity import ACTIVITY
from dali_ba.errors import UnreadableImageError

if TYPE_CHECKING:
    from dali_ba.data.dataset import ImageDataset

READ_AHEAD = 2  # batches read ahead of the one DALI asks for (as DALI's own file reader does)
READ_THREADS = 4  # reads wait on the file system, not the CPU: a few more threads than cores is fine
# Batches are put together (arrays, view parameters) by one thread per process, in the order they are
# read ahead, apart from the reading threads: a batch waits for its reads, which never wait for a batch.
BATCH_THREADS = 1
EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)
_NOTHING = np.empty(0, dtype=np.uint8)  # the bytes of a sample's later view slots (SampleSource)


@dataclass
class DataPass:
    """One pass over data: ``slots`` are the samples whose views fill each slot (whole batches, in order),
    ``reads`` what is read into each slot (known broken samples already refilled)."""

    epoch: int
    slots: np.ndarray
    reads: np.ndarray
    batch_size: int

    def __post_init__(self) -> None:
        self.batches = len(self.slots) // self.batch_size  # the source ends the pass after these

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        at = index * self.batch_size
        return self.slots[at : at + self.batch_size], self.reads[at : at + self.batch_size].copy()


@dataclass
class ReadBatch:
    """A batch put together ahead of DALI's request: what the source hands DALI (None: every sample is
    broken), and the samples found broken on the way ({path: reason}), reported when it is handed."""

    outputs: list[Any] | None
    broken: dict[str, str]


def header_size(image: bytes | str | IO[bytes]) -> tuple[int, int]:
    """Decoded (height, width) of an encoded image (its bytes, path or file), from its header, after
    the EXIF rotation that DALI's decoder applies (orientations 5-8 swap the sides). Raises on an
    unreadable header (:class:`ImageTooLarge` where Pillow will not even open it)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            width, height = opened.size
            turned = opened.format == "JPEG" and opened.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: it names the pixel count only
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found is None:
            raise
        raise ImageTooLarge(int(found.group(1))) from None
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height})")
    return (width, height) if turned else (height, width)


class ImageTooLarge(ValueError):
    """A header whose image Pillow refuses to open (more than twice its decompression-bomb limit)."""

    def __init__(self, pixels: int) -> None:
        super().__init__(f"{pixels} pixels, more than twice Pillow's decompression-bomb limit")
        self.pixels = pixels


def pixels_problem(height: int, width: int, max_pixels: int) -> str | None:
    """Why an image of this decoded size is not decoded at all (None: it is not too large; 0: no
    limit). One such image decoded whole can take gigabytes: an out-of-memory kill hours into a job."""
    if max_pixels and height * width > max_pixels:
        return f"{width}x{height} pixels, more than --max-image-pixels {max_pixels}: not decoded"
    return None


class SampleSource:
    """DALI external source (``batch_info=True``) of a pass's batches: per sample its encoded bytes
    and label; with ``params`` also the view parameters of the batch's slots (each slot keeps its
    own sample's views, drawn at the size of what was read into it), as extra outputs.

    ``params(epoch, slots, sizes)`` returns a tuple of arrays (see :mod:`dali_ba.loading.pipeline`).
    ``sizes`` is the run's (N, 2) cache of decoded sizes (-1: not read yet), shareable between
    loaders of one dataset. ``on_broken({name: reason})`` is told of each new broken sample. With
    ``views_per_sample`` M > 1, each sample fills M consecutive samples of DALI's batch (a graph of a
    view per DALI sample): its bytes in the first (the others empty), its label in each.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        sizes: np.ndarray,
        on_broken: Callable[[dict[str, str]], None],
        params: Callable[[int, np.ndarray, np.ndarray], Sequence[np.ndarray]] | None = None,
        max_pixels: int = 0,
        views_per_sample: int = 1,
    ) -> None:
        self.dataset, self.sizes, self.on_broken, self.params = dataset, sizes, on_broken, params
        self.max_pixels, self.views_per_sample = max_pixels, views_per_sample
        self._labels = np.asarray(dataset.labels)  # the data set's own (int16 or int32): no copy
        self.data_pass: DataPass | None = None
        self._batches: dict[int, Future[ReadBatch]] = {}
        # The training thread's time inside the source (DALI calls it in next()) and the batches it handed.
        self.callback_seconds, self.callback_batches = 0.0, 0

    def start(self, data_pass: DataPass) -> None:
        """Serve ``data_pass`` from its first batch (DALI's iteration counter restarts with each pass)."""
        self.data_pass, self._batches = data_pass, {}

    def stop(self) -> None:
        """End the current pass after the batches already asked for (to drain an abandoned pass):
        until the next :meth:`start`, every request ends the pass."""
        self.data_pass = None

    def _read(self, index: int) -> tuple[bytes, str | None]:
        """A sample's bytes, and why it is broken (None: it is not); fills in its size."""
        try:
            with ACTIVITY.reading(self.dataset.files[index]):  # a read that never returns is a stall
                data = self.dataset.read(int(index))
        except OSError as exc:
            return b"", f"cannot read ({exc.strerror or exc})"
        if self.sizes[index, 0] < 0:
            try:
                self.sizes[index] = header_size(data)
            except ImageTooLarge as exc:
                if self.max_pixels and exc.pixels > self.max_pixels:
                    return data, f"{exc.pixels} pixels, more than --max-image-pixels {self.max_pixels}: not decoded"
                return data, f"unreadable header: {exc}"
            except Exception as exc:
                return data, f"unreadable header: {_reason(exc)}"
        return data, pixels_problem(*self.sizes[index], self.max_pixels)  # type: ignore[call-arg]  # a sizes row is (height, width): mypy cannot count an array's items

    def _read_ahead(self, batch: int) -> None:
        """Start reading ``batch`` of the current pass, and putting it together once read."""
        data_pass = self.data_pass
        assert data_pass is not None  # called from __call__ once it has checked the pass
        if batch < data_pass.batches and batch not in self._batches:
            slots, reads = data_pass.batch(batch)
            pool = _pool(_READ_POOLS, READ_THREADS, "dali-ba-reads")
            results = [pool.submit(self._read, index) for index in reads]
            batches = _pool(_BATCH_POOLS, BATCH_THREADS, "dali-ba-batches")
            self._batches[batch] = batches.submit(self._put_together, data_pass.epoch, slots, reads, results)

    def __call__(self, info: Any) -> list[Any]:
        start = time.perf_counter()
        data_pass, batch = self.data_pass, info.iteration
        if data_pass is None or batch >= data_pass.batches:
            raise StopIteration
        for ahead in range(batch, batch + READ_AHEAD + 1):
            self._read_ahead(ahead)
        ready = self._batches.pop(batch).result()
        if ready.broken:
            self.on_broken(ready.broken)
        if ready.outputs is None:
            path, reason = next(iter(ready.broken.items()))
            raise UnreadableImageError(
                f"every sample of a batch is broken (e.g. {path}: {reason}); check the data with dali-ba check-data"
            )
        self.callback_seconds += time.perf_counter() - start
        self.callback_batches += 1
        return ready.outputs

    def _put_together(
        self, epoch: int, slots: np.ndarray, reads: np.ndarray, results: list[Future[tuple[bytes, str | None]]]
    ) -> ReadBatch:
        """On the batch thread: the batch's encoded samples and labels (each broken sample replaced, in
        ``reads`` too, by the first good sample of the batch), then its view parameters, drawn at the
        sizes of what was read into each slot."""
        read = [result.result() for result in results]
        broken = {self.dataset.files[i]: reason for i, (_, reason) in zip(reads, read) if reason}
        if broken:
            good = [k for k, (_, reason) in enumerate(read) if not reason]
            if not good:
                return ReadBatch(None, broken)
            for k, (_, reason) in enumerate(read):
                if reason:
                    reads[k], read[k] = reads[good[0]], read[good[0]]
        encoded = [np.frombuffer(data, dtype=np.uint8) for data, _ in read]
        labels = [self._labels[i : i + 1].astype(np.int32) for i in reads]
        if self.views_per_sample > 1:
            later = [_NOTHING] * (self.views_per_sample - 1)
            encoded = [slot for data in encoded for slot in (data, *later)]
            labels = [label for label in labels for _ in range(self.views_per_sample)]
        outputs: list[Any] = [encoded, labels]
        if self.params is not None:
            outputs += list(self.params(epoch, slots, self.sizes[reads]))
        return ReadBatch(outputs, broken)


def _reason(exc: Exception) -> str:
    """The first line of an error, without object addresses (Pillow names its ``BytesIO``), so
    that a reason is the same in every run."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", text)[:160]


_READ_POOLS: dict[int, ThreadPoolExecutor] = {}
_BATCH_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(pools: dict[int, ThreadPoolExecutor], threads: int, name: str) -> ThreadPoolExecutor:
    """This process's pool of ``pools``' kind (a forked child makes its own)."""
    pool = pools.get(os.getpid())
    if pool is None:
        pool = pools[os.getpid()] = ThreadPoolExecutor(threads, thread_name_prefix=name)
    return pool


def new_size_cache(dataset: ImageDataset) -> np.ndarray:
    """An empty cache of decoded sizes for ``dataset``: (N, 2) int64, -1 until a sample is read."""
    return np.full((len(dataset), 2), -1, dtype=np.int64)
