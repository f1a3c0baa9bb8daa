"""Figures and the self-contained HTML report of a run (matplotlib, no network, no templates)."""

from __future__ import annotations

import base64
import html
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no backend to choose at import

from .io import atomic_write
from .metrics import expected_calibration_error, positive_index, reliability_bins, roc_curve


def save_figure(fig: Figure, path: Path) -> None:
    """Lay out and write a figure. A label that the font has no glyph for (a class or slide named in Chinese) is drawn
    as boxes, without matplotlib's warning for each glyph, which buried the command's own messages."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=110)


def plot_confusion_matrices(metrics: dict, class_names: Sequence[str], path: Path) -> None:
    """One panel per split, counts with row-normalised colour."""
    splits = [s for s in ("train", "val", "test") if s in metrics and metrics[s]["n"]]
    size = max(3.2, 0.55 * len(class_names) + 2)
    fig = Figure(figsize=(size * len(splits), size))
    axes = fig.subplots(1, len(splits), squeeze=False)
    for ax, split in zip(axes[0], splits):
        cm = np.array(metrics[split]["confusion_matrix"])
        rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{split} (acc {metrics[split]['accuracy']:.4f})")
    save_figure(fig, path)


def plot_training_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(epochs, [h[f"{key}_loss"] for h in history], style, ms=3, label=key)
        ax_acc.plot(epochs, [h[f"{key}_accuracy"] for h in history], style, ms=3, label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_roc(y_true, probs: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """ROC of the malignant class (binary: ``positive_index``) or one curve per class, one-vs-rest."""
    y_true = np.asarray(y_true)
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.subplots()
    indices = [positive_index(class_names)] if len(class_names) == 2 else range(len(class_names))
    for c in indices:
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr = roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=class_names[c])
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (test)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:  # every test image of one class: no curve can be drawn
        ax.text(0.5, 0.5, "no curve: the test images\nare all of one class", ha="center", va="center", color="gray")
    save_figure(fig, path)


def plot_reliability(y_true, raw: np.ndarray, calibrated: np.ndarray, path: Path, bins: int = 15) -> None:
    """Reliability diagram on test: accuracy per confidence bin, before and after temperature scaling."""
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for probs, style, name in ((raw, "-o", "before"), (calibrated, "-s", "after")):
        conf, acc, counts = reliability_bins(probs, y_true, bins)
        filled = counts > 0
        ece = expected_calibration_error(probs, y_true, bins)
        ax.plot(conf[filled], acc[filled], style, ms=4, label=f"{name} (ECE {ece:.4f})")
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability (test)", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def _gallery(out_dir: Path, items: Sequence[dict]) -> str:
    if not items:
        return ""
    parts = []
    for kind, title in (("error", "Most confident errors (test)"), ("correct", "Typical correct cells per class (test, most confident)")):
        figures = ""
        for item in (i for i in items if i["kind"] == kind):
            data = base64.b64encode((out_dir / item["file"]).read_bytes()).decode()
            figures += (f'<figure class="cam"><img alt="{html.escape(item["caption"])}" src="data:image/png;base64,{data}">'
                        f'<figcaption>{html.escape(item["caption"])}<br><code>{html.escape(item["source"])}</code></figcaption></figure>')
        parts.append(f"<h3>{title}</h3>" + (f'<div class="gallery">{figures}</div>' if figures else '<p class="note">none</p>'))
    return "<h2>Heatmaps (Grad-CAM)</h2>" + "".join(parts)


def _operating_points(metrics: dict, splits: Sequence[str]) -> str:
    rows = [[s, m["positive_class"], m["threshold"], _ci(m, "sensitivity"), _ci(m, "specificity")]
            for s in splits if (m := metrics[s].get("operating_point"))]
    if not rows:
        return ""
    return ("<h2>Operating point</h2><p class=\"note\">Threshold on the positive class probability, chosen on the validation split "
            "for the target sensitivity.</p>" + _table(["split", "positive class", "threshold", "sensitivity (95% CI)", "specificity (95% CI)"], rows))


def _img(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"><figcaption>{path.name}</figcaption></figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence], ) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(values: dict, key: str) -> str:
    """'0.9845 (0.9756-0.9904)': a metric with its 95% interval, when it has one."""
    value, interval = values[key], values.get(f"{key}_ci")
    if interval is None or any(v is None or np.isnan(v) for v in interval) or np.isnan(value):
        return _fmt(value)
    return f"{value:.4f} ({interval[0]:.4f}-{interval[1]:.4f})"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}pre{background:#f7f7f7;padding:1em;overflow:auto}
.note{color:#555}.gallery{display:flex;flex-wrap:wrap;gap:12px}.cam{width:480px;margin:0}.cam figcaption{font-size:12px}
.cam code{font-size:10px;word-break:break-all}"""


def _config_as_run(info: dict) -> dict:
    """The training configuration with the split that was actually used (``split_by: patient`` falls
    back to images when the data has no patient ids)."""
    config = dict(info.get("config", {}))
    kind = str(info.get("split_kind", ""))
    if "split_by" in config and kind:
        config["split_by"] = "patient" if kind.startswith("patient") else kind
    return config


def write_html_report(out_dir: Path, metrics: dict, class_names: Sequence[str], info: dict) -> Path:
    """One self-contained report.html (figures inlined) from the files in ``out_dir``."""
    splits = [s for s in ("train", "val", "test") if s in metrics]
    summary = _table(
        ["split", "n", "loss", "accuracy (95% CI)", "balanced acc. (95% CI)", "macro-F1 (95% CI)", "weighted F1", "ROC AUC (95% CI)",
         "ECE before T", "ECE after T", "out of domain (95% CI)", "unreadable (left out)"],
        [[s, metrics[s]["n"], metrics[s]["loss"], _ci(metrics[s], "accuracy"), _ci(metrics[s], "balanced_accuracy"),
          _ci(metrics[s], "macro_f1"), metrics[s]["weighted_f1"], _ci(metrics[s], "roc_auc"),
          metrics[s].get("ece_uncalibrated", float("nan")), metrics[s]["ece"],
          _ci(metrics[s], "out_of_domain") if "out_of_domain" in metrics[s] else "n/a", metrics[s].get("unreadable", 0)] for s in splits],
    )
    per_class = ""
    for s in splits:
        rows = [[c, metrics[s]["per_class"][c]["precision"], _ci(metrics[s]["per_class"][c], "recall"),
                 metrics[s]["per_class"][c]["f1"], metrics[s]["per_class"][c]["support"]] for c in class_names]
        per_class += f"<h3>{s}</h3>" + _table(["class", "precision", "recall (95% CI)", "F1", "support"], rows)
    patients = ""
    for s in splits:
        if "per_patient" in metrics[s]:
            rows = [[p, v["n"], v["accuracy"]] for p, v in metrics[s]["per_patient"].items()]
            patients += f"<h3>{s}</h3>" + _table(["patient", "images", "accuracy"], rows)
    figures = "".join(_img(out_dir / name) for name in ("training_curves.png", "confusion_matrix.png", "roc.png", "reliability.png"))
    body = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Leukoscope report</title>
<style>{STYLE}</style></head><body>
<h1>Leukoscope evaluation report</h1>
<p class="note">model <code>{html.escape(str(info.get('model', '')))}</code>, architecture <b>{html.escape(str(info.get('arch', '')))}</b>,
data <code>{html.escape(str(info.get('data', '')))}</code> ({html.escape(str(info.get('layout', '')))}),
split by <b>{html.escape(str(info.get('split_kind', '')))}</b>, classes: {html.escape(', '.join(class_names))}.
Probabilities are temperature-scaled (T = {html.escape(str(info.get('temperature', 'n/a')))}, fitted on the validation split).
{('Inference in <b>' + html.escape(str(info['precision'])) + '</b>.') if info.get('precision') else ''}
{('<b>' + html.escape(info['parent'].capitalize()) + '.</b>') if info.get('parent') else ''}</p>
<h2>Summary</h2>{summary}
<p class="note">Intervals are 95%: Wilson for accuracy and recall, stratified bootstrap (1,000 resamples) for balanced accuracy,
macro-F1 and ROC AUC. Macro averages are over the classes present in a split's true or predicted labels. "Out of domain" is the
share of images the model's out-of-distribution alarm flags (about 5% of in-domain images by construction).
{'In this binary task the positive class (ROC, sensitivity) is <b>' + html.escape(class_names[positive_index(class_names)]) + '</b>.' if len(class_names) == 2 else ''}
{html.escape(info['class_map_note']) if info.get('class_map_note') else ''}
{html.escape(info['adapt_note']) if info.get('adapt_note') else ''}</p>
{_operating_points(metrics, splits)}
<h2>Figures</h2>{figures}
{_gallery(out_dir, info.get('gallery', []))}
<h2>Per class</h2>{per_class}
{'<h2>Per patient</h2>' + patients if patients else ''}
<h2>Configuration</h2><pre>{html.escape(json.dumps(_config_as_run(info), indent=2, default=str))}</pre>
</body></html>"""
    path = out_dir / "report.html"
    with atomic_write(path, encoding="utf-8") as handle:  # a file name in another encoding is escaped there
        handle.write(body)
    return path
