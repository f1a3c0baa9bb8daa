"""Decode images once, in a thread pool, into one uint8 tensor held in memory.

Cell datasets are small (thousands of images) and every epoch re-reads them, so decoding once
at the training resolution removes JPEG/BMP decoding from the training loop entirely.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ..io import ImageReadError, View, load_view
from ..progress import progress


def decode_many(
    paths: Sequence[str | os.PathLike], view: View | int, workers: int | None = None, desc: str | None = None,
) -> tuple[torch.Tensor, list[str | None]]:
    """Return (N, 3, S, S) uint8 of each image as ``view`` shows it (an int: the whole image at that
    size) and a per-path error message (None when decoded).

    Unreadable images are left black in the tensor; callers drop or report them.
    """
    view = View(view) if isinstance(view, int) else view
    out = torch.zeros((len(paths), 3, view.size, view.size), dtype=torch.uint8)
    errors: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        try:
            out[i] = torch.from_numpy(np.array(load_view(paths[i], view)[0])).permute(2, 0, 1)
        except ImageReadError as err:
            errors[i] = str(err)

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        for _ in progress(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="image", disable=desc is None, leave=False, log=True):
            pass
    return out, errors
