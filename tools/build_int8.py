"""Rebuild the int8 graph of a bundled model (src/leukoscope/weights/NAME.int8.onnx) without re-bundling it.

    .venv/bin/python tools/build_int8.py pbc --data ../shared/data/pbc

The same step as the end of tools/bundle_model.py: calibrated on 256 training images of the model's
pinned split (configs/NAME.splits.csv), parity checked on its validation images (at most 0.2 points
of accuracy lost, else nothing is written); the checkpoint and its test metrics are left untouched.
For when the int8 recipe (leukoscope.onnx_backend.quantize_int8) changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from leukoscope.checkpoint import ModelCard, load_checkpoint
from leukoscope.errors import LeukoscopeError
from leukoscope.quantize import int8_path, write_int8

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "leukoscope" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a bundled model: pbc, wbc, aria-all or blast")
    parser.add_argument("--data", type=Path, required=True, help="the folder its pinned split's paths are relative to")
    args = parser.parse_args()
    path = WEIGHTS / f"{args.name}.pt"
    if not path.is_file():
        raise SystemExit(f"no bundled model {args.name!r} at {path}")
    checkpoint = load_checkpoint(path)
    view = ModelCard.from_meta(checkpoint).preprocessing.view
    try:
        parity = write_int8(checkpoint, path, args.data, ROOT / "configs" / f"{args.name}.splits.csv", view)
    except LeukoscopeError as err:
        raise SystemExit(f"no int8 graph for {args.name}: {err}") from None
    print(f"int8 graph {int8_path(path).name}: {int8_path(path).stat().st_size / 1e6:.1f} MB, {parity}")


if __name__ == "__main__":
    main()
