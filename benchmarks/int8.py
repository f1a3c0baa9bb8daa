"""int8 against fp32 for a bundled model: accuracy on its validation split and the model's own speed.

The int8 graph is the one the model ships (`weights/NAME.int8.onnx`, what `predict --precision
int8|auto` runs; built by tools/bundle_model.py with leukoscope.quantize: ONNX Runtime static
quantisation of the convolutions, QDQ, per channel, calibrated on 256 training images of the
model's pinned split). Measured on the validation split (never test): accuracy of both, the share
of identical calls, and the largest probability difference; then images/s of the model alone
(ONNX Runtime, batch 64, images already decoded) for both graphs. Whether int8 is faster depends
on the CPU (VNNI / AMX). Writes the INT8-<model> block of docs/benchmarks.md (or --block NAME).

Usage: python benchmarks/int8.py [--model pbc] [--data ../shared/data/pbc] [--block NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import add_block_argument, cpu, write_block  # noqa: E402

from leukoscope.data import read_splits  # noqa: E402
from leukoscope.data.dataset import decode_many  # noqa: E402
from leukoscope.inference import Predictor, load_model  # noqa: E402
from leukoscope.metrics import wilson_interval  # noqa: E402
from leukoscope.onnx_backend import OnnxBackend, onnx_bytes  # noqa: E402
from leukoscope.quantize import graph_meta, int8_path, load_int8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rate(backend: OnnxBackend, images: torch.Tensor, repeats: int = 3) -> float:
    backend(images[:64])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), 64):
            backend(images[i : i + 64])
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pbc")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    add_block_argument(parser, "INT8-<model>")
    args = parser.parse_args()
    model = load_model(args.model, backend="torch")
    samples, splits = read_splits(ROOT / "configs" / f"{args.model}.splits.csv")
    val = [s for s, k in zip(samples, splits) if k == "val"]
    images, _ = decode_many([args.data / s.path for s in val], model.view, desc="decode val")
    labels = np.array([model.class_names.index(s.label) for s in val])
    int8 = load_int8(model.checkpoint, model.source, build=False)
    if int8 is None:
        sys.exit(f"{args.model} ships no int8 graph of this checkpoint (make models)")
    calibration = graph_meta(int8_path(model.source))["parity"]["calibration_images"]
    backends = {"fp32": OnnxBackend(onnx_bytes(model.checkpoint)), "int8": int8}
    probs, calls = {}, {}
    for name, backend in backends.items():
        predictor = Predictor(model.checkpoint, source=name, backend=backend)
        probs[name] = np.concatenate([predictor.predict_proba(images[i : i + 256]) for i in range(0, len(images), 256)])
        calls[name] = np.array([predictor.decide(p) for p in probs[name]])
    n = len(labels)
    lines = [f"`{args.model}`, validation split ({n} images), int8 calibrated on {calibration} training images; "
             f"{torch.get_num_threads()} threads on {cpu()}. 95% Wilson intervals.", "",
             "| graph | val accuracy | model alone, images/s (batch 64) |", "|---|---|---|"]
    for name, backend in backends.items():
        hits = int((calls[name] == labels).sum())
        low, high = wilson_interval(hits, n)
        lines.append(f"| {name} | {100 * hits / n:.2f}% ({100 * low:.1f}-{100 * high:.1f}) | {rate(backend, images[:512]):.0f} |")
    same = float((calls["int8"] == calls["fp32"]).mean())
    diff = np.abs(probs["int8"] - probs["fp32"])
    lines += ["", f"Identical calls on {100 * same:.2f}% of the validation images; probability difference: max {diff.max():.3f}, "
              f"99th percentile {np.percentile(diff.max(1), 99):.3f}, median {np.median(diff.max(1)):.4f}."]
    print("\n".join(lines))
    write_block(args.block or f"INT8-{args.model}", "\n".join(lines))


if __name__ == "__main__":
    main()
