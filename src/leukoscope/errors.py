"""Errors meant for the user: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Iterable


class LeukoscopeError(Exception):
    """A problem with the user's input (path, option, data) rather than a bug."""


class NotAFolderError(LeukoscopeError, NotADirectoryError):
    """A file where an output's folder would be: the user's to fix (a one-line error), and an OSError to code that
    falls back when it cannot write (the ONNX graph cache)."""


# what loading a pickle (torch.load, joblib.load) of a file that is not one raised, on 300 random and 80 damaged files:
# KeyError for a text file, IndexError for a cut one
UNPICKLING_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, pickle.UnpicklingError)


def first_line(err: BaseException, limit: int = 120) -> str:
    """An exception's first line, for a one-line message (its type when it says nothing)."""
    return (str(err).splitlines() or [type(err).__name__])[0][:limit]


SYNONYMS = {"gpu": "cuda", "pytorch": "torch", "onnxruntime": "onnx", "ort": "onnx", "float32": "fp32", "float": "fp32",
            "bfloat16": "bf16", "quantized": "int8", "uint8": "int8",  # what users type for --device, --backend, --precision
            # and for training options, as other tools name them (flags and YAML keys alike)
            "learning_rate": "lr", "learningrate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
            "img_size": "image_size", "input_size": "image_size", "model": "arch", "architecture": "arch", "bs": "batch_size",
            "batchsize": "batch_size", "wd": "weight_decay", "smoothing": "label_smoothing", "output": "out", "o": "out"}


def closest(value: str, choices: Iterable[str]) -> str | None:
    """The choice that ``value`` most likely meant: its common synonym (gpu -> cuda) or a close spelling; None if none."""
    choices = list(choices)
    if SYNONYMS.get(value.lower()) in choices:
        return SYNONYMS[value.lower()]
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' when a close match (or a common synonym: gpu -> cuda) exists, else ''."""
    guess = closest(value, choices)
    return f" (did you mean {guess!r}?)" if guess is not None else ""
