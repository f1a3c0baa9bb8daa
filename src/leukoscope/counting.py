"""From smear fields to a differential count: find every white cell, classify it, roll up per image and slide.

Detection is ``localise.find_cells`` (nucleus stain score, touching nuclei split by a watershed on
the distance transform). Each cell is classified in a window centred on it, as the model's own
preprocessing frames a cell: the window of a cell-centric model (``cell`` in its card), or, for
a model trained on centred single-cell tiles, a window in which the nucleus fills DEFAULT_FILL of
it (about what a CellaVision or ALL-IDB2 tile shows). Cells are located on a reduced copy of the
field (~200 px on its shorter side; the nucleus mask needs no more) and cut from the full image,
so a 2592x1944 field costs little more than a 640x480 one.

Cells called ``platelet`` are listed but left out of the differential (they are not white cells).
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .checkpoint import bundled_models
from .classes import parse_classes, restrict_classes
from .errors import LeukoscopeError
from .images import (
    MAX_PIXELS,
    ImageReadError,
    View,
    decode_bytes,
    image_size,
    load_rgb,
)
from .inference import Predictor, given_inputs, load_model, note_inputs
from .io import (
    atomic_write,
    iter_image_files,
    missing_inputs,
    once_each,
    output_name,
)
from .localise import Cell, as_slide, crop_square, find_cells
from .progress import progress
from .stain import apply as normalise_colour
from .stain import colourless

DEFAULT_FILL = 0.6  # a crop-mode model sees a cell whose nucleus spans about this fraction of its tile
NOT_COUNTED = ("platelet",)  # detections with these labels are not white cells: listed, not counted
BOX_SCALE = 1.3  # the reported box spans the cell: its nucleus's diameter times this
GRAYSCALE = "a grayscale image: white cells are found and typed by the colours of their stain; not counted"
CELL_COLUMNS = ["slide", "image", "cell", "x0", "y0", "x1", "y1", "area", "label", "confidence", "ood_score", "in_domain", "edge", "error"]


@dataclass
class CountedCell:
    """One detected cell of one image (or, with ``error``, a file that could not be read)."""

    slide: str
    image: str
    cell: int = 0
    x0: int = 0
    y0: int = 0
    x1: int = 0
    y1: int = 0
    area: int = 0
    label: str = ""
    confidence: float = float("nan")
    ood_score: float = float("nan")
    in_domain: bool | None = None  # as predict's column: None where the model has no out-of-domain alarm
    edge: bool = False
    error: str = ""

    def row(self) -> list[Any]:
        if self.error:
            return [self.slide, self.image, *[""] * (len(CELL_COLUMNS) - 3), self.error]
        ood = "" if np.isnan(self.ood_score) else f"{self.ood_score:.3f}"
        in_domain = "" if self.in_domain is None else str(self.in_domain).lower()
        return [self.slide, self.image, self.cell, self.x0, self.y0, self.x1, self.y1, self.area, self.label, f"{self.confidence:.4f}", ood,
                in_domain, str(self.edge).lower(), ""]


def cell_view(predictor: Predictor) -> View:
    """The model's view, cell-centric: its own fill where it has one, DEFAULT_FILL otherwise."""
    view = predictor.view
    return view if view.cell is not None else replace(view, cell=DEFAULT_FILL)


def cell_windows(rgb: np.ndarray, cells: Sequence[Cell], view: View) -> list[np.ndarray]:
    """Each cell as the model sees it: a window centred on it, its nucleus filling ``view.cell``, colour-normalised."""
    windows = []
    for cell in cells:
        window = crop_square(rgb, cell.y, cell.x, cell.diameter / view.cell, view.size)
        windows.append(normalise_colour(window, view.colour, view.stain))
    return windows


def box(cell: Cell, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    half = cell.diameter * BOX_SCALE / 2
    h, w = shape[:2]
    return (max(0, int(cell.x - half)), max(0, int(cell.y - half)), min(w, int(np.ceil(cell.x + half))), min(h, int(np.ceil(cell.y + half))))


def count_image(predictor: Predictor, rgb: np.ndarray, slide: str = "", image: str = "") -> tuple[list[CountedCell], list[np.ndarray]]:
    """Detect and classify every white cell of one decoded field (H, W, 3 uint8); returns the cells
    and each one's window as the model saw it. A cell segmented onto black is put on a plain
    background first, and a yellow cast outside the model's training range corrected, as every
    cell-centric view does (``localise.as_slide``)."""
    rgb, painted, corrected = as_slide(rgb, predictor.view.cast)  # as the model's own view does (localise.cell_window)
    cells = find_cells(rgb)
    if not cells:
        return [], []
    windows = cell_windows(rgb, cells, cell_view(predictor))
    predictions = predictor.predict_arrays(windows, [image] * len(cells))
    out = []
    for i, (cell, pred) in enumerate(zip(cells, predictions), start=1):
        predictor.mark_recoloured(pred, painted is not None or corrected)  # as predict marks a recoloured image
        out.append(CountedCell(slide, image, i, *box(cell, rgb.shape), cell.area, pred.label, pred.confidence, pred.ood_score,
                               pred.in_domain, cell.edge))
    return out, windows


def slides_of(inputs: Sequence[str | os.PathLike], group_by: str = "input") -> list[tuple[str, Path]]:
    """(slide, image path) for every image: a folder given is one slide (``group_by='parent'``: each
    image's own folder is its slide); a file given is a slide of its own folder."""
    if group_by not in ("input", "parent"):
        raise LeukoscopeError(f"--group-by must be input or parent, got {group_by!r}")
    found, skipped = [], Counter()
    for item in given_inputs(inputs):
        path = Path(item)
        for image in iter_image_files([path], skipped):
            slide = image.parent if group_by == "parent" or not path.is_dir() else path
            found.append((slide.name or slide.resolve().name or str(slide), image))  # `count f.png`: its folder's name, not "."
    pairs, repeated = once_each(found, lambda pair: pair[1])  # a folder and its file, or one folder twice: a field counts once
    note_inputs([path for _, path in pairs], repeated, skipped, "counted")
    return pairs


def count(paths: str | os.PathLike | Iterable[str | os.PathLike], model: str | os.PathLike | Predictor = "wbc",
          group_by: str = "input") -> list[CountedCell]:
    """Per-cell records of every image in ``paths`` (files and folders); an unreadable, too large or grayscale file gives one record with ``error``."""
    predictor = model if isinstance(model, Predictor) else load_model(model)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [cell for _, cells, _, _ in iter_counts(predictor, slides_of(paths, group_by)) for cell in cells]


Counted = tuple[np.ndarray | None, list[CountedCell], list[np.ndarray], float]  # see count_source


def iter_counts(predictor: Predictor, pairs: Sequence[tuple[str, Path]], desc: str | None = None) -> Iterator[Counted]:
    """``count_source`` of each image, in order."""
    for slide, path in progress(pairs, total=len(pairs), desc=desc, unit="field", disable=desc is None):
        yield count_source(predictor, path, slide, str(path))


def count_source(predictor: Predictor, source: Path | bytes, slide: str, name: str, max_pixels: int = MAX_PIXELS) -> Counted:
    """One field, a file or an upload's bytes: (its decoded image, None where it was not counted; its cells in the
    file's pixels; their windows; the file's pixels per decoded pixel). A field that cannot be read or counted
    (unreadable, too large, grayscale) is one record with ``error``."""
    try:
        rgb = decode_bytes(source, None, max_pixels) if isinstance(source, bytes) else load_rgb(source)
    except ImageReadError as err:
        return None, [CountedCell(slide, name, error=str(err))], [], 1.0
    cells, windows = count_field(predictor, rgb, slide, name)
    if cells and cells[0].error:
        return None, cells, [], 1.0
    scale = file_pixels(io.BytesIO(source) if isinstance(source, bytes) else source, rgb)
    return rgb, in_file_pixels(cells, scale), windows, scale


def file_pixels(path: Path | BinaryIO, rgb: np.ndarray) -> float:
    """The file's pixels per decoded pixel: 1, or about 2, 4 or 8 for a JPEG too large to decode whole
    (images.jpeg_reduction); ``path`` may be an upload's bytes as a file object."""
    return max(image_size(path)) / max(rgb.shape[:2])  # sides compared largest to largest: an EXIF rotation swaps them


def in_file_pixels(cells: list[CountedCell], scale: float) -> list[CountedCell]:
    """Boxes and areas in the file's pixels, for cells found in an image decoded at 1/``scale``."""
    if scale == 1:
        return cells
    return [c if c.error else replace(c, x0=round(c.x0 * scale), y0=round(c.y0 * scale), x1=round(c.x1 * scale),
                                      y1=round(c.y1 * scale), area=round(c.area * scale * scale)) for c in cells]


def count_field(predictor: Predictor, rgb: np.ndarray, slide: str = "", image: str = "") -> tuple[list[CountedCell], list[np.ndarray]]:
    """``count_image``, or one record with ``error`` for a field that cannot be counted: a grayscale one, in which
    find_cells would find no cell, is not a field "with 0 cells"."""
    if predictor.unfamiliar(colourless(rgb)):
        return [CountedCell(slide, image, error=GRAYSCALE)], []
    return count_image(predictor, rgb, slide, image)


def summarise(cells: Sequence[CountedCell], images: Sequence[tuple[str, str]], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per image, one TOTAL row per slide, and (several slides) an overall TOTAL row."""
    counted = [c for c in class_names if c not in NOT_COUNTED]

    def row(slide: str, image: str, members: list[CountedCell]) -> dict[str, Any]:
        labels = Counter(c.label for c in members if not c.error)
        n = sum(labels[c] for c in counted)
        out: dict[str, Any] = {"slide": slide, "image": image, "n_cells": n, "n_edge": sum(c.edge for c in members if not c.error),
                               "n_out_of_domain": sum(c.in_domain is False for c in members if not c.error and c.label in counted)}
        out.update({f"n_{c}": labels[c] for c in class_names})
        out.update({f"pct_{c}": round(100 * labels[c] / n, 2) if n else 0.0 for c in counted})
        if "blast" in class_names:
            out["blast_percent"] = out["pct_blast"]
        failed = [c.error for c in members if c.error]  # an unreadable image is not a field without cells
        out["error"] = (failed[0] if image != "TOTAL" else f"{len(failed)} image{'s' * (len(failed) > 1)} not counted (unreadable, too large or grayscale)") if failed else ""
        return out

    by_image: dict[tuple[str, str], list[CountedCell]] = {key: [] for key in images}
    for cell in cells:
        by_image.setdefault((cell.slide, cell.image), []).append(cell)
    rows = [row(slide, image, members) for (slide, image), members in by_image.items()]
    slides = list(dict.fromkeys(slide for slide, _ in images))
    for slide in slides:
        rows.append(row(slide, "TOTAL", [c for c in cells if c.slide == slide]))
    if len(slides) > 1:
        rows.append(row("ALL", "TOTAL", list(cells)))
    return rows


def write_cells(path: Path, cells: Iterable[CountedCell]) -> None:
    with atomic_write(path, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CELL_COLUMNS)
        writer.writerows(c.row() for c in cells)


def write_summary(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_write(path, newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def as_dicts(cells: Sequence[CountedCell]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(c).items()} for c in cells]


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MAX_OVERLAY_SIDE = 1600  # overlays of larger fields are scaled down


def colours(class_names: Sequence[str]) -> dict[str, str]:
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(class_names)}


def overlay(rgb: np.ndarray, cells: Sequence[CountedCell], class_names: Sequence[str], file_pixels: float = 1.0) -> np.ndarray:
    """The field with each cell's box in its class colour and its label (dashed-looking thin box for edge cells);
    ``file_pixels``: how many of the boxes' pixels one pixel of ``rgb`` spans (a JPEG decoded at reduced size)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(rgb)
    shrink = min(1.0, MAX_OVERLAY_SIDE / max(image.size))
    if shrink < 1:
        image = image.resize((round(image.width * shrink), round(image.height * shrink)), Image.BILINEAR)
    scale = shrink / file_pixels  # from the boxes' pixels to the overlay's
    draw = ImageDraw.Draw(image)
    palette = colours(class_names)
    width = max(2, round(max(image.size) / 300))
    for c in cells:
        if c.error:
            continue
        xy = [c.x0 * scale, c.y0 * scale, c.x1 * scale - 1, c.y1 * scale - 1]
        draw.rectangle(xy, outline=palette.get(c.label, "#000000"), width=1 if c.edge else width)
        text = f"{c.cell} {c.label} {c.confidence:.2f}"
        draw.rectangle([xy[0], max(0, xy[1] - 12), xy[0] + 6 * len(text) + 4, max(12, xy[1])], fill=palette.get(c.label, "#000000"))
        draw.text((xy[0] + 2, max(0, xy[1] - 12)), text, fill="#ffffff")
    return np.asarray(image)


def plot_differential(row: dict[str, Any], class_names: Sequence[str], path: Path) -> None:
    from matplotlib.figure import Figure

    from .report import save_figure

    counted = [c for c in class_names if f"pct_{c}" in row]
    fig = Figure(figsize=(max(4.0, 0.8 * len(counted) + 1.5), 3.2))
    ax = fig.subplots()
    palette = colours(class_names)
    bars = ax.bar(counted, [row[f"pct_{c}"] for c in counted], color=[palette[c] for c in counted])
    ax.bar_label(bars, labels=[str(row[f"n_{c}"]) for c in counted], fontsize=8)
    ax.set(ylabel="% of counted cells", title=f"{row['slide']}: {row['n_cells']} cells")
    ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path)


def write_report(out: Path, summary: Sequence[dict[str, Any]], gallery: dict[str, list[np.ndarray]], class_names: Sequence[str],
                 model: str, failed: Sequence[CountedCell]) -> Path:
    """report.html: the slide totals, their differential as bars, the per-image table and a gallery per class."""
    import base64
    import html

    from .images import png_bytes
    from .report import STYLE, _img, _table

    totals = [r for r in summary if r["image"] == "TOTAL"]
    charts = ""
    for i, row in enumerate(totals):
        plot_differential(row, class_names, out / f"differential_{i}.png")
        charts += _img(out / f"differential_{i}.png")
    columns = list(summary[0])
    table = _table(columns, [[r[k] for k in columns] for r in summary])
    cells = ""
    for label, windows in gallery.items():
        images = "".join(f'<img alt="{html.escape(label)}" src="data:image/png;base64,{base64.b64encode(png_bytes(w)).decode()}">' for w in windows)
        cells += f"<h3>{html.escape(label)}</h3><div class=\"gallery\">{images}</div>"
    errors = "".join(f"<li><code>{html.escape(c.image)}</code>: {html.escape(c.error)}</li>" for c in failed)
    overall = totals[-1]
    headline = f"{overall['n_cells']} white cells counted" + (f", blast percentage {overall['blast_percent']:.1f}%" if "blast_percent" in overall else "")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Leukoscope count</title><style>{STYLE}</style></head><body>"
            f"<h1>Differential count</h1><p>Model <code>{html.escape(model)}</code>. {html.escape(headline)}. Cells called "
            f"{', '.join(NOT_COUNTED)} are listed in cells.csv but not counted; cells cut by the image border are counted and flagged "
            f"(n_edge). A research tool, not a diagnosis.</p><h2>Differential per slide</h2>{charts}<h2>Counts</h2>{table}"
            + (f"<h2>Unreadable files</h2><ul>{errors}</ul>" if errors else "")
            + f"<h2>Cells per class (as the model saw them)</h2>{cells}</body></html>")
    with atomic_write(out / "report.html", encoding="utf-8") as handle:
        handle.write(page)
    return out / "report.html"


GALLERY_SIZE = 12  # cells shown per class in the report


def count_command(inputs: Sequence[str], model: str, out: str | os.PathLike, group_by: str = "input",
                  classes: str | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``leukoscope count``: cells.csv, summary.csv, overlays/, report.html in ``out``; returns (summary rows, (image, error)
    of each image not counted).
    ``classes`` ("A,B,..."): every cell is called among those of the model's classes only (``restrict_classes``)."""
    from PIL import Image

    missing = missing_inputs(inputs)
    if missing and missing[0].lower() in bundled_models():  # `count wbc FOLDER`, as predict is called
        name = missing[0].lower()
        raise LeukoscopeError(f"{missing[0]!r} is not a file or folder; to count with the bundled model {name!r}, use --model {name}")
    pairs = slides_of(inputs, group_by)
    predictor = load_model(model)
    if classes:
        predictor = restrict_classes(predictor, parse_classes(classes, predictor.class_names))
    if not pairs:
        raise LeukoscopeError(f"no image files found in {', '.join(map(str, inputs))}")
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    cells: list[CountedCell] = []
    gallery: dict[str, list[np.ndarray]] = {}
    used: set[str] = set()
    for (slide, path), (rgb, found, windows, scale) in zip(pairs, iter_counts(predictor, pairs, desc="count")):
        cells.extend(found)
        if rgb is None:
            continue
        name = output_name(f"{slide}_{path.stem}" if group_by == "parent" else path.stem, used)
        Image.fromarray(overlay(rgb, found, predictor.class_names, scale)).save(out / "overlays" / f"{name}.png")
        for c, window in zip(found, windows):
            if len(gallery.setdefault(c.label, [])) < GALLERY_SIZE:
                gallery[c.label].append(window)
    summary = summarise(cells, [(slide, str(path)) for slide, path in pairs], predictor.class_names)
    write_cells(out / "cells.csv", cells)
    write_summary(out / "summary.csv", summary)
    failed = [c for c in cells if c.error]
    write_report(out, summary, dict(sorted(gallery.items())), predictor.class_names, predictor.source, failed)
    return summary, [(c.image, c.error) for c in failed]

