"""Output folders of train and evaluate: never overwritten silently.

A run folder that already holds results is refused unless the user says ``--force``; then only a
folder that leukoscope itself wrote is cleared (a typo such as ``--out ~`` must never delete a
home directory). A folder holding nothing but a ``splits.csv`` is a split given to reuse.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .errors import LeukoscopeError

SPLITS_FILE = "splits.csv"
# Files that only leukoscope writes at the top of a run or evaluation folder: their presence
# marks a folder as ours, safe to clear with --force.
MARKERS = ("run.json", "model.pt", "last.pt", "model.joblib", "metrics.json", "report.html")
MODELS = ("model.pt", "last.pt", "model.joblib")


def prepare_output_folder(out: str | os.PathLike, force: bool = False, keep_splits: bool = True, command: str = "train") -> None:
    """Refuse a non-empty ``out`` (nothing touched); with ``force`` clear it first.

    With ``keep_splits`` a ``splits.csv`` already there stays (train reuses it, so a forced
    re-train is evaluated on the same split); delete it to split again.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LeukoscopeError(f"--out {str(out)!r} is a file, not a folder; give a folder for the {command} outputs")
    kept = {SPLITS_FILE} if keep_splits else set()
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    others = [name for name in present if name not in kept]
    if not others:
        return
    if not force:
        resume = " or `leukoscope train --resume RUN` to continue it" if command == "train" and (out / "last.pt").is_file() else ""
        raise LeukoscopeError(f"--out {str(out)!r} already holds {_files(len(others))} (e.g. {others[0]}); "
                              f"choose a new folder, or add --force to replace them{resume}")
    if command != "train" and any((out / name).is_file() for name in MODELS):
        raise LeukoscopeError(f"--out {str(out)!r} is a training run (it holds a model); write the {command} outputs to another folder")
    if not any((out / marker).is_file() for marker in MARKERS):
        raise LeukoscopeError(f"--out {str(out)!r} holds {_files(len(others))} that leukoscope did not write (e.g. {others[0]}); "
                              "--force only clears a folder of leukoscope results: choose a new folder")
    for name in others:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    note = f"; kept {SPLITS_FILE} (same split: delete it to split again)" if SPLITS_FILE in present and keep_splits else ""
    print(f"--force: cleared {_files(len(others))} of the earlier results in {out}{note}", file=sys.stderr)


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"
