"""A bundled model's card, as Markdown: intended use, data, licence, split, metrics with intervals,
known failure modes. Everything comes from the checkpoint (``checkpoint["card"]``, embedded by
tools/bundle_model.py from ``configs/NAME.card.yaml``, and the metrics recorded when it was bundled),
so ``leukoscope models NAME`` and docs/models/NAME.md say the same thing."""

from __future__ import annotations

from typing import Any

from .metrics import wilson_interval

EXTRA_LABELS = {"wbc5_accuracy": "accuracy on the cells of the 5 WBC types (the model's call over all its classes)",
                "malignant_sensitivity": "malignant (Early, Pre, Pro) sensitivity", "benign_specificity": "benign specificity",
                "blast_sensitivity": "blast sensitivity at the operating threshold", "normal_specificity": "normal specificity",
                "pbc_accuracy": "accuracy on the PBC images", "bccd_wbc_accuracy": "accuracy on the BCCD images (the 8-class call)"}
COLOUR = {"white": "colours white-balanced on each window's background", "reinhard": "colours mapped onto the training images' optical-density statistics"}
ALARM_PARTS = {False: "Mahalanobis distance of its features to the training classes",
               True: "Mahalanobis distances of its pooled features to the training classes and of its early layers' channel "
                     "statistics, the stain and camera's style, to the training images'; each 1 at the validation images' median"}
SCORES = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"), ("roc_auc", "ROC AUC"))


def with_interval(values: dict[str, Any], key: str, label: str = "95% CI ") -> str:
    """'98.45% (95% CI 97.49%-99.04%)': a stored metric with its recorded interval, or, for an accuracy
    stored without one (older checkpoints), Wilson's interval from its image count."""
    interval = values.get(f"{key}_ci")
    if interval is None and key == "accuracy" and values.get("n"):
        interval = wilson_interval(round(values["accuracy"] * values["n"]), values["n"])
    text = f"{values[key]:.2%}"
    return text + (f" ({label}{interval[0]:.2%}-{interval[1]:.2%})" if interval else "")


def model_card(name: str, checkpoint: dict[str, Any]) -> str:
    card = checkpoint.get("card", {})
    metrics = checkpoint.get("metrics", {})
    crop, cell, colour = checkpoint.get("crop", 1.0), checkpoint.get("cell"), checkpoint.get("colour") or "none"
    framing = (f" on a window centred on the located white cell, its nucleus spanning {cell:.0%} of it" if cell
               else f" on the central {crop:.0%} of each image" if crop < 1 else "") + (f", {COLOUR[colour]}" if colour in COLOUR else "") \
        + (" (JPEGs decoded at 1/2, 1/4 or 1/8 of their size where that still covers it; arrays block-averaged alike)"
           if checkpoint.get("reduce") and not cell else "")
    lines = [f"# Model card: `{name}`", "",
             f"**Intended use.** {card.get('intended_use', 'Research use; not for diagnosis.')}", "",
             "## Model", "",
             f"- Architecture: `{checkpoint['arch']}`, {checkpoint['image_size']} px input"
             + framing + f"; classes: {', '.join(checkpoint['class_names'])}.",
             f"- Temperature {checkpoint.get('temperature', 1.0):.3f} (fitted on validation); default test-time augmentation: {checkpoint.get('tta') or 'none'}.",
             f"- Trained by: `{checkpoint.get('train_command', '?')}`"
             + (f" in {checkpoint['train_seconds'] / 60:.1f} min" if checkpoint.get("train_seconds") else "") + ".",
             f"- Data manifest sha256: `{checkpoint.get('data_manifest_sha256', '?')}`.",
             (f"- Out-of-distribution alarm: each prediction's `ood_score` ({ALARM_PARTS['style' in (checkpoint.get('ood') or {})]}); "
              f"`in_domain` is false above {checkpoint['ood_threshold']:.1f}, which 95% of the validation images stay below."
              if checkpoint.get("ood_threshold") is not None else "- No out-of-distribution alarm."), "",
             "## Data", "", card.get("data", "-"), "", f"Licence: {card.get('licence', '-')}.", "", f"Citation: {card.get('citation', '-')}", "",
             "## Split", "", card.get("split", checkpoint.get("split_kind", "-")), "",
             "## Metrics (measured once, when bundled)", "", "| split | images | " + " | ".join(label for _, label in SCORES) + " |",
             "|---|---|" + "---|" * len(SCORES)]
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            lines.append(f"| {split} | {m.get('n', '?')} | " + " | ".join(with_interval(m, k) if k in m else "-" for k, _ in SCORES) + " |")
    extra = checkpoint.get("extra_metrics", {})
    extras = [f"{EXTRA_LABELS.get(k, k.replace('_', ' '))}: {with_interval(extra, k)}" for k, v in extra.items()
              if isinstance(v, float) and not k.endswith("_f1")]
    if extras:
        lines += ["", "On test: " + "; ".join(extras) + "."]
    lines += ["", "Intervals: Wilson for proportions, stratified bootstrap for balanced accuracy, macro-F1 and AUC.", "",
              "## Known failure modes", ""]
    lines += [f"- {mode}" for mode in card.get("failure_modes", ["not measured"])]
    return "\n".join(lines) + "\n"
