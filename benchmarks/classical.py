"""Compare the CNN with the classical methods on the same split; writes the CLASSICAL block of
docs/benchmarks.md and DIR/comparison.html. Not part of CI.

    .venv/bin/python benchmarks/classical.py --dataset pbc --cnn-run runs/pbc
    .venv/bin/python benchmarks/classical.py --dataset aria_all --cnn-run runs/aria-all

The CNN run (``make models`` writes runs/pbc and runs/aria-all) is also the backbone of cnn-rf
and wbc-two-stage; every classical run reuses its splits.csv, so all methods see the same
train/val/test images. Results are merged into DIR/results.json across datasets.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402

from leukoscope import load_model  # noqa: E402
from leukoscope.data import detect_layout, read_splits  # noqa: E402
from leukoscope.data.dataset import decode_many  # noqa: E402
from leukoscope.evaluate import predict_logits  # noqa: E402
from leukoscope.io import sha256_file  # noqa: E402
from leukoscope.metrics import WBC_TYPES, accuracy, macro_f1, softmax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WBC5 = list(WBC_TYPES)
METHODS = {"pbc": ["svm", "mlp", "cnn-rf", "wbc-two-stage"], "aria_all": ["svm", "mlp", "cnn-rf"]}


def train_method(method: str, data: Path, cnn_run: Path, out: Path) -> None:
    """Train ``method`` into ``out`` unless it is there already, trained on the same splits and CNN backbone."""
    uses_backbone = method in ("cnn-rf", "wbc-two-stage")
    stamp = sha256_file(cnn_run / "splits.csv") + (" " + sha256_file(cnn_run / "model.pt") if uses_backbone else "")
    marker = out / "trained_on.sha256"
    if (out / "model.joblib").is_file() and marker.is_file() and marker.read_text() == stamp:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(cnn_run / "splits.csv", out / "splits.csv")
    extra = ["--backbone", str(cnn_run)] if uses_backbone else []
    subprocess.run([sys.executable, "-m", "leukoscope", "train", str(data), "--out", str(out), "--method", method, *extra], check=True)
    marker.write_text(stamp)


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str], dataset: str) -> dict:
    pred = probs.argmax(1)
    out = {"accuracy": accuracy(y, pred), "macro_f1": macro_f1(y, pred)}
    if dataset == "aria_all":
        benign = classes.index("Benign")
        truth, called = y != benign, pred != benign
        out.update(binary_accuracy=float((truth == called).mean()), sensitivity=float(called[truth].mean()), specificity=float((~called[~truth]).mean()))
    else:  # the cells of the 5 WBC types, each scored by the method's own call over all classes
        keep = np.isin(y, [classes.index(c) for c in WBC5])
        out.update(wbc5_accuracy=float((pred[keep] == y[keep]).mean()))
    return out


def measure(run: Path, data: Path, dataset: str) -> dict:
    predictor = load_model(run)
    samples, splits = read_splits(run / "splits.csv")
    ds = detect_layout(data)
    test = [s for s, k in zip(samples, splits) if k == "test"]
    images, errors = decode_many([ds.root / s.path for s in test], predictor.view)
    assert not any(errors)
    predict_logits(predictor, images[:8])  # warm-up
    with tempfile.TemporaryDirectory() as empty:  # an empty feature cache: time the real feature extraction
        os.environ["LEUKOSCOPE_CACHE"] = empty
        t0 = time.perf_counter()
        probs = softmax(predict_logits(predictor, images), predictor.temperature)
        ms = 1000 * (time.perf_counter() - t0) / len(test)
        del os.environ["LEUKOSCOPE_CACHE"]
    y = np.array([predictor.class_names.index(s.label) for s in test])
    info = json.loads((run / "run.json").read_text())
    return {"method": info.get("method", "cnn"), "n_test": len(test), "train_seconds": info.get("train_seconds"), "predict_ms": round(ms, 2),
            **scores(y, probs, predictor.class_names, dataset)}


def render(results: dict) -> tuple[str, str]:
    md = [f"_Measured {datetime.date.today()} by `benchmarks/classical.py` on our test split (same split for every method; "
          "prediction time per image on the test split, features included, 2 CPU cores)._", ""]
    page = []
    for dataset, rows in results.items():
        extra = ["benign vs malignant acc.", "sensitivity", "specificity"] if dataset == "aria_all" else ["5 WBC types acc. (own call)"]
        keys = ["binary_accuracy", "sensitivity", "specificity"] if dataset == "aria_all" else ["wbc5_accuracy"]
        header = ["method", "accuracy", "macro-F1", *extra, "train time (s)", "predict (ms/img)"]
        body = [[r["method"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", *(f"{r[k]:.4f}" for k in keys), r["train_seconds"], r["predict_ms"]] for r in rows]
        md += [f"**{dataset}** ({rows[0]['n_test']} test images)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(str(v) for v in row) + " |" for row in body] + [""]
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in body)
        page.append(f"<h2>{dataset}</h2><table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{cells}</table>")
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>Leukoscope: CNN vs classical</title><style>body{font-family:system-ui;"
           "margin:2em auto;max-width:1000px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}table{border-collapse:collapse}"
           "</style></head><body><h1>CNN vs classical methods (same split)</h1>" + "".join(page) + "</body></html>")
    return "\n".join(md), doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(METHODS), required=True)
    parser.add_argument("--cnn-run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    args = parser.parse_args()
    data = DATA / args.dataset
    if not (args.cnn_run / "splits.csv").is_file():
        raise SystemExit(f"{args.cnn_run} is not a CNN run folder; run `make models` first")
    torch.set_num_threads(2)
    rows = [measure(args.cnn_run, data, args.dataset)]
    for method in METHODS[args.dataset]:
        run = args.out / args.dataset / method
        train_method(method, data, args.cnn_run, run)
        rows.append(measure(run, data, args.dataset))
        print(json.dumps(rows[-1]))
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results[args.dataset] = rows
    results_path.write_text(json.dumps(results, indent=2))
    block, page = render(results)
    (args.out / "comparison.html").write_text(page)
    write_block("CLASSICAL", block)
    print(block)


if __name__ == "__main__":
    main()
