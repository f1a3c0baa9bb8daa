"""``leukoscope`` command line: each subcommand is a thin wrapper over library code."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from . import __version__
from .errors import LeukoscopeError, closest


def _whole_number(text: str, minimum: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, ">= 1")


def _predict_batch(text: str) -> int:
    from .options import BATCH_LIMIT_WHY, MAX_BATCH

    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH}, got {value}: {BATCH_LIMIT_WHY}")
    return value


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535: a one-line usage error otherwise, not the socket's traceback."""
    port = _whole_number(text, 0, "0 or more")
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {port}")
    return port


def _number(text: str, low: float, high: float, bound: str) -> float:
    """A float in (low, high]: a one-line usage error otherwise (NaN included), as _whole_number for integers."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not low < value <= high:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, 0.0, float("inf"), "> 0")


def _add_adapt_steps(p: argparse.ArgumentParser) -> None:
    from .options import ENTROPY_STEPS

    p.add_argument("--adapt-steps", type=_non_negative_int, default=None, metavar="N",
                   help=f"with --adapt: gradient steps on the BatchNorm scales and shifts that make the predictions confident "
                        f"(entropy minimisation, Tent); 0 re-estimates the statistics only (AdaBN) (default {ENTROPY_STEPS} for "
                        "multi-class cell-window models such as wbc, 0 for central crops such as pbc and binary models such as "
                        "blast, where the steps were unstable or harmful)")


def _check_adapt_steps(args: argparse.Namespace) -> None:
    if args.adapt_steps is not None and not args.adapt:
        raise LeukoscopeError(f"--adapt-steps {args.adapt_steps} does nothing without --adapt: add --adapt, or drop it")


DATA_FORMATS = {".xlsx": "an Excel workbook", ".xls": "an Excel workbook", ".ods": "a spreadsheet", ".json": "JSON",
                ".jsonl": "JSON lines", ".parquet": "Parquet", ".feather": "Feather", ".h5": "HDF5", ".pkl": "a pickle"}


SHOWN_FAILURES = 3  # files whose error a command prints; the rest are in its CSV


def _tell_failures(failures: list[tuple[str, str]], rest: str) -> None:
    """Print why the first few files failed (one line each, on stderr), so that a single bad file needs no CSV opened."""
    for path, error in failures[:SHOWN_FAILURES]:
        print(f"{path}: error: {error}", file=sys.stderr)
    if len(failures) > SHOWN_FAILURES:
        print(f"... and {len(failures) - SHOWN_FAILURES} more: see {rest}", file=sys.stderr)


def _either(choices: tuple[str, ...]) -> str:
    return " or ".join(choices) if len(choices) < 3 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _check_out(out: str, inputs: list, kind: str, suffixes: tuple[str, ...]) -> None:
    """A file output must not replace one of the command's inputs (an image, the model) nor carry an image's or
    a model's extension, which is a mix-up of arguments: ``predict wbc a.jpg --out b.jpg`` wrote CSV over b.jpg."""
    from .io import IMAGE_EXTENSIONS, is_stream_output

    if out.endswith(("/", os.sep)) or os.path.isdir(out):  # `results/` was written as a file named `results`
        name = {".csv": "predictions", ".onnx": "model"}.get(suffixes[0], "report") + suffixes[0]
        raise LeukoscopeError(f"--out {out} names a folder, but this writes {kind} to a file: give a file name "
                              f"(e.g. {os.path.join(out, name)})")
    if is_stream_output(out):
        return
    if os.path.exists(out) and any(os.path.samefile(item, out) for item in inputs if os.path.exists(item)):  # inputs exist
        raise LeukoscopeError(f"--out {out} is one of this command's inputs; give a new file name (e.g. {Path(out).stem}{suffixes[0]})")
    suffix = Path(out).suffix.lower()
    if suffix in IMAGE_EXTENSIONS + (".pt", ".onnx", ".joblib") and suffix not in suffixes:
        raise LeukoscopeError(f"--out {out} names {'an image' if suffix in IMAGE_EXTENSIONS else 'a model'}, but this writes {kind}: "
                              f"give a {_either(suffixes)} file name")
    if suffix in DATA_FORMATS and suffix not in suffixes:  # a .xlsx of CSV text: Excel refuses to open it
        raise LeukoscopeError(f"--out {out}: this writes {kind}, not {DATA_FORMATS[suffix]}: give a {_either(suffixes)} file name"
                              + (" (Excel opens a .csv)" if suffix in (".xlsx", ".xls", ".ods") else ""))


def _probability(text: str) -> float:
    return _number(text, 0.0, 1.0, "in (0, 1]")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and a suggestion for a misspelt choice) instead of usage dumps."""

    def error(self, message: str):
        import re

        from .errors import did_you_mean

        if match := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            choices = [c.strip(" '") for c in match.group(2).split(",")]
            message += did_you_mean(match.group(1), choices)
        if match := re.search(r"the following arguments are required: (.*)", message):
            wanted = [self._option_string_actions.get(name.strip()) for name in match.group(1).split(",")]
            message += "".join(f" ({action.option_strings[-1]}: {action.help})" for action in wanted if action and action.help)
        raise LeukoscopeError(f"{self.prog}: {message}")


def _add_classes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", metavar="A,B,...",
                   help="choose among these of the model's classes only (a lab whose images hold only these types, e.g. "
                        "basophil,eosinophil,lymphocyte,monocyte,neutrophil); their probabilities are renormalised")


def _add_tta(parser: argparse.ArgumentParser) -> None:
    from .options import TTA_MODES

    parser.add_argument("--tta", choices=TTA_MODES, metavar="MODE",
                        help="test-time augmentation: none, flip (the image and its mirror image: 2x the cost) or dihedral "
                             "(8 rotations/flips) (default: the model's own setting)")
    parser.add_argument("--no-tta", dest="tta", action="store_const", const="none", help="same as --tta none")


def _add_backend(parser: argparse.ArgumentParser, precision: str = "auto") -> None:
    """--backend, --device and --precision; ``precision``: the default (evaluate's is fp32: its scores must not depend on
    the CPU it runs on, as auto's choice of int8 does)."""
    from .options import BACKENDS, DEVICES, PRECISIONS

    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="what runs a CNN checkpoint: auto (default: ONNX Runtime for CellNet, else PyTorch), torch or onnx")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto (default: CUDA when available), cpu or cuda (PyTorch with bf16 autocast)")
    parser.add_argument("--precision", default=precision, choices=PRECISIONS,
                        help="CPU inference of a checkpoint: int8 (its int8 graph on ONNX Runtime, built from a run's own images if "
                             "missing), fp32, or auto (int8 where that graph exists and, measured on the first batch, is "
                             f"faster here with the same calls); default {precision}")


def _yaml_mapping(text: str) -> dict:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{key: value}}', got {text!r}")
    return value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig option, typed, with the option's own help: nothing is restated here.

    Every flag defaults to None ("not given"), so that the config file's value stands unless overridden.
    """
    import typing

    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        kwargs: dict = {"dest": f.name, "default": None, "help": (f.metadata.get("help") or "").replace("%", "%%")}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "fractions":
            kwargs["type"] = _fractions
        elif base in (int, float, str):
            kwargs["type"] = {int: _positive_int if f.name in POSITIVE else int, float: float, str: str}[base]
            kwargs["choices"] = f.metadata.get("choices")
            if f.name == "target_sensitivity":
                kwargs["type"] = _probability
        else:  # a mapping (arch_kwargs, augment), given as YAML
            kwargs["type"], kwargs["metavar"] = _yaml_mapping, "YAML"
        parser.add_argument(flag, **kwargs)


POSITIVE = {"image_size", "min_image_size", "epochs", "batch_size", "patience"}


def _fractions(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions like 0.7,0.15,0.15, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config
    from .train import read_run_for_resume, train

    if args.resume:
        if args.data or args.out or args.config:
            raise LeukoscopeError("--resume RUN takes the data, output folder and options from RUN; give no DATA, --out or --config")
        data, config, command = read_run_for_resume(args.resume)
        metrics = train(data, args.resume, config, command=command, resume=True)
        _print_summary(metrics)
        print(f"run resumed and finished in {args.resume}")
        return 0
    if not args.data or not args.out:
        raise LeukoscopeError("train needs DATA and --out (or --resume RUN)")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = load_config(args.config, overrides)
    command = "leukoscope " + " ".join(shlex.quote(a) for a in args.argv)
    metrics = train(args.data, args.out, config, command=command, force=args.force)
    if not metrics:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if "cv" in metrics:
        print(f"cross-validation written to {Path(args.out) / 'cv.json'}")
        return 0
    _print_summary(metrics)
    print(f"run written to {args.out} (report: {Path(args.out) / 'report.html'})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command

    _check_adapt_steps(args)
    metrics = evaluate_command(args.model, args.data, args.out, tta=args.tta, target_sensitivity=args.target_sensitivity,
                               backend=args.backend, force=args.force, class_map=args.class_map, split_file=args.split,
                               adapt=args.adapt, adapt_steps=args.adapt_steps, device=args.device, precision=args.precision,
                               workers=args.workers, skip_unknown=args.skip_unknown, classes=args.classes)
    _print_summary(metrics)
    print(f"report written to {Path(args.out) / 'report.html'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .adapt import PURPOSE as ADAPT_PURPOSE
    from .classes import parse_classes, restrict_classes
    from .inference import iter_inputs, load_model, tta_mode
    from .io import is_stream_output
    from .predict import out_of_domain_warning, predict_csv
    from .progress import plural

    tta = None if args.tta is None else tta_mode(args.tta)
    _check_adapt_steps(args)
    predictor = load_model(args.model, backend="torch" if args.adapt else args.backend, device=args.device, precision=args.precision,
                           purpose=ADAPT_PURPOSE if args.adapt else None)
    classes = parse_classes(args.classes, predictor.class_names) if args.classes else None
    piped = _piped_image(args.inputs, args.adapt)
    files = [i for i in args.inputs if i != "-"]
    paths = [*piped, *(iter_inputs(files) if files else [])]
    if not paths:
        raise LeukoscopeError(f"no image files found in {', '.join(args.inputs)}")
    _check_out(args.out, [*paths[len(piped):], predictor.source], "CSV", (".csv", ".tsv", ".txt"))
    log = sys.stderr if is_stream_output(args.out) else sys.stdout  # the CSV may be going to stdout
    if args.adapt:
        from .adapt import adapt_to_files

        predictor = adapt_to_files(predictor, paths, args.adapt_steps, lambda text: print(text, file=sys.stderr))
    if classes:
        predictor, tta = restrict_classes(predictor, classes, tta), None
    total, failures, outside = predict_csv(predictor, paths, args.out, args.batch_size, tta, args.workers)
    if total == 0:  # a torchrun rank other than 0: rank 0 merges and reports
        return 0
    _tell_failures(failures, "the error column of " + ("the CSV" if is_stream_output(args.out) else args.out))
    if getattr(predictor.backend, "choice", None):
        print(f"precision auto: {predictor.backend.choice} ({predictor.backend.reason})", file=sys.stderr)
    warning = out_of_domain_warning(predictor, outside, len(paths) - len(failures))
    if warning:
        print(warning, file=sys.stderr)
    where = "standard output" if args.out == "-" else args.out
    print(f"{plural(len(paths) - len(failures), 'image')} predicted, {len(failures)} failed; written to {where}", file=log)
    return 1 if failures else 0


def _piped_image(inputs: list[str], adapt: bool) -> list:
    """The image piped into standard input where ``-`` is among the inputs (its row comes first), else nothing."""
    from .io import read_standard_input

    if "-" not in inputs:
        return []
    if inputs.count("-") > 1:
        raise LeukoscopeError("input '-' given twice: standard input holds one image")
    if adapt:
        raise LeukoscopeError("--adapt learns from a folder of one lab's images (32 or more), not one piped into standard input")
    return [read_standard_input()]


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_files
    from .inference import iter_inputs, load_model
    from .io import refuse_input_folder
    from .progress import plural
    from .runs import prepare_output_folder

    refuse_input_folder(args.out, args.inputs, "explain")
    prepare_output_folder(args.out, force=args.force, keep_splits=False, command="explain", what="heatmaps")
    predictor = load_model(args.model, backend="torch", device="cpu", purpose="explain (Grad-CAM reads the network's layers)")
    paths = iter_inputs(args.inputs)
    if not paths:
        raise LeukoscopeError(f"no image files found in {', '.join(args.inputs)}")
    done, failed = explain_files(predictor, paths, args.out, method=args.method, class_name=args.target_class)
    index = Path(args.out) / "explanations.csv"
    _tell_failures(failed, f"the error column of {index}")
    print(f"{plural(done, 'heatmap')}, {len(failed)} failed; written to {args.out} (index: {index})")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_images, export_onnx
    from .inference import iter_inputs, load_model
    from .io import is_stream_output
    from .progress import plural
    from .quantize import CALIBRATION_IMAGES

    predictor = load_model(args.model, backend="torch", device="cpu", purpose="export")  # checked in fp32 against the graph, also beside a GPU
    paths = iter_inputs(args.images) if args.images else []
    calibration_paths = iter_inputs(args.calibration) if args.calibration else []
    _check_out(args.out, [*paths, predictor.source, *calibration_paths], "an ONNX graph", (".onnx",))
    images = check_images(paths, predictor.view)
    what = plural(len(images), "real image") if paths else f"{len(images)} random images (pass --images for real cells)"
    stream = sys.stderr if is_stream_output(args.out) else sys.stdout
    if args.precision == "int8":
        if args.calibration:
            calibration = check_images(calibration_paths, predictor.view, limit=CALIBRATION_IMAGES, option="--calibration")
            source = f"calibrated on {len(calibration)} images"
        else:  # the checkpoint's own int8 graph (bundled, or built from a run's training images)
            calibration, source = None, "the model's own int8 graph"
        diff, agreement = export_onnx(predictor, args.out, images, calibration=calibration, int8=calibration is None)
        print(f"exported {args.out} (int8, {source}): the fp32 call on {agreement:.1%} of {what}, "
              f"max |p_int8 - p_fp32| = {diff:.3f}", file=stream)
        return 0
    diff = export_onnx(predictor, args.out, images, tolerance=args.tolerance)
    print(f"exported {args.out}: max |p_onnx - p_torch| = {diff:.2e} on {what} (tolerance {args.tolerance})", file=stream)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .classes import parse_classes, restrict_classes
    from .inference import load_model
    from .serve import addresses, listen, serve

    predictor = load_model(args.model, backend=args.backend, device=args.device, precision=args.precision)
    if args.classes:
        predictor = restrict_classes(predictor, parse_classes(args.classes, predictor.class_names))
    sock = listen(args.host, args.port)
    url, warning = addresses(args.host, sock.getsockname()[1])  # the port bound (--port 0: a free one)
    if warning:
        print(warning, file=sys.stderr)
    print(f"serving {args.model} at {url} (API docs: {url}docs)")
    serve(predictor, name=Path(str(args.model)).name, sock=sock)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    import json

    from .data.check import check_data, format_report
    from .io import atomic_write, is_stream_output

    if args.json:
        _check_out(args.json, [], "JSON", (".json",))
    # the JSON output is opened first: an unwritable --json fails before the check, not after its report
    with atomic_write(args.json) if args.json else contextlib.nullcontext() as handle:
        report = check_data(args.data)
        print(format_report(report), file=sys.stderr if args.json and is_stream_output(args.json) else sys.stdout)
        if handle is not None:
            json.dump(report, handle, indent=2)
    return 0 if report["ok"] else 1


def cmd_segment(args: argparse.Namespace) -> int:
    from .classical.segment import segment_files
    from .inference import iter_inputs
    from .io import refuse_input_folder
    from .progress import plural, progress
    from .runs import prepare_output_folder

    refuse_input_folder(args.out, args.inputs, "segment")
    prepare_output_folder(args.out, force=args.force, keep_splits=False, command="segment", what="masks and overlays")
    paths = iter_inputs(args.inputs)
    if not paths:
        raise LeukoscopeError(f"no image files found in {', '.join(args.inputs)}")
    rows = segment_files(progress(paths, desc="segment", unit="image"), args.out, mode=args.mode)
    for row in rows:
        if row["mode"] == "field" and not row["error"]:
            print(f"{row['path']}: smear field, {plural(int(row['leukocytes']), 'leukocyte')} found")
    failed = [(r["path"], r["error"]) for r in rows if r["error"]]
    index = Path(args.out) / "segmentation.csv"
    _tell_failures(failed, f"the error column of {index}")
    print(f"{plural(len(rows) - len(failed), 'image')} segmented, {len(failed)} failed; masks and overlays in {args.out} (index: {index})")
    return 1 if failed else 0


def cmd_count(args: argparse.Namespace) -> int:
    from .counting import count_command
    from .predict import looks_unlike
    from .runs import prepare_output_folder
    from .progress import plural

    prepare_output_folder(args.out, force=args.force, keep_splits=False, command="count")
    summary, failed = count_command(args.inputs, args.model, args.out, args.group_by, args.classes)
    _tell_failures(failed, f"the error column of {Path(args.out) / 'cells.csv'}")
    for row in (r for r in summary if r["image"] == "TOTAL"):
        blast = f", blasts {row['blast_percent']:.1f}%" if "blast_percent" in row else ""
        print(f"{row['slide']}: {plural(row['n_cells'], 'white cell')}{blast}" + (f"; {row['error']}" if row["error"] else ""))
    overall = [r for r in summary if r["image"] == "TOTAL"][-1]
    if (unlike := looks_unlike(overall["n_out_of_domain"], overall["n_cells"])) is not None:
        print(f"warning: {overall['n_out_of_domain']} of the {plural(overall['n_cells'], 'counted cell')} {unlike} the model's training "
              "images (in_domain false in cells.csv: another lab's stain or camera, or not white cells): check the overlays before "
              "trusting the differential", file=sys.stderr)
    print(f"cells.csv, summary.csv, overlays/ and report.html in {args.out}" + (f"; {plural(len(failed), 'image')} not counted (error column)" if failed else ""))
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .inference import bundled_models, resolve_model_path, tta_mode
    from .models import list_models
    from .progress import plural

    from .card import model_card, with_interval

    if args.name:
        print(model_card(args.name, load_checkpoint(resolve_model_path(args.name))), end="")
        return 0

    print("architectures: " + ", ".join(list_models()))
    bundled = bundled_models()
    if not bundled:
        print("bundled models: none")
    for name, path in sorted(bundled.items()):
        ckpt = load_checkpoint(path)
        test = ckpt.get("metrics", {}).get("test", {})
        scores = [f"{k} {with_interval(test, k, '')}" for k in ("accuracy", "balanced_accuracy", "macro_f1") if k in test]
        extra = ckpt.get("extra_metrics", {})
        scores += [f"{k} {with_interval(extra, k, '')}" for k, v in extra.items() if isinstance(v, float) and not k.endswith("_f1")]
        crop = (f", window on the located cell (nucleus {ckpt['cell']:.0%} of it)" if ckpt.get("cell")
                else f", central {ckpt['crop']:.0%} of each image" if ckpt.get("crop", 1.0) < 1 else "")
        crop += f", colour {ckpt['colour']}" if ckpt.get("colour") not in (None, "none") else ""
        mode = tta_mode(ckpt.get("tta"))
        tta = f", {mode} TTA by default" if mode != "none" else ""
        print(f"{name}: {ckpt['arch']} @ {ckpt['image_size']}px{crop}{tta}, classes {', '.join(ckpt['class_names'])}")
        print(f"    test ({plural(test.get('n', 0), 'image')}, 95% CI): {', '.join(scores)}")
        print(f"    trained by: {ckpt.get('train_command', '?')} (data manifest sha256 {ckpt.get('data_manifest_sha256', '?')[:16]}...)")
        print(f"    model card: leukoscope models {name}")
    return 0


def _print_summary(metrics: dict) -> None:
    for split, m in metrics.items():
        ci = m.get("accuracy_ci", [float("nan")] * 2)
        print(f"{split:5s} n={m['n']:5d} loss={m['loss']:.4f} acc={m['accuracy']:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f}) "
              f"bal_acc={m['balanced_accuracy']:.4f} macro_f1={m['macro_f1']:.4f} weighted_f1={m['weighted_f1']:.4f}")


def build_parser() -> argparse.ArgumentParser:
    from .options import MAX_BATCH

    parser = _Parser(prog="leukoscope", description="Blood-cell image classification with honest evaluation.")
    parser.add_argument("--version", action="version", version=f"leukoscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on a dataset folder", description="Train a model; writes splits, checkpoint and report into --out.")
    p.add_argument("data", nargs="?", help="dataset folder (image folder or C-NMC 2019 layout)")
    p.add_argument("--out", help="run folder to write")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from RUN/last.pt (same data and options)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out (its splits.csv is kept)")
    p.add_argument("--config", help="YAML file of training options (command-line flags override it)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model on a dataset and write the report")
    p.add_argument("model", help="run folder, checkpoint file or bundled model name")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="folder for metrics.json, figures and report.html")
    p.add_argument("--force", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--adapt", action="store_true",
                   help="adapt the network's BatchNorm layers to the test images first (statistics, then --adapt-steps of entropy "
                        "minimisation; no labels used)")
    _add_adapt_steps(p)
    p.add_argument("--split", metavar="SPLITS_CSV",
                   help="score each image as the split it has in this splits.csv (a run's), e.g. to reproduce a run's train/val/test")
    p.add_argument("--class-map", metavar="MAP",
                   help="score the model on data with other class names, many to one: e.g. Early=blast,Pre=blast,Pro=blast,Benign=normal "
                        "(probabilities of merged classes are summed; unnamed classes keep their names)")
    p.add_argument("--skip-unknown", action="store_true",
                   help="score only the images of classes the model knows (after --class-map or matching by name); "
                        "the others are counted and skipped instead of refused")
    _add_classes(p)
    _add_tta(p)
    p.add_argument("--target-sensitivity", type=_probability, help="binary tasks: choose the threshold on val for this sensitivity")
    p.add_argument("--workers", type=_non_negative_int, default=None, metavar="N",
                   help="cell-centric models, splits of 256+ files: decode in N forked processes (default: one per core); "
                        "0 or 1: threads in this process (central crops always decode in threads)")
    _add_backend(p, precision="fp32")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict image files and folders into a CSV")
    p.add_argument("model", help="run folder, checkpoint file or bundled model name")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively); @LIST for those a text file names, one per "
                                                  "line (@-: a list piped into standard input); - for an image piped into it")
    p.add_argument("--out", required=True, help="CSV file to write, or - for standard output")
    p.add_argument("--batch-size", type=_predict_batch, default=64, metavar="N",
                   help=f"images per batch, 1-{MAX_BATCH} (default 64; larger ones hold more memory, not faster)")
    p.add_argument("--workers", type=_non_negative_int, default=None, metavar="N",
                   help="runs of 256+ files: decode (and run the network) in N forked processes (default: one per core, "
                        "shared among torchrun's ranks; each holds about 40 MB of its own); 0 or 1: threads in this process")
    p.add_argument("--adapt", action="store_true",
                   help="adapt the network's BatchNorm layers to these images first (statistics, then --adapt-steps of entropy "
                        "minimisation; one lab's folder, 32+ images)")
    _add_adapt_steps(p)
    _add_classes(p)
    _add_tta(p)
    _add_backend(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="write Grad-CAM heatmaps of why each image got its class")
    p.add_argument("model", help="run folder, checkpoint file or bundled model name")
    p.add_argument("inputs", nargs="+", help="image files and/or folders; @LIST for those a text file names, one per line")
    p.add_argument("--out", required=True, help="folder for the heatmap PNGs and explanations.csv")
    p.add_argument("--method", default="gradcam", help="gradcam (default), gradcam++ or layercam")
    p.add_argument("--class", dest="target_class", help="explain this class instead of the predicted one")
    p.add_argument("--force", action="store_true", help="replace the heatmaps of an earlier explain in --out")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a model to ONNX, checked against PyTorch")
    p.add_argument("model", help="run folder, checkpoint file or bundled model name")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--images", nargs="+", help="real images or folders to check the export on (up to 64 used)")
    p.add_argument("--tolerance", type=_positive_float, default=1e-3, help="max allowed probability difference (default 1e-3)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="int8: convolutions quantised (ONNX Runtime static QDQ, per channel): the model's own int8 graph (bundled "
                        "models ship one; a run folder's is built from its training images), or one calibrated on --calibration "
                        "images; written only if it makes the fp32 call on at least 99%% of the --images")
    p.add_argument("--calibration", nargs="+", help="int8: training images or folders to calibrate on (up to 256 used, spread over them)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="run the web app and JSON API")
    p.add_argument("model", help="run folder, checkpoint file, exported .onnx or bundled model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free port)")
    _add_classes(p)
    _add_backend(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("segment", help="segment nucleus and cytoplasm (k-means colour clustering)")
    p.add_argument("inputs", nargs="+", help="image files and/or folders; @LIST for those a text file names, one per line")
    p.add_argument("--out", required=True, help="folder for masks, overlays and segmentation.csv")
    p.add_argument("--mode", choices=["auto", "single", "field"], default="auto",
                   help="single cell, smear field with several leukocytes, or auto (default)")
    p.add_argument("--force", action="store_true", help="replace the masks and overlays of an earlier segment in --out")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("count", help="find and classify every white cell of smear fields: a differential count",
                       description="Detect every white cell in each field, classify it, and write cells.csv, summary.csv (per image, "
                                   "per slide and in total, with blast_percent for a model with a blast class), overlay PNGs and "
                                   "report.html into --out.")
    p.add_argument("inputs", nargs="+", help="field images and/or folders (a folder is one slide); @LIST for those a text file "
                                                  "names, one per line")
    p.add_argument("--model", default="wbc", help="bundled name (wbc for a differential, blast for the blast percentage), run folder "
                                                 "or checkpoint (default: wbc)")
    p.add_argument("--out", required=True, help="folder for cells.csv, summary.csv, overlays/ and report.html")
    p.add_argument("--group-by", choices=["input", "parent"], default="input",
                   help="slides: each folder given (input, default) or each image's own folder (parent)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier count in --out")
    _add_classes(p)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("check-data", help="report classes, patients, sizes, unreadable files and duplicates")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("models", help="list architectures and bundled models, or show one model's card")
    p.add_argument("name", nargs="?", help="a bundled model (or checkpoint) whose model card to print")
    p.set_defaults(func=cmd_models)
    return parser


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit does not hit the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (captured, as in tests): nothing to flush
        pass


def _parse(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser], argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed. Inputs given after the options are inputs too (``predict wbc a/ --out p.csv b/``: argparse
    takes only the first run of them); anything else left over is an error naming the option it likely meant."""
    def hint() -> str:  # looked for only when parsing fails: a stat per argument is not every command's cost
        dashed = next((a for a in argv if a.startswith("-") and a != "-" and os.path.exists(a)), None)
        return f"; {dashed!r} is a file whose name starts with '-', read as an option: give it as {'./' + dashed!r}" if dashed else ""

    try:
        args, extras = parser.parse_known_args(argv)
    except LeukoscopeError as err:
        raise LeukoscopeError(f"{err}{hint()}") from None
    if extras and isinstance(getattr(args, "inputs", None), list) and not any(e.startswith("-") for e in extras):
        args.inputs += extras
        extras = []
    if extras:
        raise LeukoscopeError(_unrecognised(commands[args.command], extras) + hint())
    _refuse_empty(commands[args.command], args)
    args.argv = argv
    return args


def _refuse_empty(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An empty argument is an error, not the current folder (``Path("")`` is ``.``): ``--out "$OUT"`` or an input
    ``"$DIR"`` with the variable unset would otherwise read, or write into, wherever the command was started."""
    for action in command._actions:
        value = getattr(args, action.dest, None)
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            name = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest).upper()
            raise LeukoscopeError(f"{command.prog}: {name} is empty (an unset shell variable?)" + (f"; {name}: {action.help}" if action.help else ""))


def _unrecognised(command: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's 'unrecognized arguments', with the command's option its first flag likely meant
    (``--learning-rate`` -> ``--lr``, ``--batchsize`` -> ``--batch-size``)."""
    message = f"{command.prog}: unrecognized arguments: {' '.join(extras)}"
    flag = next((e.split("=")[0] for e in extras if e.startswith("-")), None)
    options = {o.lstrip("-").replace("-", "_"): o for a in command._actions for o in a.option_strings if o.startswith("--")}
    guess = closest(flag.lstrip("-").replace("-", "_"), options) if flag else None
    return message + (f" (did you mean {options[guess]}?)" if guess else "")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``timeout``, ``docker stop``, ``kill``) as an exception in the main thread, so that a
    command ends as on Ctrl-C: its output's temporary file removed, its decoding workers stopped, exit status 143."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated while a command runs (Python's default is to die at once, leaving both behind)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # main() called outside the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _escape_what_the_console_cannot_show() -> None:
    """A file name that the console's encoding cannot hold (Chinese under a Windows code page, any non-ASCII name under
    LANG=C or LC_ALL=C, as in many containers and cron jobs) is printed escaped (``\\u7d30``) instead of raising
    UnicodeEncodeError after the work is done; lone surrogates (a name's bytes that are not text in the locale's
    encoding) are written back as those bytes, as Python's own surrogateescape does for such a console."""
    import codecs

    def escape(err: UnicodeError) -> tuple[bytes, int]:
        if not isinstance(err, UnicodeEncodeError):
            raise err
        text = err.object[err.start : err.end]
        return b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("ascii", "backslashreplace")
                        for c in text), err.end

    codecs.register_error("leukoscope.console", escape)
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="leukoscope.console")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _escape_what_the_console_cannot_show()
    parser = build_parser()
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv:  # a first try with no arguments: what the commands are, not only that one is missing
        parser.print_help()
        return 2
    if argv[0] == "help":  # `leukoscope help [COMMAND]`, as git and pip take it
        argv = [*argv[1:2], "--help"]
    if not argv[0].startswith("-") and argv[0] not in commands:
        from .errors import did_you_mean

        hint = did_you_mean(argv[0].lower(), commands)
        print(f"leukoscope: error: unknown command {argv[0]!r}{hint}; commands: {', '.join(commands)}", file=sys.stderr)
        return 2
    args = None
    try:
        args = _parse(parser, commands, argv)
        with _sigterm_raises():
            return args.func(args)
    except LeukoscopeError as err:
        print(f"leukoscope: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `predict ... --out - | head`: the reader stopped reading; end quietly, as cat does
        _discard_stdout()
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE
    except OSError as err:  # an output that cannot be written: a folder, no permission, a full disk
        out = getattr(args, "out", None)
        if err.errno == errno.ENOSPC and not err.filename and out:  # a write, not an open: the error names no file
            err = f"no space left on the disk of --out {out}: free some space there, or give an --out on another disk"
        print(f"leukoscope: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"leukoscope: {'terminated' if terminated else 'interrupted'}{_resume_hint(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _resume_hint(args: argparse.Namespace | None) -> str:
    """How to continue a training run that was stopped after an epoch was saved; '' for anything else."""
    run = (args.out or args.resume) if getattr(args, "command", None) == "train" else None
    if run is None or not (Path(run) / "last.pt").is_file():
        return ""
    return f"; continue it with: leukoscope train --resume {shlex.quote(str(run))}"
