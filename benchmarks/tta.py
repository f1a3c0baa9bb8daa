"""Effect of 8-view test-time augmentation (rotations x flips) on the bundled models.

    .venv/bin/python benchmarks/tta.py

Val and test splits of each bundled model's own run (rebuilt from its config and checked
against its recorded splits sha256), with and without TTA; writes the TTA block of
docs/benchmarks.md. Not part of CI.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import markers, write_block  # noqa: E402
from robustness import DATA, FOLDERS, model_splits  # noqa: E402

from leukoscope import load_model  # noqa: E402
from leukoscope.data.dataset import decode_many  # noqa: E402
from leukoscope.evaluate import predict_logits, softmax  # noqa: E402
from leukoscope.metrics import summarize  # noqa: E402


def main() -> None:
    start, end = markers("TTA")
    lines = [start, f"_Measured {datetime.date.today()} by `benchmarks/tta.py` (8 views: 4 rotations x 2 flips, logits averaged)._", "",
             "| model | split | accuracy | accuracy TTA | macro-F1 | macro-F1 TTA | ECE | ECE TTA | predict time ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for name in FOLDERS:
        predictor = load_model(name)
        dataset, splits = model_splits(DATA / FOLDERS[name], predictor)
        for split in ("val", "test"):
            members = [s for s, k in zip(dataset.samples, splits) if k == split]
            images, _ = decode_many([dataset.abspath(s) for s in members], predictor.image_size, crop=predictor.crop)
            y = np.array([predictor.class_names.index(s.label) for s in members])
            row, seconds = {}, {}
            for tta in (False, True):
                t0 = time.perf_counter()
                probs = softmax(predict_logits(predictor, images, tta=tta), predictor.temperature)
                seconds[tta] = time.perf_counter() - t0
                row[tta] = summarize(y, probs, predictor.class_names)
            lines.append(f"| {name} | {split} ({len(members)}) | {row[False]['accuracy']:.4f} | {row[True]['accuracy']:.4f} | "
                         f"{row[False]['macro_f1']:.4f} | {row[True]['macro_f1']:.4f} | {row[False]['ece']:.4f} | {row[True]['ece']:.4f} | "
                         f"{seconds[True] / seconds[False]:.1f}x |")
            print(lines[-1], flush=True)
    lines.append(end)
    write_block("TTA", "\n".join(lines))


if __name__ == "__main__":
    main()
