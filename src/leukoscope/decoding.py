"""Decoding and framing many image files in parallel: worker processes where framing holds the GIL.

Framing a cell-centric view (``localise.find_cell``: many small numpy and scipy calls) holds
Python's GIL, so threads barely overlap it: on 2 cores, 2 threads decoded and framed PBC tiles at
738 images/s against 552 for one, 2 processes at 1,131 (docs/benchmarks.md, "Decoding in worker
processes"). Runs of at least PROCESS_MIN files with a cell-centric view on Linux therefore decode
in forked worker processes (they start in milliseconds with the modules already loaded); short
runs, other systems and a single core use threads. Same pixels either way.

Given ``infer`` (a function that builds, in each worker, a network taking a (N, S, S, 3) uint8
batch), the workers also run the network on what they decoded and send back its outputs instead
of the images: one process per core doing everything, rather than the workers and the parent's
network threads taking turns on the same cores (`predict wbc` and `predict pbc`: about +10%
images/s). Central crops then decode in processes too; with the network in the parent, threads
were faster for them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
from PIL import Image

from .images import ImageReadError, View, frame, in_srgb, load_view, to_rgb, to_uint8
from .progress import note
from .runtime import usable_cores

PROCESS_MIN = 256  # fewer files than this decode in threads (a process pool costs ~30 ms to start)
THREADS = 4

Decoded = tuple[np.ndarray | None, str, bool | None, bool]  # (image as the view shows it, error, whether the cell was located, recoloured: see images.frame)
Outputs = tuple[np.ndarray, ...]  # a network's outputs for a batch, one row per image
Infer = Callable[[np.ndarray], Outputs]


def decode_item(item: Any, view: View) -> Decoded:
    """A file path, upload bytes, PIL image or image array (see array_to_rgb) as ``view`` shows it; one framing for
    every kind of input (see ``images.frame``). An unreadable one gives (None, its error, None, False)."""
    try:
        if isinstance(item, Image.Image):  # opened from a file with a colour profile: as that file would be read
            image, found, recoloured = frame(np.asarray(to_rgb(in_srgb(item, item.info.get("icc_profile")))), view)
        elif isinstance(item, np.ndarray):
            image, found, recoloured = frame(array_to_rgb(item), view)
        else:
            image, found, recoloured = load_view(item, view)
        return image, "", found, recoloured
    except (ImageReadError, ValueError) as err:
        return None, str(err), None, False


def load_views(items: Sequence[Any], view: View) -> list[Decoded]:
    return [decode_item(item, view) for item in items]


_infer: Infer | None = None  # the network of this worker process (set by _start_worker)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_worker(parent: int, make_infer: Callable[[], Infer] | None) -> None:
    """In each worker process, first: end with the parent, however it ends. A SIGTERM ends the worker at once (the
    parent's handler, which fork copies, would raise inside the pool's protocol), and the kernel sends one when the
    parent dies (kill -9, the OOM killer), which would otherwise leave the worker waiting on the pool's queue forever,
    holding its memory. Then the worker's network, if it runs one (``make_infer``)."""
    global _infer
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux's C library: the parent's own handler still ends the pool on SIGTERM
        pass
    if os.getppid() != parent:  # the parent died between the fork and the prctl
        os._exit(1)
    if make_infer is not None:
        _infer = make_infer()


def load_and_infer(items: Sequence[Any], view: View) -> tuple[list[Decoded], Outputs | None]:
    """In a worker: ``items`` decoded and framed, and the worker's network run on those that decoded
    (None if none did); the images themselves stay here (their ``Decoded`` image is None)."""
    if _infer is None:
        raise RuntimeError("load_and_infer runs in a Decoder's worker process, started with infer")
    decoded = load_views(items, view)
    good = [image for image, *_ in decoded if image is not None]
    outputs = _infer(np.stack(good)) if good else None
    return [(None, *rest) for _, *rest in decoded], outputs


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """An image array as 8-bit RGB: HxW, HxWx1, HxWx3 or HxWx4, or channels first (3xHxW, as torchvision
    holds images); uint8 as it is, other integers and floats by ``images.to_uint8`` (floats up to 1.0 as
    fractions of white, a 12-bit camera's integers by their 12-bit range). Negative or non-finite
    values (a normalised tensor, not pixels) and booleans are refused with the reason."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iuf":
            raise ValueError(f"expected an image array of numbers, got {array.dtype}")
        if array.size and not (np.isfinite(array).all() and array.min() >= 0):
            raise ValueError("image array has negative or non-finite values: pass the pixels (0-255, or 0-1 as floats), "
                             "not a normalised tensor")
        alpha = array[:, :, 3:]
        array = to_uint8(array[:, :, :3]) if not alpha.size else np.dstack([to_uint8(array[:, :, :3]), to_uint8(alpha)])
    return np.asarray(to_rgb(Image.fromarray(array)))


MAX_WORKERS_PER_CORE = 4  # decoding processes per core at most: more only share the cores and hold memory


def worker_processes(files: int, view: View, infer: bool = False, workers: int | None = None) -> int:
    """How many decoding processes a run of ``files`` files gets (0: use threads): ``workers``, or by
    default one per core. Cell-centric views, and central crops only where the workers also run the
    network (``infer``): a central crop frames without holding the GIL for long, so with the network
    in the parent threads were faster (`pbc`: 1,202 vs 1,063 images/s end to end in int8), and with
    the network in the workers processes are. Fewer than 2 means none (one would only make the
    parent wait). At most MAX_WORKERS_PER_CORE per core: each holds about 40 MB, and ``--workers 10000`` forked
    10,000 of them."""
    if workers is None:
        workers = usable_cores()
        workers //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: the ranks of one machine share its cores
    wanted = view.cell is not None or infer
    if not (wanted and files >= PROCESS_MIN and workers >= 2 and sys.platform == "linux"):
        return 0
    cores = usable_cores()
    if workers > (most := MAX_WORKERS_PER_CORE * cores):
        note(f"note: --workers {workers} is more than {MAX_WORKERS_PER_CORE} per core on this machine's {cores}: "
             f"decoding in {most} processes")
    return min(workers, most)


class Decoder:
    """Submit lists of items (see decode_item), get their ``Decoded`` tuples back in order; a context manager.
    ``files``: how many files the run decodes (0 for images in memory: threads). ``processes``: that many
    worker processes regardless (0: threads); else ``worker_processes`` decides, from ``workers`` (the
    user's request) or the cores. ``infer``: where the run uses processes, each builds its network by
    calling it once, and ``results`` then returns ``(decoded, outputs)`` pairs (see ``load_and_infer``;
    ``self.infers`` says which)."""

    def __init__(self, view: View, files: int, processes: int | None = None, infer: Callable[[], Infer] | None = None,
                 workers: int | None = None):
        self.view = view
        self.processes = worker_processes(files, view, infer is not None, workers) if processes is None else processes
        self.infers = bool(self.processes and infer is not None)
        self.pool: Executor = (ProcessPoolExecutor(self.processes, mp_context=get_context("fork"), initializer=_start_worker,
                                                   initargs=(os.getpid(), infer if self.infers else None)) if self.processes
                               else ThreadPoolExecutor(THREADS))

    def submit(self, paths: Sequence[Any]) -> list[Future]:
        """Start decoding ``paths``: in pieces, so that every worker has a share (one piece each when
        the workers also run the network, which is faster on larger batches)."""
        pieces = self.processes if self.infers else 2 * max(self.processes, THREADS)
        step = max(1, -(-len(paths) // pieces))
        task = load_and_infer if self.infers else load_views
        return [self.pool.submit(task, list(paths[i : i + step]), self.view) for i in range(0, len(paths), step)]

    def results(self, futures: list[Future]) -> list[Decoded] | list[tuple[list[Decoded], Outputs | None]]:
        if self.infers:
            return [future.result() for future in futures]
        return [item for future in futures for item in future.result()]

    def __enter__(self) -> Decoder:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
