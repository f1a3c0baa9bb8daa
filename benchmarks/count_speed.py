"""`leukoscope count` on real fields: what it finds on BCCD, and seconds per field at 1712x1368 and 2592x1944.

Detection and naming: on the BCCD fields the model never saw (each labelled with the type of
its white cell), the share of fields where a white cell is found, where exactly one is, and where
the labelled type is among the detected cells' calls.
Speed: fields of those sizes are made from real BCCD fields: a 2x2 mosaic of four fields (four
or more white cells), resized to the target size and saved as JPEG (quality 90), as a camera
writes them. Writes the COUNT-SPEED block of docs/benchmarks.md.

Usage: python benchmarks/count_speed.py [--model wbc] [--fields 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import share, write_block  # noqa: E402

from leukoscope.counting import iter_counts  # noqa: E402
from leukoscope.data import detect_layout  # noqa: E402
from leukoscope.data.splits import unseen_samples  # noqa: E402
from leukoscope.inference import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bccd_wbc"
SIZES = [(1712, 1368), (2592, 1944)]


def mosaics(folder: Path, n: int, size: tuple[int, int], out: Path) -> list[Path]:
    paths = sorted(folder.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    made = []
    for i in range(n):
        tiles = [np.asarray(Image.open(paths[j]).convert("RGB")) for j in rng.choice(len(paths), 4, replace=False)]
        mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        path = out / f"field_{size[0]}_{i}.jpg"
        Image.fromarray(mosaic).resize(size, Image.BILINEAR).save(path, quality=90)
        made.append(path)
    return made


def detection_lines(predictor) -> list[str]:
    dataset = detect_layout(DATA)
    unseen = unseen_samples(dataset, predictor.checkpoint.get("seen_images"))
    pairs = [(s.label, dataset.abspath(s)) for s in unseen]
    found = one = named = 0
    for (label, _), (_, cells, _, _) in zip(pairs, iter_counts(predictor, pairs)):
        found += bool(cells)
        one += len(cells) == 1
        named += label in {c.label for c in cells}
    n = len(pairs)
    return [f"On the {n} BCCD fields the model never saw (95% Wilson intervals): a white cell found in {share(found, n)}, exactly one "
            f"in {share(one, n)} (some fields hold a second white cell), the labelled type among the calls in {share(named, n)}.", ""]


def blast_mosaic_lines(model: str = "blast", side: int = 2) -> list[str]:
    """ALL-IDB2 cells the blast model never saw, tiled side x side into fields: is each tile's own
    (centred) cell found in its own box, and called right? A proxy for annotated fields: the tiles
    are crops of ALL-IDB1 fields, neighbours cut at the tile edges included."""
    folder = DATA.parent / "all_idb2"
    predictor = load_model(model)
    dataset = detect_layout(folder)
    unseen = unseen_samples(dataset, predictor.checkpoint.get("seen_images"))
    tiles = [(s.label, np.asarray(Image.open(dataset.abspath(s)).convert("RGB").resize((257, 257)))) for s in unseen]
    own = right = fields = verdicts = 0
    for start in range(0, len(tiles) - side * side + 1, side * side):
        group = tiles[start : start + side * side]
        mosaic = np.concatenate([np.concatenate([t for _, t in group[r * side : (r + 1) * side]], 1) for r in range(side)], 0)
        _, cells, _, _ = next(iter_counts(predictor, [("mosaic", _as_path(mosaic))]))
        fields += 1
        called_blast = False
        for i, (label, _) in enumerate(group):
            cy, cx = (i // side + 0.5) * 257, (i % side + 0.5) * 257
            inside = [c for c in cells if c.x0 <= cx <= c.x1 and c.y0 <= cy <= c.y1]
            mine = [c for c in inside if abs((c.x0 + c.x1) / 2 - cx) < 64 and abs((c.y0 + c.y1) / 2 - cy) < 64]
            own += len(mine) == 1
            right += len(mine) == 1 and mine[0].label == label
        called_blast = any(c.label == "blast" for c in cells)
        verdicts += called_blast == any(label == "blast" for label, _ in group)
    n = fields * side * side
    return [f"`{model}` on {fields} fields tiled {side}x{side} from the {len(tiles)} ALL-IDB2 cells it never saw (its test split): "
            f"the tile's own cell alone in one detected box {share(own, n)}, and called right {share(right, n)}; "
            f"the field's verdict (any blast or none) right on {verdicts} of {fields}.", ""]


_TMP = Path(tempfile.mkdtemp(prefix="leukoscope-count-"))


def _as_path(image: np.ndarray) -> Path:
    path = _TMP / "mosaic.png"
    Image.fromarray(image).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wbc")
    parser.add_argument("--fields", type=int, default=8)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"count_speed: needs {DATA}")
    predictor = load_model(args.model)
    lines = detection_lines(predictor) + blast_mosaic_lines() + [f"Model `{args.model}`, {torch.get_num_threads()} threads; median (max) seconds per field over {args.fields} fields, "
             "after one warm-up field. Each field is a JPEG mosaic of four real BCCD fields.", "",
             "| field | cells per field | seconds per field |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            paths = mosaics(DATA, args.fields + 1, size, Path(tmp))
            pairs = [("bench", p) for p in paths]
            seconds, cells = [], []
            for k, pair in enumerate(pairs):
                start = time.perf_counter()
                _, found, _, _ = next(iter_counts(predictor, [pair]))
                if k:  # the first field warms up the model and the thread pools
                    seconds.append(time.perf_counter() - start)
                    cells.append(len(found))
            lines.append(f"| {size[0]}x{size[1]} | {statistics.median(cells):.0f} | {statistics.median(seconds):.3f} ({max(seconds):.3f}) |")
            print(lines[-1], flush=True)
    write_block("COUNT-SPEED", "\n".join(lines))


if __name__ == "__main__":
    main()
