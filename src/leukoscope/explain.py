"""Class-activation heatmaps (pytorch-grad-cam): which parts of a cell drove its prediction.

``Explainer`` wraps a predictor's network; ``explain_files`` is the ``leukoscope explain``
command: one PNG per image with the cell, the heatmap overlay and the predicted class.
"""

from __future__ import annotations

import csv
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from .checkpoint import model_from_checkpoint
from .classes import model_class
from .errors import LeukoscopeError, did_you_mean
from .images import ImageReadError, load_view, png_bytes
from .inference import Predictor, alarm_cells
from .io import atomic_write, make_output_folder, output_name
from .models import CellNet
from .transforms import eval_transform

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage: CellNet's last block, ResNet's layer4, else the last conv."""
    if isinstance(model, CellNet):
        return model.features[-1]
    if isinstance(getattr(model, "layer4", None), nn.Sequential):
        return model.layer4[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise LeukoscopeError(f"cannot find a convolutional layer to explain in {type(model).__name__}")
    return convs[-1]


class Explainer:
    """Heatmaps for a PyTorch predictor (not for ONNX or classical models, which have no gradients). A predictor
    restricted to some classes (``restrict_classes``) is explained by its whole model's network; class indices
    stay the restricted predictor's."""

    def __init__(self, predictor: Predictor, method: str = "gradcam"):
        if method not in CAM_METHODS:
            raise LeukoscopeError(f"unknown CAM method {method!r}{did_you_mean(method, CAM_METHODS)}; choose from {', '.join(CAM_METHODS)}")
        whole = predictor.whole or predictor
        if "state_dict" not in whole.checkpoint:
            raise LeukoscopeError(f"heatmaps need a PyTorch model (run folder, checkpoint or bundled name); {predictor.source!r} is a {predictor.kind} model")
        self.predictor = predictor
        self._columns = [whole.class_names.index(c) for c in predictor.class_names]  # the network's output of each class
        self.model = model_from_checkpoint(whole.checkpoint).float().eval()
        for module in self.model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False  # gradient hooks need the activations unmodified
        self.cam = CAM_METHODS[method](model=self.model, target_layers=[target_layer(self.model)])
        self._lock = threading.Lock()  # the CAM object keeps hooks and state per call

    def heatmaps(self, batch_uint8: torch.Tensor, class_indices: Sequence[int]) -> np.ndarray:
        """(N, S, S) maps in [0, 1] for (N, 3, S, S) uint8 images and the class to explain per image."""
        pre = self.predictor.card.preprocessing
        x = eval_transform(batch_uint8, pre.mean, pre.std).contiguous()
        targets = [ClassifierOutputTarget(self._columns[int(c)]) for c in class_indices]
        with self._lock, torch.enable_grad():
            maps = self.cam(input_tensor=x, targets=targets)
        return np.nan_to_num(np.asarray(maps, dtype=np.float32)).clip(0, 1)

    def overlay(self, image: np.ndarray, class_index: int) -> np.ndarray:
        """Heatmap of ``class_index`` over one HxWx3 uint8 image (callers already hold the prediction)."""
        batch = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]
        cam = self.heatmaps(batch, [class_index])[0]
        return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.55)


def panel(image: np.ndarray, overlay: np.ndarray, caption: str = "", scale: int = 2) -> np.ndarray:
    """Cell and heatmap side by side, enlarged, with a caption strip on top (none when ``caption`` is empty)."""
    pair = Image.fromarray(np.concatenate([image, overlay], axis=1))
    pair = pair.resize((pair.width * scale, pair.height * scale), Image.Resampling.BICUBIC)
    if not caption:
        return np.asarray(pair)
    canvas = Image.new("RGB", (pair.width, pair.height + 22), "white")
    canvas.paste(pair, (0, 22))
    ImageDraw.Draw(canvas).text((6, 5), caption, fill="black")
    return np.asarray(canvas)


def explain_files(model: Predictor, paths: Sequence[os.PathLike], out_dir: str | os.PathLike, method: str = "gradcam",
                  class_name: str | None = None) -> tuple[int, list[tuple[str, str]]]:
    """``leukoscope explain``: one ``<name>_cam.png`` per image plus ``explanations.csv``; returns (heatmaps written,
    (path, error) of each image that failed)."""
    out_dir = make_output_folder(out_dir, "heatmaps")
    names = model.class_names
    if class_name is not None:
        class_name = model_class(class_name, names)
    explainer = Explainer(model, method)
    rows, used, failed = [], set(), []
    for path in paths:
        try:
            image, localised, recoloured = load_view(path, model.view)
        except ImageReadError as err:
            rows.append([str(path), "", "", "", "", "", "", "", str(err)])
            failed.append((str(path), str(err)))
            continue
        # the call, its probabilities and the out-of-domain alarm as predict gives them (its decision rule included)
        prediction = model.predict_arrays([np.asarray(image)], [str(path)])[0]
        prediction.localised = localised
        model.mark_recoloured(prediction, recoloured)
        called = names.index(prediction.label)
        cls = called if class_name is None else names.index(class_name)
        overlay = explainer.overlay(image, cls)
        name = output_name(Path(path).stem, used) + "_cam.png"
        unlike = " | OUT OF DOMAIN" if prediction.in_domain is False else ""
        caption = f"{prediction.label} {prediction.confidence:.3f} | heatmap for {names[cls]} ({method}){unlike}"
        with atomic_write(out_dir / name, "wb") as handle:
            handle.write(png_bytes(panel(image, overlay, caption)))
        rows.append([str(path), prediction.label, f"{prediction.confidence:.6f}", names[cls], name, *alarm_cells(prediction), ""])
    with atomic_write(out_dir / "explanations.csv", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted", "confidence", "explained_class", "heatmap", "ood_score", "in_domain", "localised", "error"])
        writer.writerows(rows)
    return len(rows) - len(failed), failed


