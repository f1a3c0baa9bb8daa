"""Files in and out: finding the images a user gives (files, folders, skipping results and companions), and writing
outputs safely (atomic renames, streams, devices). Bottom layer: no torch, no image decoding (see images)."""

from __future__ import annotations

import codecs
import contextlib
import errno
import functools
import glob
import hashlib
import io
import os
import re
import socket
import stat
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self, TypeVar

from .errors import LeukoscopeError, NotAFolderError

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".gif", ".webp", ".jp2", ".avif", ".heic", ".heif")
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vsi", ".czi", ".bif", ".isyntax", ".vms", ".vmu")  # whole-slide scans: not read
COMPANION_EXTENSIONS = (".csv", ".tsv", ".txt", ".json", ".xml", ".md", ".yaml", ".yml", ".ini", ".db", ".log", ".html", ".pdf")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".7z", ".rar", ".bz2", ".xz")  # not read, named in predict's note
GLOB_CHARACTERS = "*?["  # an input with these that names nothing is read as a pattern (see expand_patterns)
# Files that leukoscope's own output folders hold: a training run, an evaluation, a count, explanations, segmentations.
# A folder below the one given that holds one of these sets is results, not data: a run written inside its data
# folder must not become a class of the next training (its report PNGs as "images"), nor a count's overlays fields.
RESULT_MARKERS = (("run.json",), ("metrics.json", "report.html"), ("cells.csv", "summary.csv"), ("explanations.csv",), ("segmentation.csv",))


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def not_found_hint(text: str) -> str:
    """Why a path that names nothing was likely meant otherwise: a URL (nothing is downloaded), or a '~' that the
    shell did not expand because it was quoted. '' when neither."""
    if text == "-":
        return ("; '-' (an image piped into standard input) is read by predict only: save it to a file for this command, or "
                "`leukoscope predict MODEL - --out -`")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        return "; it is a URL, and leukoscope reads local files only (it downloads nothing): download it and give its path"
    if text.startswith("~") and (home := os.path.expanduser(text)) != text and os.path.exists(home):
        return f"; a quoted '~' is not expanded: did you mean {home!r}?"
    if any(c in text for c in GLOB_CHARACTERS):
        return "; as a pattern it matches no file either"
    return ""


LIST_PREFIX = "@"  # "@cells.txt": the images and folders that text file names, one per line


def list_file(text: str) -> Path | None:
    """The text file an input of the form ``@LIST`` names, or None: when ``text`` names a file itself (an image whose
    name begins with '@'), it is that file."""
    if not text.startswith(LIST_PREFIX) or os.path.lexists(text):
        return None
    return Path(text[len(LIST_PREFIX):])


def read_list(path: Path) -> list[str]:
    """The non-blank lines of a list file (``-``: standard input, as ``find ... | leukoscope predict MODEL @-``),
    stripped. A one-line error for a list that cannot be read or names nothing."""
    name = f"{LIST_PREFIX}{path}" + (" (standard input)" if os.fspath(path) == "-" else "")
    if os.fspath(path) == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise LeukoscopeError("@- reads the list of images from standard input, but nothing is piped into it "
                                  "(e.g. find cells -name '*.jpg' | leukoscope predict wbc @- --out predictions.csv)")
        text = sys.stdin.buffer.read().decode("utf-8-sig", "surrogateescape") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    else:
        try:  # -sig: the byte-order mark Windows' Notepad writes
            text = Path(path).read_bytes().decode("utf-8-sig", "surrogateescape")
        except (FileNotFoundError, NotADirectoryError):
            raise LeukoscopeError(f"list {name}: {os.fspath(path)!r} does not exist (an input of the form @FILE is a text "
                                  "file naming one image or folder per line)") from None
        except IsADirectoryError:
            raise LeukoscopeError(f"list {name}: {os.fspath(path)!r} is a folder: give the folder itself, without '@'") from None
        except OSError as err:
            raise LeukoscopeError(f"list {name}: {err.strerror or err}") from None
    if "\0" in text:
        raise LeukoscopeError(f"{name} is not a text file (one image or folder per line)")
    if not (entries := [line.strip() for line in text.splitlines() if line.strip()]):
        raise LeukoscopeError(f"list {name} names no images (it should hold one image or folder per line)")
    return entries


def _beside(entry: str, listed: Path) -> str:
    """A list's relative entry as found from the current folder, or else from the list's own folder (``ls > list.txt``
    in the images' folder, the command run from elsewhere)."""
    if os.path.isabs(entry) or os.path.lexists(entry) or os.fspath(listed) == "-":
        return entry
    there = listed.parent / entry
    return os.fspath(there) if os.path.lexists(there) else entry


def expand_lists(inputs: Iterable[str | os.PathLike]) -> list[str | os.PathLike]:
    """Each input of the form ``@LIST`` replaced by the images and folders its text file names, one per line."""
    expanded: list[str | os.PathLike] = []
    for item in inputs:
        if (listed := list_file(item) if isinstance(item, str) else None) is None:
            expanded.append(item)
            continue
        entries = expand_patterns([_beside(entry, listed) for entry in read_list(listed)])
        if missing := missing_inputs(entries):
            raise LeukoscopeError(f"list {item}: {missing[0]!r} does not exist{not_found_hint(missing[0])} (relative "
                                  "paths in a list are read from the current folder, or else from the list's own)")
        expanded.extend(entries)
    return expanded


def expand_patterns(inputs: Iterable[str | os.PathLike]) -> list[str | os.PathLike]:
    """Each input that names nothing but is a pattern (``cells/*.jpg``: quoted, or from a shell that leaves patterns
    as they are, as Windows' does) replaced by the files and folders it matches, sorted; ``**`` matches subfolders.
    A pattern that matches nothing stays, to be reported as missing."""
    expanded: list[str | os.PathLike] = []
    for item in inputs:
        text = os.fspath(item)
        matches = [] if os.path.lexists(text) or not any(c in text for c in GLOB_CHARACTERS) else sorted(glob.glob(text, recursive=True))
        expanded.extend(matches or [item])
    return expanded


NAME_BYTES = 160  # an output named after an input keeps this much of its name, leaving room for a suffix and atomic_write's
# temporary name (".NAME.xxxxxxxx") within the 255 bytes of a file name


def _first_bytes(text: str, limit: int) -> str:
    """The longest start of ``text`` whose UTF-8 form holds at most ``limit`` bytes (cut at a character)."""
    kept, size = [], 0
    for ch in text:
        size += len(ch.encode("utf-8", "surrogateescape"))
        if size > limit:
            break
        kept.append(ch)
    return "".join(kept)


def output_name(stem: str, used: set[str]) -> str:
    """A file name (without extension) for an output made from an input's ``stem``, unique among ``used`` (``_2``,
    ``_3``, ...; added to it), and short enough for any suffix: a stem of over NAME_BYTES bytes (in UTF-8) is cut at a
    character, with a hash of the whole stem after a ``~`` to keep apart names that begin alike."""
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) > NAME_BYTES:
        stem = _first_bytes(stem, NAME_BYTES - 9) + "~" + hashlib.sha1(raw).hexdigest()[:8]
    name, i = stem, 1
    while name in used:
        i += 1
        name = f"{stem}_{i}"
    used.add(name)
    return name


T = TypeVar("T")


def once_each(items: Iterable[T], path: Callable[[T], str | os.PathLike]) -> tuple[list[T], int]:
    """``items`` in order, each file once (by its real path: a folder and a file in it, one folder given twice, or two
    links to one file name it twice), and how many repeats were dropped."""
    kept, seen, repeated = [], set(), 0
    for item in items:
        if (real := os.path.realpath(path(item))) in seen:
            repeated += 1
            continue
        seen.add(real)
        kept.append(item)
    return kept, repeated


def missing_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """The inputs that name nothing on disk (a broken symlink does name a file: it becomes an error row)."""
    return [str(item) for item in inputs if not Path(item).exists() and not Path(item).is_symlink()]


def refuse_empty_paths(items: Iterable[T]) -> list[T]:
    """``items`` as a list; a one-line error for an empty path among them, which ``Path("")`` would read as the current
    folder (an unset variable in ``predict("$DIR")``)."""
    items = list(items)
    if any(isinstance(item, str) and not item.strip() for item in items):
        raise LeukoscopeError("an empty path among the images: give image files or folders (an unset variable?)")
    return items


STDIN_LIMIT = 512 * 1024 * 1024  # bytes read from standard input at most: a 40 Mpixel TIFF holds 120 MB


class EncodedImage(bytes):
    """An image file's bytes in memory, as an upload is, with the name outputs give it: ``-`` for standard input, an
    open file's own name."""

    def __new__(cls, data: bytes, name: str) -> Self:
        image = super().__new__(cls, data)
        image.name = name
        return image


def read_standard_input() -> EncodedImage:
    """The image piped into the command (``cat cell.jpg | leukoscope predict wbc - --out -``); a one-line error where
    nothing is piped in (a terminal would wait for typing), it is empty, or it is larger than any image read."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None or sys.stdin.isatty():
        raise LeukoscopeError("input '-' reads an image piped into standard input, but none is: "
                              "`cat cell.jpg | leukoscope predict wbc - --out -`")
    data = stream.read(STDIN_LIMIT + 1)
    if not data:
        raise LeukoscopeError("input '-': standard input is empty; pipe an image into it")
    if len(data) > STDIN_LIMIT:
        raise LeukoscopeError(f"input '-': standard input holds more than {STDIN_LIMIT // 2**20} MB, more than an image; "
                              "give a file or folder instead")
    return EncodedImage(data, "-")


def iter_image_files(inputs: Iterable[str | os.PathLike], skipped: Counter[str] | None = None) -> Iterator[Path]:
    """Yield files given directly, and image files found recursively in folders (sorted).

    Folders' hidden files and folders are passed over, as the dataset layouts do: the ``._NAME.jpg``
    metadata twin that macOS writes beside every image on a USB drive or a network share (and into a
    zip's ``__MACOSX`` folder) is no image, nor is anything under ``.git`` or ``.Trashes``.
    With ``skipped``, count there by extension (lower case) the other files of those folders passed
    over that a user may have expected to be read (HEIC photos, camera raw files): not a dataset's
    usual companions (CSV, text, JSON, ...)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in walk(path, skip_hidden=True):
                for name in sorted(n for n in files if not n.startswith(".")):
                    candidate = Path(root) / name
                    if is_image_file(candidate):
                        yield candidate
                    elif skipped is not None and candidate.suffix.lower() not in COMPANION_EXTENSIONS:
                        skipped[candidate.suffix.lower() or "(none)"] += 1
        else:
            yield path


def csv_delimiter(text: str) -> str:
    """The delimiter of a CSV file from its header line: ',' or, as Excel saves "CSV" where the decimal mark is a
    comma (German, French, ... settings), ';', or a tab; whichever splits the header into the most columns."""
    header = text.split("\n", 1)[0]
    return max((",", ";", "\t"), key=header.count)


def printable(name: str) -> str:
    """A folder or file name as text: bytes that are not UTF-8 (Latin-1 from an old archive, which Python
    decodes to lone surrogates) written as ``\\xNN``, in Unicode's composed form (NFC: macOS writes names
    decomposed, so one "é" folder copied from a Mac and one from Windows are one label). For names that
    become labels, shown in plots and reports, or are matched against a manifest."""
    return unicodedata.normalize("NFC", _escape_undecodable(name))


def _escape_undecodable(text: str) -> str:
    """``text`` with a file name's undecodable bytes (lone surrogates, as Python decodes them) as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte decodes to: escaped as itself
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def walk(root: str | os.PathLike, skip_hidden: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` in sorted order that follows symlinked folders (a lab's folders of links) but enters each
    real folder once, so that a link back up the tree (a loop) or two links to one folder repeat nothing.

    A link to a folder that is itself walked under ``root`` is not followed: that folder is read under its own
    name, so that ``blast -> normal`` cannot file the normal images under ``blast`` by sorting first. With
    ``skip_hidden``, folders whose names start with a dot are not entered (a link to one is followed). A folder of
    leukoscope's results below ``root`` (RESULT_MARKERS) is not entered either, with a note."""
    def entered(names: list[str]) -> list[str]:
        return sorted(d for d in names if not (skip_hidden and d.startswith(".")))

    inside: set[tuple[int, int] | None] | None = None  # the folders walked without following links; listed at the first link
    seen: set[tuple[int, int]] = set()
    for current, dirs, files in os.walk(root, followlinks=True):
        key = _folder_key(current)
        if key is None or key in seen or (seen and _results_note(current, files)):  # seen: below root, which comes first
            dirs[:] = []
            continue
        seen.add(key)
        kept = []
        for name in entered(dirs):
            folder = os.path.join(current, name)
            if os.path.islink(folder):
                if inside is None:
                    inside = _real_folders(root, entered)
                if _folder_key(folder) in inside:
                    continue
            kept.append(name)
        dirs[:] = kept
        yield current, dirs, files


def _results_note(folder: str, files: list[str]) -> bool:
    """Whether ``folder`` holds leukoscope's results (see RESULT_MARKERS); if so, say that it is left out."""
    names = set(files)
    marker = next((m for m in RESULT_MARKERS if names.issuperset(m)), None)
    if marker is not None:  # progress imported here, not at the top: io stays free of tqdm for commands that walk no folder
        from .progress import note

        note(f"left out {printable(folder)}: leukoscope's results ({', '.join(marker)}), not data")
    return marker is not None


def _real_folders(root: str | os.PathLike, entered: Callable[[list[str]], list[str]]) -> set[tuple[int, int] | None]:
    """The folders under root reached without following a link."""
    found = set()
    for current, dirs, _ in os.walk(root):
        dirs[:] = entered(dirs)
        found.add(_folder_key(current))
    return found


def _folder_key(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def regular_file_stat(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of a regular file (symlinks followed); OSError for anything else, before it is opened:
    opening a FIFO waits for a writer forever and a device such as /dev/zero never ends."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)", str(path))
    return status


def cache_root() -> Path:
    """Where derived files (feature tables, ONNX graphs) are kept: ``$LEUKOSCOPE_CACHE``, ``$XDG_CACHE_HOME/leukoscope``
    or ~/.cache/leukoscope; where no home folder is known (a container run under a user id without one, HOME unset),
    a folder of this user's in the system's temporary directory."""
    if os.environ.get("LEUKOSCOPE_CACHE"):
        return Path(os.environ["LEUKOSCOPE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "leukoscope"
    try:
        return Path.home() / ".cache" / "leukoscope"
    except RuntimeError:
        return _private_temp_folder()


def _private_temp_folder() -> Path:
    """``leukoscope-cache-UID`` in the temporary directory, made or found this user's and closed to others' writes,
    reused from run to run; a new folder where that name is someone else's (a shared folder must not feed a model
    graphs that another user put there)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / f"leukoscope-cache-{uid if uid is not None else 'user'}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        status = path.lstat()
        if stat.S_ISDIR(status.st_mode) and uid in (None, status.st_uid) and not status.st_mode & 0o022:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="leukoscope-cache-"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    regular_file_stat(path)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


STDOUT = "-"  # an output path that means standard output


def is_stream_output(path: str | os.PathLike) -> bool:
    """True for outputs that must be written as a stream, never replaced: ``-``, a character
    device, a FIFO or a socket (directly or through symlinks), and anything under /dev or /proc
    (``/dev/stdout`` of a process whose output goes to a file)."""
    if str(path) == STDOUT:
        return True
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet (or a file where a folder of the path would be)
        return False
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    return not stat.S_ISREG(mode) or os.path.abspath(path).startswith(("/dev/", "/proc/"))


def refuse_stream_folder(out: str | os.PathLike, command: str) -> None:
    """A command that writes a folder cannot write it to ``-`` (standard output) or a device such as /dev/stdout."""
    if not Path(out).is_dir() and is_stream_output(out):
        raise LeukoscopeError(f"--out {str(out)!r} is standard output or a device, but {command} writes a folder of files; "
                              f"give a folder, e.g. --out {command}_results")


def refuse_file_as_folder(out: str | os.PathLike, what: str) -> None:
    """A one-line error where the folder --out names is a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise LeukoscopeError(f"--out {str(out)!r} is a file, not a folder; give a folder for the {what}")


def make_output_folder(out: str | os.PathLike, what: str) -> Path:
    """The folder ``out``, created if needed; a one-line error naming --out where it is a file or cannot be made."""
    refuse_file_as_folder(out, what)
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LeukoscopeError(f"cannot create --out {str(out)!r}: {err.strerror or err}; give a folder you can write") from None
    return folder


def refuse_input_folder(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], command: str) -> None:
    """A command that writes a folder of images (explain, segment) cannot write it into a folder it reads: its PNGs
    would lie among the lab's images, and be read as images by the next run on that folder."""
    target = Path(out).resolve()
    for given in inputs:
        if Path(given).is_dir() and Path(given).resolve() == target:
            raise LeukoscopeError(f"--out {str(out)!r} is the folder of images given to {command}: its outputs would be mixed with "
                                  f"the images, and read as images next time; give a folder of its own, e.g. --out {command}_results")


@functools.cache
def _escape_bytes() -> str:
    """The name of a codec error handler that writes what ``_escape_undecodable`` does (``\\xNN``, what
    ``ls -b`` shows) where text cannot be encoded; registered on first use."""
    codecs.register_error("leukoscope.escape_bytes", lambda err: ("".join(map(_escape_undecodable, err.object[err.start : err.end])), err.end))
    return "leukoscope.escape_bytes"


# A temporary output is named .NAME.<host>-<pid>-<random>: a process killed outright (kill -9, the out-of-memory
# killer) cannot remove its own, so the next write of NAME removes those of processes of this host that have ended.
_TEMP_OWNER = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


@functools.lru_cache(maxsize=256)
def _hidden_names(folder: Path) -> tuple[str, ...]:
    """The names starting with a dot in ``folder``, listed once per process: a command writing thousands of overlays
    into one folder lists it once, not once per file."""
    try:
        return tuple(name for name in os.listdir(folder) if name.startswith("."))
    except OSError:
        return ()


STALE_SECONDS = 900  # a temporary file untouched this long, of a process that has ended, is left over


def remove_stale_temporaries(folder: Path, prefix: str) -> None:
    """Remove the temporary files (see atomic_write) that processes of this host which have ended left for one output:
    only names of the exact pattern, untouched for STALE_SECONDS, never one that a live process, another host (a
    shared drive) or a process of another PID namespace with this host's name (a container) may still be writing."""
    pattern = re.compile(re.escape(prefix + _TEMP_OWNER) + r"-(\d+)-[A-Za-z0-9_]{8}")
    for name in _hidden_names(folder):
        if not name.startswith(prefix) or not (match := pattern.fullmatch(name)) or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if time.time() - (folder / name).stat().st_mtime > STALE_SECONDS:
                (folder / name).unlink()


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open an output file so that a failure never leaves it half-written and nothing else is clobbered.

    A regular file (or a new path) is written to a temporary file beside it and renamed into place
    only on success, keeping the old file's permissions. A symlink is written through: the rename
    happens at its target, so the link stays. ``-`` (standard output), devices and FIFOs are
    written as streams: nothing is ever renamed over something that is not a regular file.
    Text that cannot be encoded (a file name in another encoding than UTF-8, as old archives hold,
    reaches Python as lone surrogates) is written escaped (``caf\\xe9.jpg``), so that the output stays
    valid UTF-8 for pandas or a spreadsheet, instead of failing after the work is done.
    """
    if "b" not in mode:
        kwargs.setdefault("errors", _escape_bytes())
    if is_stream_output(path):
        if str(path) == STDOUT and "b" in mode:
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
        elif str(path) == STDOUT and hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            kwargs.setdefault("encoding", sys.stdout.encoding)
            stream = io.TextIOWrapper(sys.stdout.buffer, write_through=True, **kwargs)
            try:
                yield stream
                stream.flush()
            finally:
                stream.detach()  # sys.stdout keeps its buffer open
        elif str(path) == STDOUT:  # a text stream without bytes beneath (redirected in-process)
            yield sys.stdout
        else:
            with open(path, mode, **kwargs) as handle:
                yield handle
        return
    target = Path(os.path.realpath(path))  # through symlinks, dangling ones included
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # which part of the path is a file: looked for only when one is
        blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        if blocking is None:
            raise
        raise NotAFolderError(f"cannot write {str(path)!r}: {str(blocking)!r} is a file, not a folder") from None
    permissions = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644  # mkstemp's 0600 would hide outputs
    prefix = f".{_first_bytes(target.name, 200)}."  # a long name still fits
    remove_stale_temporaries(target.parent, prefix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{_TEMP_OWNER}-{os.getpid()}-", dir=target.parent)
    except OSError as err:  # read-only, no permission: said of the output, not of the temporary name beside it
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.chmod(tmp, permissions)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
