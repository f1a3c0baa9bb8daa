"""Training configuration: a dataclass, loadable from YAML and overridable from the CLI."""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .classical import METHODS, NEEDS_BACKBONE, check_method
from .errors import LeukoscopeError, did_you_mean
from .options import AugmentConfig
from .stain import MODES as COLOUR_MODES

OPTIMIZERS = ("adamw", "sgd")
CELL_CONTEXT = 1.3  # cell windows decoded 1.3x wider for training augmentation (crop_context)


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, factory: Any = None) -> Any:
    """A training option: its default, and the help and choices that its ``--flag`` shows (see cli)."""
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training option, defined once: YAML keys and ``leukoscope train`` flags both come from here."""

    arch: str = option("cellnet", "model architecture (see `leukoscope models`)")
    arch_kwargs: dict = option(None, "architecture options as YAML, e.g. '{widths: [32, 64, 128, 256], se: true}'", factory=dict)
    image_size: int = option(128, "training and inference resolution in pixels")
    min_image_size: int | None = option(None, "progressive resizing: start training at this size, reach image_size by 75% of the epochs")
    crop: float = option(1.0, "keep this central fraction of each image before resizing (1.0: the whole image)")
    crop_context: bool = option(False, "augment from the real surroundings of the crop (or cell window) instead of reflections of its "
                                       "edge (needs crop < 1 or cell)")
    cell: float | None = option(None, "cell-centric window: locate the white cell and scale a window centred on it so that the cell's "
                                      "diameter fills this fraction of it (e.g. 0.6); crop is then unused")
    reduce: bool = option(False, "shrink each image by the largest of 2, 4 or 8 that still leaves the central crop image_size "
                                 "pixels across before resizing it (JPEGs then decode at that scale, about twice as fast; not "
                                 "with cell)")
    colour_norm: str = option("none", "colour normalisation of each window: white (subtract the background's optical density, so "
                                      "every lab's background is white), reinhard (map OD mean and std onto the training average) "
                                      "or none", COLOUR_MODES)
    colour_cast: bool = option(False, "correct a yellow cast (a warm lamp, a camera's white balance): an image whose background's "
                                      "blue share lies well below the training images' range gets per-channel gains that bring it "
                                      "back, and is reported out of domain; images within it are left alone")
    epochs: int = option(30, "training epochs")
    batch_size: int = option(64, "images per training step")
    optimizer: str = option("adamw", "adamw, or sgd with Nesterov momentum 0.9 (give it a larger lr, e.g. 0.1)", OPTIMIZERS)
    lr: float = option(3e-3, "peak learning rate of the one-cycle schedule")
    weight_decay: float = option(0.05, "weight decay of the convolution and linear weights")
    label_smoothing: float = option(0.05, "label smoothing of the cross-entropy loss")
    class_balance: bool = option(True, "weight the loss by inverse class frequency")
    patience: int | None = option(None, "early-stopping patience in epochs (default: 3/4 of the epochs, at least 10; a falling "
                                         "validation loss counts as progress)")
    seed: int = option(0, "seed of initialisation, batch order and augmentation (and of the split, unless split_seed is given)")
    split_seed: int | None = option(None, "seed of the train/val/test split (default: seed), to vary training on a fixed split")
    split_by: str = option("patient", "group the split by patient (when ids are known) or split by image", ("patient", "image"))
    fractions: tuple[float, float, float] = option((0.7, 0.15, 0.15), "train,val,test fractions, e.g. 0.7,0.15,0.15")
    split_folders: bool = option(True, "a dataset whose images sit in train/, val/ (or valid/) and test/ folders keeps that split, "
                                       "validation dealt from train/ when it has no val/ (refused, with a warning, where a patient "
                                       "or near-identical images span two folders); --no-split-folders pools them and splits anew")
    precision: str = option("auto", "auto (bf16 on CUDA or where the CPU computes it natively and exactly), fp32 or bf16", ("auto", "fp32", "bf16"))
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", ("auto", "cpu", "cuda"))
    sync_bn: bool | None = option(None, "under torchrun, BatchNorm statistics over the global batch (default: when a rank's share "
                                        "of a batch is under 32 images)")
    target_sensitivity: float | None = option(None, "binary tasks: choose the decision threshold on val for this sensitivity (e.g. 0.98)")
    ema: float | None = option(None, "validate and save an exponential moving average of the weights with this per-step decay (e.g. 0.998)")
    refit_head: float | None = option(None, "after training, refit the linear classifier by logistic regression (inverse L2 strength C) "
                                            "on the training features, clean plus refit_views augmented views")
    merge_classes: dict | None = option(None, "learn finer classes than the model reports: each class folder named here merges into the "
                                       "class it maps to, e.g. '{neutrophil_band: neutrophil, neutrophil_segmented: neutrophil}'; "
                                       "the network trains on the folders, then its classifier is refitted on the merged classes "
                                       "(needs refit_head)", factory=dict)
    refit_views: int = option(3, "augmented views of each training image added to the clean ones for refit_head")
    init: str | None = option(None, "fine-tune from this model (run folder, checkpoint or bundled name): its backbone and input "
                                    "settings (architecture, size, crop, normalisation) with a new head")
    teacher: str | None = option(None, "distil from this model (run folder, checkpoint or bundled name): its probabilities on each "
                                       "training image, through its own preprocessing, are blended into the targets where it "
                                       "calls the image right")
    distill: float = option(0.5, "with teacher: the teacher's share of each target it may teach (0-1)")
    distill_temperature: float = option(2.0, "with teacher: the temperature that softens its probabilities")
    freeze_epochs: int = option(0, "with init: train only the new head for this many epochs first")
    backbone_lr: float = option(1.0, "with init: the backbone's learning rate as a fraction of lr (e.g. 0.1)")
    cv: int | None = option(None, "k-fold cross-validation over train+val (grouped and stratified like the split) instead of one "
                                  "training: writes cv.json with each fold's validation metrics and their mean and std")
    track: str | None = option(None, "log this run's options, train/val metrics and files to a local MLflow store in this folder "
                                     "(needs pip install 'leukoscope[track]')")
    method: str = option("cnn", "cnn, or a classical method: svm, mlp, cnn-rf or wbc-two-stage", METHODS)
    backbone: str | None = option(None, "cnn-rf / wbc-two-stage: CNN run folder or bundled model trained on the same split")
    augment: AugmentConfig = option(None, "augmentation options as YAML, e.g. '{hue: 0.03, blur_p: 0.1}' (unnamed ones keep their defaults)",
                                    factory=AugmentConfig)

    @property
    def context(self) -> float:
        """With crop_context: how much wider than the model's view training images are decoded."""
        if not self.crop_context:
            return 1.0
        return CELL_CONTEXT if self.cell is not None else 1.0 / self.crop

    @property
    def split_seed_value(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def train_size(self, epoch: int) -> int:
        """Training resolution of ``epoch`` (1-based).

        With ``min_image_size`` the size ramps linearly from it to ``image_size`` over the first
        75% of the epochs, in steps of 8 px, and the last quarter trains at ``image_size``: low
        resolution is cheap early, when the model learns coarse shapes, and the model ends on
        the resolution it is evaluated at.
        """
        if self.min_image_size is None or self.min_image_size >= self.image_size:
            return self.image_size
        ramp = max(1, round(0.75 * self.epochs) - 1)
        t = min(1.0, (epoch - 1) / ramp)
        size = self.min_image_size + t * (self.image_size - self.min_image_size)
        return min(self.image_size, int(round(size / 8)) * 8)

    @property
    def patience_epochs(self) -> int:
        """Epochs without validation improvement before stopping.

        By default it scales with the run: 3/4 of the epochs, at least 10. Under a one-cycle
        schedule validation often improves only once the learning rate comes down, and on a small
        validation split accuracy plateaus early while the loss still falls; a fixed 10 stopped a
        20-epoch run at epoch 13 and kept the weights of epoch 3.
        """
        return self.patience if self.patience is not None else max(10, -(-3 * self.epochs // 4))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fractions"] = list(self.fractions)
        out["augment"] = self.augment.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        check_keys(cls, values, source)
        values = dict(values)
        check_types(cls, values, source)
        if "augment" in values:
            if not isinstance(values["augment"], (dict, type(None))):
                raise LeukoscopeError(f"{source}: augment must be a mapping of augmentation options, got {values['augment']!r}")
            check_keys(AugmentConfig, values["augment"] or {}, source, "augment.")
            check_types(AugmentConfig, values["augment"] or {}, source, "augment.")
            try:
                values["augment"] = AugmentConfig.from_dict(values["augment"])
            except TypeError as err:
                raise LeukoscopeError(f"{source}: bad augment options ({err})") from None
        if "fractions" in values:
            values["fractions"] = tuple(float(v) for v in values["fractions"])
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        checks = [
            (16 <= self.image_size <= 4096, f"image_size must be between 16 and 4096, got {self.image_size}"),
            (self.min_image_size is None or 16 <= self.min_image_size <= self.image_size,
             f"min_image_size must be between 16 and image_size ({self.image_size}), got {self.min_image_size}"),
            (self.ema is None or 0 < self.ema < 1, f"ema must be between 0 and 1 (a per-step decay such as 0.998), got {self.ema}"),
            (self.refit_views >= 0, f"refit_views must be >= 0, got {self.refit_views}"),
            (self.refit_head is None or self.refit_head > 0, f"refit_head must be > 0 (inverse regularisation), got {self.refit_head}"),
            (0.2 <= self.crop <= 1.0, f"crop must be between 0.2 and 1.0, got {self.crop}"),
            (not self.crop_context or self.crop < 1.0 or self.cell is not None,
             "crop_context needs crop < 1 or cell (with the whole image there is no context around it)"),
            (not self.reduce or self.cell is None, "reduce applies to central crops, not to cell windows (cell is set): drop one of them"),
            (self.colour_norm in COLOUR_MODES, f"colour_norm must be one of {', '.join(COLOUR_MODES)}, got {self.colour_norm!r}"),
            (self.cell is None or 0.1 <= self.cell <= 1.0, f"cell must be between 0.1 and 1.0 (the cell's share of the window), got {self.cell}"),
            (0 <= self.augment.colour_p <= 1, f"augment.colour_p must be between 0 and 1, got {self.augment.colour_p}"),
            (self.augment.mixup >= 0 and self.augment.cutmix >= 0,
             f"augment.mixup and augment.cutmix must be >= 0 (a Beta parameter, 0: off), got {self.augment.mixup} and {self.augment.cutmix}"),
            (0 <= self.distill <= 1, f"distill must be between 0 and 1 (the teacher's share of a target), got {self.distill}"),
            (self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}"),
            (self.teacher is None or self.method == "cnn", "teacher applies to CNN training (method cnn)"),
            (not self.merge_classes or self.refit_head is not None,
             "merge_classes needs refit_head (the classifier of the merged classes is refitted on the network's features)"),
            (not self.merge_classes or (self.method == "cnn" and self.teacher is None),
             "merge_classes applies to CNN training (method cnn) without a teacher"),
            (all(isinstance(k, str) and isinstance(v, str) and v for k, v in (self.merge_classes or {}).items()),
             f"merge_classes must map class folder names to class names, e.g. '{{neutrophil_band: neutrophil}}', got {self.merge_classes!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.freeze_epochs >= 0, f"freeze_epochs must be >= 0, got {self.freeze_epochs}"),
            (0 < self.backbone_lr <= 1, f"backbone_lr must be in (0, 1] (a fraction of lr), got {self.backbone_lr}"),
            (self.cv is None or self.cv >= 2, f"cv must be at least 2 folds, got {self.cv}"),
            ((self.init is None and self.freeze_epochs == 0 and self.backbone_lr == 1.0) or self.method == "cnn",
             "init, freeze_epochs and backbone_lr apply to CNN training (method cnn)"),
            (self.freeze_epochs == 0 and self.backbone_lr == 1.0 or self.init is not None,
             "freeze_epochs and backbone_lr need init (a model to fine-tune)"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be at least 0 and below 1, got {self.label_smoothing}"),
            (all(0 <= seed < 2**32 for seed in (self.seed, self.split_seed_value)),  # numpy's seeds are 32-bit
             f"seed and split_seed must be whole numbers from 0 to 4294967295, got {self.seed} and {self.split_seed}"),
            (self.target_sensitivity is None or 0 < self.target_sensitivity < 1,
             f"target_sensitivity must be between 0 and 1 (e.g. 0.98), got {self.target_sensitivity}"),
            *augment_checks(self.augment),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.split_by in ("patient", "image"), f"split_by must be 'patient' or 'image', got {self.split_by!r}"),
            (self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (len(self.fractions) == 3 and abs(sum(self.fractions) - 1) < 1e-6 and min(self.fractions) >= 0,
             f"fractions must be three numbers >= 0 summing to 1, got {list(self.fractions)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LeukoscopeError(f"{source}: {message}")
        # imported here: the CLI's parser reads this module, and PyTorch takes 2 s to import
        from .models import check_model_name

        check_model_name(self.arch)
        check_method(self.method)
        if self.method in NEEDS_BACKBONE and not self.backbone:
            raise LeukoscopeError(f"{source}: --method {self.method} needs --backbone RUN_OR_BUNDLED_MODEL (a CNN trained on the same split)")


def augment_checks(augment: AugmentConfig) -> list[tuple[bool, str]]:
    """The augmentation's bounds: a jitter of 1 or more (brightness 1.5: a factor U(-0.5, 2.5)) makes negative or
    black images, a probability is at most 1, a hue rotation beyond half the circle repeats itself."""
    checks = [(0 <= getattr(augment, key) < 1, f"augment.{key} must be at least 0 and below 1, got {getattr(augment, key)}")
              for key in ("translate", "brightness", "contrast", "saturation", "stain", "hed", "hed_shift")]
    (low, high), (blur_low, blur_high) = augment.scale, augment.blur_sigma
    return [*checks,
            (0 <= augment.hue <= 0.5, f"augment.hue must be between 0 and 0.5 (a fraction of the colour circle), got {augment.hue}"),
            (0 <= augment.blur_p <= 1, f"augment.blur_p must be between 0 and 1, got {augment.blur_p}"),
            (0 < low <= high, f"augment.scale must be [low, high] with 0 < low <= high, got {list(augment.scale)}"),
            (0 <= blur_low <= blur_high, f"augment.blur_sigma must be [low, high] with 0 <= low <= high, got {list(augment.blur_sigma)}")]


def check_keys(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """A one-line error for an option ``cls`` does not have, with the one it likely meant and every valid one."""
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise LeukoscopeError(f"{source}: unknown option {prefix + str(key)!r}{did_you_mean(str(key), known)}; "
                                  f"valid: {', '.join(sorted(known))}")


def check_types(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """A one-line error for an option of the wrong type (``epochs: three`` in a YAML file), before it fails
    deep in training; an int is taken where a float is meant (``lr: 1``)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise LeukoscopeError(f"{source}: {prefix}{key} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if origin is tuple:  # fixed length: fractions, a scale range
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is float:  # NaN or infinity: no option means them, and NaN passes every bound below
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    return True  # mappings and nested settings are checked where they are read


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    return {float: "a finite number", int: "a whole number", dict: "a mapping (YAML {key: value})", bool: "true or false", str: "a string", type(None): "empty (null)"}.get(hint, str(hint))


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file, then command-line overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LeukoscopeError(f"config file {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise LeukoscopeError(f"{path}: not a YAML text file (it holds binary data); give the configs/*.yaml kind of file") from None
        except yaml.YAMLError as err:
            raise LeukoscopeError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise LeukoscopeError(f"{path}: expected a mapping of options, got {type(loaded).__name__}")
        values.update(loaded)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = {**values[key], **value}  # --augment '{hue: 0.05}' changes one key of the file's augment block
        values[key] = value
    if values.get("init"):  # a fine-tuned model keeps its parent's input settings unless told otherwise
        check_types(TrainConfig, {"init": values["init"]}, str(path) if path else "options")
        values = {**inherited_settings(values["init"]), **values}
    return TrainConfig.from_dict(values, source=str(path) if path else "options")


def inherited_settings(init: str) -> dict[str, Any]:
    """Architecture, its options, image size, crop, cell window, colour normalisation and colour-cast
    correction (the child fits its own range) of the model ``init`` names."""
    from .checkpoint import ModelCard, load_checkpoint, resolve_model_path

    path = resolve_model_path(init)
    if path.suffix.lower() != ".pt":
        return {}  # refused with its reason when training starts
    card = ModelCard.from_meta(load_checkpoint(path))
    pre = card.preprocessing
    return {"arch": card.arch, "arch_kwargs": card.arch_kwargs, "image_size": pre.image_size, "crop": pre.crop, "cell": pre.cell,
            "colour_norm": pre.colour, "reduce": pre.reduce, "colour_cast": pre.cast is not None}


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
