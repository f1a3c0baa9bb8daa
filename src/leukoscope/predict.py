"""``leukoscope predict``: prediction rows into a CSV, in one process or sharded across torchrun ranks.

Under ``torchrun --nproc_per_node N [--nnodes M ...] -m leukoscope predict ...`` every rank
predicts every N-th input (its share, in input order) into ``OUT.rank-R.csv`` beside the output;
rank 0 waits for all of them and merges them into one CSV in input order, with the same rows as a
single process, then removes the parts. On a cluster, OUT must be on a filesystem every node sees.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .distributed import World, barrier, close, init_world
from .errors import LeukoscopeError
from .inference import Prediction, Predictor, alarm_cells
from .io import atomic_write, is_stream_output
from .metrics import WBC_TYPES
from .progress import plural, progress

OOD_WARN_SHARE = 0.25  # predict warns when more than this share of a run's images is out of domain


def looks_unlike(outside: int, total: int) -> str | None:
    """The verb of an out-of-domain warning ("looks unlike" for one, "look unlike" for several) where more than
    OOD_WARN_SHARE of ``total`` images or cells are out of domain; None where no warning is due. Shared by
    predict's warning and count's."""
    if outside <= OOD_WARN_SHARE * max(total, 1):
        return None
    return "looks unlike" if outside == 1 else "look unlike"


def out_of_domain_warning(predictor: Predictor, outside: int, predicted: int) -> str | None:
    """The warning ``predict`` prints when more than OOD_WARN_SHARE of the ``predicted`` images are out
    of domain (None otherwise). A white-cell model that takes a fixed central crop points to `wbc`,
    which finds and frames the cell itself: such a model reads cells cropped tightly or at another
    magnification wrongly (docs/benchmarks.md, "Framing": `pbc` 98% -> 39-74% on recut PBC tiles)."""
    if (unlike := looks_unlike(outside, predicted)) is None:
        return None
    text = (f"warning: {outside} of {plural(predicted, 'image')} {unlike} this model's training images "
            "(in_domain false: other cells, or another lab's stain or camera): check its calls on a few labelled ones; "
            "see --adapt, or fine-tune with train --init")
    if predictor.view.cell is None and set(WBC_TYPES) <= set(predictor.class_names):
        text += ("; for white cells framed otherwise than this model's training images (cropped tightly, whole fields, "
                 "another magnification) try the bundled `wbc` model, which finds the cell and frames it at a fixed scale")
    return text


def header(predictor: Predictor) -> list[str]:
    return ["path", "label", "confidence", *(f"p_{c}" for c in predictor.class_names), "ood_score", "in_domain", "localised", "error"]


def row(predictor: Predictor, pred: Prediction) -> list[str]:
    probs = [f"{pred.probabilities[c]:.6f}" if pred.probabilities else "" for c in predictor.class_names]
    confidence = f"{pred.confidence:.6f}" if not pred.error else ""
    return [pred.source, pred.label, confidence, *probs, *alarm_cells(pred), pred.error]


def write_rows(predictor: Predictor, predictions: Iterable[Prediction], out: str | os.PathLike, total: int
               ) -> tuple[list[tuple[str, str]], int]:
    """Write the CSV; returns ((path, error) of each image that failed, images out of domain)."""
    failed, outside = [], 0
    with atomic_write(out, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter(out))
        writer.writerow(header(predictor))
        for pred in progress(predictions, total=total, desc="predict", unit="image"):
            writer.writerow(row(predictor, pred))
            if pred.error:
                failed.append((pred.source, pred.error))
            outside += pred.in_domain is False
    return failed, outside


def delimiter(out: str | os.PathLike) -> str:
    """Tabs for a ``.tsv`` output (as its name promises), commas otherwise."""
    return "\t" if str(out).lower().endswith(".tsv") else ","


def part_path(out: str | os.PathLike, rank: int) -> Path:
    return Path(f"{out}.rank-{rank}.csv")


def predict_csv(predictor: Predictor, paths: Sequence[Path], out: str | os.PathLike, batch_size: int = 64,
                tta: str | None = None, workers: int | None = None) -> tuple[int, list[tuple[str, str]], int]:
    """Predict ``paths`` into the CSV ``out``, sharded when run under torchrun; returns (images, (path, error) of those
    that failed, images out of domain) over all ranks (0, [], 0 on ranks other than 0, which only write their part). ``workers``: decoding
    processes per rank (see Predictor.predict_iter)."""
    world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    if not world.distributed:
        failed, outside = write_rows(predictor, predictor.predict_iter(list(paths), batch_size=batch_size, tta=tta, workers=workers), out, len(paths))
        return len(paths), failed, outside
    if is_stream_output(out):
        raise LeukoscopeError("sharded prediction writes parts beside --out: give a file path, not - or a device")
    world, _ = init_world("cpu")
    try:
        mine = list(paths)[world.rank :: world.size]
        write_rows(predictor, predictor.predict_iter(mine, batch_size=batch_size, tta=tta, workers=workers), part_path(out, world.rank), len(mine))
        print(f"rank {world.rank}/{world.size}: predicted {len(mine)} of {len(paths)} images", flush=True)
        barrier(world)
        if not world.is_main:
            return 0, [], 0
        return merge_parts(out, world.size, len(paths))
    finally:
        close(world)


def merge_parts(out: str | os.PathLike, size: int, total: int) -> tuple[int, list[tuple[str, str]], int]:
    """Interleave the ranks' parts back into input order (input i went to rank i % size)."""
    parts = []
    for rank in range(size):
        with open(part_path(out, rank), newline="", encoding="utf-8") as handle:
            parts.append(list(csv.reader(handle)))
    head, bodies = parts[0][0], [p[1:] for p in parts]
    ordered = [bodies[i % size][i // size] for i in range(total)]
    with atomic_write(out, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter(out))
        writer.writerow(head)
        writer.writerows(ordered)
    for rank in range(size):
        part_path(out, rank).unlink()
    error = head.index("error")
    in_domain = head.index("in_domain")
    return total, [(r[0], r[error]) for r in ordered if r[error]], sum(r[in_domain] == "false" for r in ordered)
