"""The usual recipe, for comparison: torchvision ResNet-18 at 224 px, fp32, eager PyTorch,
PIL decode + resize 256 + centre crop 224, batch 64, CSV out. Random weights: only speed matters.

    python benchmarks/reference_predict.py FOLDER --out preds.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=args.classes).eval()
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    with open(args.out, "w", newline="") as handle, torch.no_grad():
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "confidence"])
        for start in range(0, len(paths), 64):
            chunk = paths[start : start + 64]
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in chunk])
            probs = torch.softmax(model(batch), dim=1)
            conf, label = probs.max(dim=1)
            writer.writerows([str(p), int(l), float(c)] for p, l, c in zip(chunk, label, conf))


if __name__ == "__main__":
    main()
