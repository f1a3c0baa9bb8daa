"""Effect of test-time augmentation (2 views: flip; 8 views: rotations x flips) on the bundled models.

    .venv/bin/python benchmarks/tta.py

The validation split of each bundled model's own run (rebuilt from its config and checked
against its recorded splits sha256), for each TTA mode; writes the TTA block of
docs/benchmarks.md. Not part of CI.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402
from robustness import DATA, FOLDERS, model_splits  # noqa: E402

from leukoscope import load_model  # noqa: E402
from leukoscope.data.dataset import decode_many  # noqa: E402
from leukoscope.evaluate import predict_logits  # noqa: E402
from leukoscope.inference import TTA_MODES  # noqa: E402
from leukoscope.metrics import softmax, summarize  # noqa: E402


def main() -> None:
    lines = [f"_Measured {datetime.date.today()} by `benchmarks/tta.py` (logits averaged over the views; time relative to no TTA)._", "",
             "| model | split | TTA | accuracy | macro-F1 | ECE | predict time |", "|---|---|---|---|---|---|---|"]
    for name in FOLDERS:
        predictor = load_model(name)
        dataset, splits = model_splits(DATA / FOLDERS[name], predictor)
        for split in ("val",):  # choices are made on validation; a test split is scored once, when a model is bundled
            members = [s for s, k in zip(dataset.samples, splits) if k == split]
            images, _ = decode_many([dataset.abspath(s) for s in members], predictor.view)
            y = np.array([predictor.class_names.index(s.label) for s in members])
            seconds = {}
            for mode in TTA_MODES:
                t0 = time.perf_counter()
                probs = softmax(predict_logits(predictor, images, tta=mode), predictor.temperature)
                seconds[mode] = time.perf_counter() - t0
                row = summarize(y, probs, predictor.class_names)
                lines.append(f"| {name} | {split} ({len(members)}) | {mode} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | {row['ece']:.4f} | "
                             f"{seconds[mode] / seconds['none']:.1f}x |")
                print(lines[-1], flush=True)
    write_block("TTA", "\n".join(lines))


if __name__ == "__main__":
    main()
