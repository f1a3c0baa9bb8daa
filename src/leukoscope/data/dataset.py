"""Decode images once, in parallel, into one uint8 tensor held in memory.

Cell datasets are small (thousands of images) and every epoch re-reads them, so decoding once
at the training resolution removes JPEG/BMP decoding from the training loop entirely.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..decoding import Decoder
from ..images import View
from ..progress import progress

CHUNK = 64  # files per submitted piece of work


def decode_many(paths: Sequence[str | os.PathLike], view: View | int, desc: str | None = None,
                workers: int | None = None, recoloured: list[bool] | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """Return (N, 3, S, S) uint8 of each image as ``view`` shows it (an int: the whole image at that
    size) and a per-path error message (None when decoded). Decoded in parallel (``decoding.Decoder``:
    worker processes for long runs; ``workers``: how many, see ``decoding.worker_processes``).

    Unreadable images are left black in the tensor; callers drop or report them. ``recoloured``, if
    given, gets whether each image was recoloured to look like a slide (see ``images.frame``).
    """
    view = View(view) if isinstance(view, int) else view
    out = torch.zeros((len(paths), 3, view.size, view.size), dtype=torch.uint8)
    target = out.numpy()  # the same memory; numpy copies one image single-threaded, where torch's parallel copy woke
    errors: list[str | None] = [None] * len(paths)  # OpenMP threads that spun on the cores the decoding processes needed
    with Decoder(view, len(paths), workers=workers) as decoder:
        pending = [decoder.submit(paths[i : i + CHUNK]) for i in range(0, len(paths), CHUNK)]
        decoded = (item for futures in pending for item in decoder.results(futures))
        for i, (image, error, _, was_recoloured) in enumerate(progress(decoded, total=len(paths), desc=desc, unit="image", disable=desc is None,
                                                       leave=False, log=True)):
            if recoloured is not None:
                recoloured.append(was_recoloured)
            if image is None:
                errors[i] = error
            else:
                target[i] = image.transpose(2, 0, 1)
    return out, errors
