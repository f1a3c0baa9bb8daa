"""Option values that the command line offers and the library checks, importable without PyTorch, so that
``leukoscope --help``, a misspelt option or a bad value answer at once rather than after PyTorch's two seconds of
import. The modules that act on them re-export them (``inference.TTA_MODES``, ``transforms.AugmentConfig``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TTA_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}  # flip: image + mirror image; dihedral: 4 rotations x 2 flips
TTA_MODES = tuple(TTA_VIEWS)
BACKENDS = ("auto", "torch", "onnx")  # what runs a CNN checkpoint; see inference.load_model
PRECISIONS = ("auto", "fp32", "int8")  # see quantize
DEVICES = ("auto", "cpu", "cuda")  # see runtime.resolve_device
MAX_BATCH = 1024  # images per prediction batch: 100,000 held 13.7 GB for `predict wbc` on PBC's 6,843 images; 1,024 was no faster than 64
BATCH_LIMIT_WHY = "larger batches hold more memory (three are in flight) and are not faster"
ENTROPY_STEPS = 40  # --adapt's gradient steps of entropy minimisation after the statistics, for multi-class cell-window models (see adapt)


@dataclass
class AugmentConfig:
    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    stain: float = 0.05
    hue: float = 0.0  # max hue rotation, as a fraction of the colour circle (0.05 = 18 degrees)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    hed: float = 0.0  # HED stain jitter: each stain's density scaled by U(1 - hed, 1 + hed) ...
    hed_shift: float = 0.0  # ... and shifted by U(-hed_shift, hed_shift) (Tellez et al. 2019: 0.05 and 0.05 "light")
    colour_p: float = 1.0  # the share of images whose colours are jittered (colour map and HED); the rest keep theirs
    mixup: float = 0.0  # mixup (Zhang et al. 2018): blend each batch with a shuffled copy, weight ~ Beta(mixup, mixup); 0: off
    cutmix: float = 0.0  # CutMix (Yun et al. 2019): paste a box of a shuffled copy, kept area ~ Beta(cutmix, cutmix); 0: off

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict | None) -> AugmentConfig:
        values = dict(values or {})
        for key in ("scale", "blur_sigma"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)
