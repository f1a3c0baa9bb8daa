"""Refit the out-of-distribution alarm of a bundled model (src/leukoscope/weights/NAME.pt) without retraining it.

    .venv/bin/python tools/refit_ood.py wbc --data runs/data/wbc

The same step as the end of `leukoscope train` (leukoscope.ood.fit_ood: the training images of the
model's pinned split, configs/NAME.splits.csv, decoded as the model sees them; scales and threshold
from its validation images), then the int8 graph is rebuilt (as tools/build_int8.py); the card is
taken again from configs/NAME.card.yaml and docs/models/NAME.md rewritten. The weights, the
calibration and the test metrics stored in the checkpoint are left as they are. For when the
alarm's recipe changes; `make models`, which retrains, fits the alarm the same way.

    .venv/bin/python tools/refit_ood.py wbc --data runs/data/wbc --card-only

leaves the alarm as it is and only takes the card again (a corrected sentence of configs/NAME.card.yaml);
the int8 graph is rebuilt all the same, since it names the checkpoint's bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from leukoscope.card import model_card
from leukoscope.checkpoint import (
    ModelCard,
    Preprocessing,
    class_index,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from leukoscope.data.dataset import decode_many
from leukoscope.data.splits import read_splits
from leukoscope.errors import LeukoscopeError
from leukoscope.ood import fit_ood
from leukoscope.quantize import int8_path, write_int8

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "leukoscope" / "weights"
CONFIGS, DOCS = ROOT / "configs", ROOT / "docs" / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a bundled model: pbc, wbc, aria-all or blast")
    parser.add_argument("--data", type=Path, required=True, help="the folder its pinned split's paths are relative to")
    parser.add_argument("--out", type=Path, help="write the checkpoint here instead of over the bundled one")
    parser.add_argument("--card-only", action="store_true", help="keep the alarm; only take the card again")
    args = parser.parse_args()
    path = WEIGHTS / f"{args.name}.pt"
    if not path.is_file():
        raise SystemExit(f"no bundled model {args.name!r} at {path}")
    checkpoint = load_checkpoint(path)
    pre = ModelCard.from_meta(checkpoint).preprocessing
    if not args.card_only:
        refit_alarm(checkpoint, args.data, CONFIGS / f"{args.name}.splits.csv", pre)
    card_file = CONFIGS / f"{args.name}.card.yaml"  # its text describes the alarm
    checkpoint["card"] = yaml.safe_load(card_file.read_text()) if card_file.is_file() else checkpoint.get("card", {})
    out = args.out or path
    save_checkpoint(out, checkpoint)
    if out == path:
        (DOCS / f"{args.name}.md").write_text(model_card(args.name, checkpoint))
    print(f"{out}: {'card taken again' if args.card_only else 'alarm refitted'}, threshold {checkpoint['ood_threshold']:.3f}")
    try:
        parity = write_int8(checkpoint, out, args.data, CONFIGS / f"{args.name}.splits.csv", pre.view)
    except LeukoscopeError as err:
        raise SystemExit(f"no int8 graph for {args.name}: {err}") from None
    print(f"int8 graph {int8_path(out).name}: {int8_path(out).stat().st_size / 1e6:.1f} MB, {parity}")


def refit_alarm(checkpoint: dict, data: Path, splits_file: Path, pre: Preprocessing) -> None:
    """fit_ood on the pinned split's training images, its scales and threshold from the validation images."""
    samples, kinds = read_splits(splits_file)
    images = {}
    for split in ("train", "val"):
        chosen = [s for s, k in zip(samples, kinds) if k == split]
        images[split], errors = decode_many([data / s.path for s in chosen], pre.view, desc=f"decode {split} images")
        if any(errors):
            raise SystemExit(f"{data}: {sum(e is not None for e in errors)} {split} images unreadable ({next(e for e in errors if e)})")
        if split == "train":
            labels = np.array([class_index(checkpoint, s.label) for s in chosen])
    alarm = fit_ood(model_from_checkpoint(checkpoint).eval(), images["train"], labels, images["val"], pre.mean, pre.std)
    checkpoint["ood_threshold"] = alarm.pop("threshold")
    checkpoint["ood"] = alarm


if __name__ == "__main__":
    main()
