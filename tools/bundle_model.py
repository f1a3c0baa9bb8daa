"""Turn a finished run into a bundled model shipped in src/leukoscope/weights/NAME.pt.

    .venv/bin/python tools/bundle_model.py runs/aria-all --name aria-all --data ../shared/data/aria_all

Weights are stored in fp16 (half the size; outputs checked against fp32 below). Beside them,
NAME.int8.onnx: the int8 graph (calibrated on 256 training images, at most 0.2 points of validation
accuracy lost; see leukoscope.quantize) that predict runs with --precision int8 or auto. The metadata
gains the data manifest's sha256, the split file's sha256, val/test metrics re-measured at the
bundled model's default inference (``--tta dihedral``: 8 views, ``--tta flip``: 2 views, default
none) and task-specific test metrics: benign-vs-malignant sensitivity/specificity for aria-all,
and accuracy on the cells of the 5 common WBC types (the model's call over all its classes) for pbc.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from leukoscope.card import model_card
from leukoscope.checkpoint import ModelCard, class_index, load_checkpoint, save_checkpoint
from leukoscope.data import read_splits
from leukoscope.data.dataset import decode_many
from leukoscope.errors import LeukoscopeError
from leukoscope.evaluate import headline, predict_logits
from leukoscope.inference import TTA_MODES, Predictor
from leukoscope.quantize import int8_path, write_int8
from leukoscope.metrics import WBC_TYPES, positive_index, softmax, summarize, wilson_interval
from leukoscope.runs import calibrate

WBC5 = list(WBC_TYPES)
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "leukoscope" / "weights"
CONFIGS = ROOT / "configs"
DOCS = ROOT / "docs" / "models"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_probs(predictor: Predictor, data: Path, run: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probabilities, paths) of one split of the run, at the model's default inference (TTA or not)."""
    samples, splits = read_splits(run / "splits.csv")
    members = [s for s, k in zip(samples, splits) if k == split]
    images, errors = decode_many([data / s.path for s in members], predictor.view)
    if any(errors):
        raise SystemExit(f"unreadable {split} images: {[e for e in errors if e][:3]}")
    probs = softmax(predict_logits(predictor, images), predictor.temperature)
    labels = np.array([class_index(predictor.checkpoint, s.label) for s in members])
    return labels, probs, [s.path for s in members]


def extra_metrics(names: list[str], labels: np.ndarray, probs: np.ndarray, calls: np.ndarray | None = None,
                  paths: list[str] | None = None) -> dict[str, float | list[float]]:
    """Task-level test numbers with Wilson 95% intervals, from the model's own calls (its threshold, if any).

    Images of a multi-lab folder (tools/make_wbc_data.py names them ``<lab>__<file>``) are also
    scored per lab: ``<lab>_accuracy``."""
    out: dict[str, float | list[float]] = {}
    calls = probs.argmax(1) if calls is None else calls
    labs = [Path(p).name.split("__", 1)[0] if "__" in Path(p).name else "" for p in paths or []]
    for lab in sorted(set(labs) - {""}):
        mask = np.array([x == lab for x in labs])
        hits, n = int((calls[mask] == labels[mask]).sum()), int(mask.sum())
        out[f"{lab}_accuracy"], out[f"{lab}_accuracy_ci"], out[f"{lab}_n"] = hits / n, list(wilson_interval(hits, n)), n
    if len(names) == 2:
        pos = positive_index(names)
        for key, mask, hit in ((f"{names[pos]}_sensitivity", labels == pos, calls == pos),
                               (f"{names[1 - pos]}_specificity", labels != pos, calls != pos)):
            hits, n = int((hit & mask).sum()), int(mask.sum())
            out[key], out[f"{key}_ci"] = hits / n, list(wilson_interval(hits, n))
    if "Benign" in names:
        benign = names.index("Benign")
        malignant_true, malignant_pred = labels != benign, calls != benign
        for key, hits, n in (("malignant_sensitivity", (malignant_pred & malignant_true).sum(), malignant_true.sum()),
                             ("benign_specificity", (~malignant_pred & ~malignant_true).sum(), (~malignant_true).sum())):
            out[key], out[f"{key}_ci"] = float(hits / n), list(wilson_interval(int(hits), int(n)))
    if all(c in names for c in WBC5):
        keep = np.isin(labels, [names.index(c) for c in WBC5])  # cells of the 5 WBC types, called over all classes
        hits, n = int((calls[keep] == labels[keep]).sum()), int(keep.sum())
        out.update(wbc5_accuracy=hits / n, wbc5_accuracy_ci=list(wilson_interval(hits, n)), wbc5_n=n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="the model's default test-time augmentation (metrics re-measured with it)")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.run / "model.pt")
    card = ModelCard.from_meta(checkpoint)
    card.tta = args.tta  # the default inference that the metrics below are measured with
    checkpoint.update(card.to_meta())
    full = Predictor(checkpoint)
    checkpoint["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    half = Predictor(checkpoint)
    probe = torch.randint(0, 256, (8, 3, full.image_size, full.image_size), dtype=torch.uint8)
    diff = float(np.abs(full.predict_proba(probe) - half.predict_proba(probe)).max())
    if diff > 1e-2:
        raise SystemExit(f"fp16 weights change probabilities by {diff:.4f} > 0.01; not bundling")
    manifest = args.data / "manifest.csv"
    checkpoint["data_manifest_sha256"] = sha256(manifest) if manifest.is_file() else ""
    checkpoint["splits_sha256"] = sha256(args.run / "splits.csv")
    if args.tta != "none":  # the temperature is fitted with the inference the model will run by default
        samples, splits = read_splits(args.run / "splits.csv")
        val = [s for s, k in zip(samples, splits) if k == "val"]
        images, _ = decode_many([args.data / s.path for s in val], half.view)
        labels = np.array([class_index(checkpoint, s.label) for s in val])
        half.temperature = checkpoint["temperature"] = calibrate(half, images, labels)
    for split in ("val", "test"):
        labels, probs, paths = split_probs(half, args.data, args.run, split)
        calls = np.array([half.decide(p) for p in probs])  # the operating threshold, where the model has one
        checkpoint["metrics"].update(headline({split: summarize(labels, probs, half.class_names, y_pred=calls)}))
    checkpoint["extra_metrics"] = extra_metrics(half.class_names, labels, probs, calls, paths)
    checkpoint["bundled_name"] = args.name
    card_file = CONFIGS / f"{args.name}.card.yaml"
    checkpoint["card"] = yaml.safe_load(card_file.read_text()) if card_file.is_file() else {}
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_checkpoint(WEIGHTS / f"{args.name}.pt", checkpoint)
    size = (WEIGHTS / f"{args.name}.pt").stat().st_size / 1e6
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"{args.name}.md").write_text(model_card(args.name, checkpoint))
    print(f"bundled {args.name}: {size:.1f} MB, fp16 max prob diff {diff:.2e}, test {checkpoint['metrics'].get('test')}, extra {checkpoint['extra_metrics']}")
    int8 = int8_path(WEIGHTS / f"{args.name}.pt")
    int8.unlink(missing_ok=True)
    try:  # the int8 graph predict --precision int8|auto runs: calibrated on training images, parity on validation
        parity = write_int8(checkpoint, WEIGHTS / f"{args.name}.pt", args.data, args.run / "splits.csv", half.view)
        print(f"int8 graph {int8.name}: {int8.stat().st_size / 1e6:.1f} MB, {parity}")
    except LeukoscopeError as err:
        print(f"no int8 graph for {args.name}: {err}")


if __name__ == "__main__":
    main()
