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
from ..io import ImageReadError, load_rgb
from ..progress import progress


def decode_many(
    paths: Sequence[str | os.PathLike], size: int, workers: int | None = None, desc: str | None = None, crop: float = 1.0
) -> tuple[torch.Tensor, list[str | None]]:
    """Return (N, 3, size, size) uint8 and a per-path error message (None when decoded).

    Unreadable images are left black in the tensor; callers drop or report them.
    """
    out = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8)
    errors: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        try:
            out[i] = torch.from_numpy(np.array(load_rgb(paths[i], size, crop=crop))).permute(2, 0, 1)
        except ImageReadError as err:
            errors[i] = str(err)

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        for _ in progress(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="image", disable=desc is None, leave=False, log=True):
            pass
    return out, errors
