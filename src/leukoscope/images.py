"""Image files and bytes to 8-bit RGB arrays, and the square a model sees of them (``View``, ``frame``).

Every input goes through here: files, uploads, arrays and PIL images, in train, evaluate, predict, serve, explain and
export. Bottom layer: no torch; only the localise and stain helpers, and io's file checks, below it."""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, ImageSequence, UnidentifiedImageError

from . import localise, stain
from .io import IMAGE_EXTENSIONS, not_found_hint, regular_file_stat
from .progress import plural

MAX_PIXELS = 40_000_000  # images are read within this many pixels (decompression-bomb guard, checked on the header):
WHOLE_DECODE = 4  # a JPEG at its decoder's 1/2-1/8 scale; other formats, which decode whole, up to 4x it, then halved


# What the decoders' parsers (tifffile, pi-heif, PIL's plugins) raise on a damaged file, found by flipping bytes of real
# TIFF, ImageJ, OME-TIFF, HEIC, PNG, JPEG and WebP files: errors of many kinds, each a file that cannot be read.
PARSER_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, ZeroDivisionError, AssertionError,
                 AttributeError, OverflowError, SyntaxError, EOFError, struct.error)


class ImageReadError(Exception):
    """A single file could not be turned into an RGB image; the message is short."""


def load_rgb(path: str | os.PathLike, size: int | None = None, draft: bool = True, crop: float = 1.0) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (H, W, 3).

    With ``size``, the central square (``crop`` of the shorter side) is resized to ``size x size``; with ``draft``,
    JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) that still covers ``size``, which is
    several times faster for large JPEGs. Raises ImageReadError with a short reason for
    anything that is not a readable image.
    """
    path = _readable(path)
    if path.suffix.lower() in (".jpg", ".jpeg") and (size is None or draft):
        data = path.read_bytes()
        fast = decode_jpeg_fast(data, size, crop)
        if fast is not None:
            return fast
    return _decode(path, size, draft, str(path), crop=crop)


def _readable(given: str | os.PathLike) -> Path:
    path = Path(given)
    if path.is_dir():
        raise ImageReadError("is a directory")
    if not path.exists():
        raise ImageReadError("file not found" + not_found_hint(os.fspath(given)) if not path.is_symlink() else "broken symlink")
    try:
        size = regular_file_stat(path).st_size
    except OSError as error:
        raise ImageReadError(error.strerror) from None
    if size == 0:
        raise ImageReadError("empty file")
    return path


def decode_bytes(data: bytes, size: int | None = None, max_pixels: int = MAX_PIXELS, crop: float = 1.0) -> np.ndarray:
    """Like ``load_rgb`` for an image held in memory (an upload); refuses more than ``max_pixels``."""
    if not data:
        raise ImageReadError("empty file")
    fast = decode_jpeg_fast(data, size, crop, max_pixels)
    if fast is not None:
        return fast
    return _decode(io.BytesIO(data), size, True, "", max_pixels, crop)


def decode_jpeg_fast(data: bytes, size: int | None = None, crop: float = 1.0, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """A JPEG decoded by libjpeg-turbo through simplejpeg, with the pixels of PIL's decoder (both
    libjpeg-turbo, accurate IDCT and upsampling; tests/test_hostile.py): whole (``size`` None), about
    2x faster than PIL on PBC's 360 px JPEGs (0.45 ms against 1.0 ms); or, with ``size``, at the
    smallest DCT scale that still covers it as PIL's draft mode does (about 25% faster), then cropped
    and resized. None where it does not apply (not a JPEG, an EXIF orientation to honour, CMYK, a
    damaged or oversized file): the caller then decodes with PIL."""
    if size is None:
        return _jpeg_scaled(data, max_pixels, lambda height, width: 1)
    need = int(np.ceil(size / crop))

    def draft(height: int, width: int) -> int:  # PIL's draft mode scales by 1/2, 1/4 or 1/8 only: the same factor
        ratio = min(width // need, height // need)
        return next(s for s in (8, 4, 2, 1) if ratio >= s or s == 1)

    decoded = _jpeg_scaled(data, max_pixels, draft)
    return None if decoded is None else resize_center_crop(decoded, size, crop)


def _jpeg_scaled(data: bytes, max_pixels: int, factor: Callable[[int, int], int]) -> np.ndarray | None:
    """A JPEG decoded by libjpeg-turbo (simplejpeg) at 1/``factor(height, width)`` of its size, in the
    DCT (the sizes ``Image.reduce`` gives); None where that does not apply (see ``decode_jpeg_fast``; a colour
    profile other than sRGB's, which PIL's path applies)."""
    if data[:2] != b"\xff\xd8" or data.find(b"Exif", 0, 65536) >= 0 or _jpeg_icc(data) not in (None, b""):
        return None
    try:
        import simplejpeg

        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = max(factor(height, width), jpeg_reduction(width, height, max_pixels) or 0)
        if height * width > max_pixels * scale * scale:  # beyond what 1/8 brings under the limit: PIL's path refuses it
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale), min_width=-(-width // scale))
    except (ImportError, ValueError, OSError):
        return None


def _jpeg_icc(data: bytes) -> bytes | None:
    """A JPEG's embedded colour profile where it needs applying (see ``_to_srgb``): None without one, b"" for sRGB's
    own or one that cannot be read; a profile split over several markers is returned as its first, for PIL's path."""
    at = data.find(b"ICC_PROFILE\x00", 0, 65536)
    if at < 4:
        return None
    icc = data[at + 14 : at - 2 + int.from_bytes(data[at - 2 : at], "big")]
    return icc if data[at + 13 : at + 14] != b"\x01" or _to_srgb(icc, "RGB") is not None else b""


@functools.lru_cache(maxsize=16)
def _to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform from the embedded colour profile ``icc`` to sRGB for ``mode`` (RGB or RGBA) pixels. None where
    none is needed: sRGB's own profile (what most cameras embed, and none of the datasets here), a profile of no RGB
    space, or one that littleCMS cannot read (the pixels are then taken as sRGB, as any image without a profile)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(source).lower().replace(" ", "").replace("-", "")
        if "srgb" in name or source.profile.xcolor_space.strip() != "RGB":
            return None
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, mode, ImageCms.Intent.RELATIVE_COLORIMETRIC)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def in_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """``im`` in sRGB, by its embedded colour profile ``icc``: Adobe RGB from a camera, Display P3 from a phone,
    whose numbers read as sRGB look duller than the slide (as every colour-managed viewer shows them otherwise)."""
    transform = _to_srgb(icc, im.mode) if icc and im.mode in ("RGB", "RGBA") else None
    return im if transform is None else ImageCms.applyTransform(im, transform)


def reduction_factor(width: int, height: int, max_pixels: int, jpeg: bool) -> int | None:
    """1/scale of each side that brings ``width x height`` within ``max_pixels``: a JPEG's decoder scale
    (``jpeg_reduction``), or for a format without one (PNG, TIFF, HEIC, WebP), which is decoded whole, 2 or 4 for an
    image of up to ``WHOLE_DECODE`` times the limit (a phone's 48 Mpixel HEIC photo, a stitched 100 Mpixel field: at
    most 480 MB decoded for a moment), averaged over blocks; None for larger ones."""
    if jpeg:
        return jpeg_reduction(width, height, max_pixels)
    return None if width * height > WHOLE_DECODE * max_pixels else _scale_within(width, height, max_pixels, (1, 2, 4))


def _scale_within(width: int, height: int, max_pixels: int, scales: tuple[int, ...]) -> int | None:
    """The first of ``scales`` at which ``width x height`` (sides rounded up) is within ``max_pixels``; None if none is."""
    return next((scale for scale in scales if -(-width // scale) * -(-height // scale) <= max_pixels), None)


def too_large(width: int, height: int, max_pixels: int, jpeg: bool) -> ImageReadError:
    limit = max_pixels * (8 * 8 if jpeg else WHOLE_DECODE)
    return ImageReadError(f"image too large: {width}x{height} pixels (limit {limit:,}): cut it into tiles")


def jpeg_reduction(width: int, height: int, max_pixels: int) -> int | None:
    """The JPEG decoder's scale (1, 2, 4 or 8: 1/scale of each side, in the DCT, without decoding the whole image)
    that brings ``width x height`` within ``max_pixels``; None when even 1/8 does not. Such a JPEG is read at that
    scale: a model frames every image to about 112 px, and ``count`` gives its cells' boxes in the file's pixels."""
    return _scale_within(width, height, max_pixels, (1, 2, 4, 8))


def _draft_request(im: Image.Image, reduce: int | None, size: int | None, crop: float) -> tuple[int, int] | None:
    """The size to ask a JPEG's decoder for (PIL's draft picks the largest scale that keeps the image at least that
    large): 1/``reduce`` of each side for one over the pixel limit (a phone's 48 Mpixel photo, never decoded whole;
    floor, not ceiling, or an odd side would fall back to full scale), and no more than ``size`` needs."""
    if im.format != "JPEG":
        return None
    request = (im.width // reduce, im.height // reduce) if reduce and reduce > 1 else None
    if size is not None:
        need = int(np.ceil(size / crop))
        request = (need, need) if request is None else (min(need, request[0]), min(need, request[1]))
    return request


def _decode(source, size: int | None, draft: bool, name: str, max_pixels: int = MAX_PIXELS, crop: float = 1.0) -> np.ndarray:
    head = _head(source, 64)  # what PIL cannot read well is told by its first bytes: deep TIFFs, HEIC
    deep = _deep_tiff(source, head, max_pixels)
    if deep is not None:
        return resize_center_crop(deep, size, crop) if size is not None else deep
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: the size is checked here, with a clearer message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _heic(source, head, max_pixels)
            if im is None:
                im = Image.open(source)
        with im:
            jpeg = im.format == "JPEG"
            reduce = reduction_factor(im.width, im.height, max_pixels, jpeg)
            if reduce is None:
                raise too_large(im.width, im.height, max_pixels, jpeg)
            if request := _draft_request(im, reduce, size if draft else None, crop):
                im.draft("RGB", request)  # one call: PIL ignores a second one
            icc = im.info.get("icc_profile")
            im = ImageOps.exif_transpose(im)
            rgb = to_rgb(in_srgb(im, icc))
            if reduce > 1 and not jpeg:  # a JPEG's decoder reduced it already
                rgb = rgb.reduce(reduce)
    except Image.DecompressionBombError:  # larger still than PIL's own limit, refused while reading the header
        raise ImageReadError(f"image too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (limit {max_pixels:,}): cut it into tiles") from None
    except PARSER_ERRORS as err:  # UnidentifiedImageError is an OSError
        if (packed := archive_kind(head)) is not None:
            raise ImageReadError(f"{packed}, not an image: unpack it and give its images") from None
        if head.startswith(APPLEDOUBLE_MAGIC):
            raise ImageReadError("macOS's metadata for a file (an AppleDouble ._ file), not an image: leave it out "
                                 "(folders' hidden files are)") from None
        if _is_text(head):  # named as a list or a note: it may be a list of images, which @NAME reads
            listed = name and Path(name).suffix.lower() not in IMAGE_EXTENSIONS
            hint = f" (a list of images? give it as @{name}: one image or folder per line)" if listed else ""
            raise ImageReadError(f"unreadable image: a text file{hint}") from None
        text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err).replace(name, "") if name else str(err)).strip(" :'\"")
        raise ImageReadError(f"unreadable image: {text or type(err).__name__}"[:160]) from None
    return resize_center_crop(rgb, size, crop) if size is not None else np.asarray(rgb)


APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"  # the ._NAME twin macOS writes beside a file on a drive that cannot hold its metadata
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
ARCHIVE_MAGIC = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive", b"7z\xbc\xaf\x27\x1c": "a 7z archive",
                 b"Rar!\x1a\x07": "a RAR archive", b"BZh": "a bzip2 archive", b"\xfd7zXZ\x00": "an xz archive"}


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes are text (UTF-8, no control characters but whitespace): a list or a note, which a
    user may give where images go."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut by the end of the head is still text
        if err.start < len(head) - 3:
            return False
        text = head[:err.start].decode("utf-8")
    text = text.removeprefix("\ufeff")  # the byte-order mark Windows' Notepad writes
    return bool(text.strip()) and all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def archive_kind(path_or_head: str | os.PathLike | bytes) -> str | None:
    """'a zip archive' (7z, RAR, gzip, ...) for a file that packs others, told by its first bytes; None otherwise.
    A lab's dataset often arrives as one: said so, it is a fix (unpack it), not an unreadable image."""
    try:
        head = path_or_head if isinstance(path_or_head, bytes) else _head(path_or_head, 8)
    except OSError:
        return None
    return next((kind for magic, kind in ARCHIVE_MAGIC.items() if head.startswith(magic)), None)


HEIC_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx")  # HEVC-coded HEIF; AVIF ("avif") PIL reads


def _head(source, n: int) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:n]
    with open(source, "rb") as handle:
        return handle.read(n)


def _is_heic(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and (head[8:12] in HEIC_BRANDS or (head[8:12] in (b"mif1", b"msf1")
                                                                   and any(b in head[16:64] for b in HEIC_BRANDS)))


def _open_heic(source):
    """A HEIC file opened by libheif through pi-heif (header read, pixels not yet decoded)."""
    try:
        import pi_heif
    except ImportError:
        raise ImageReadError("a HEIC image: install pi-heif to read it (pip install pi-heif), or save it as JPEG or PNG") from None
    return pi_heif.open_heif(source)


def _heic(source, head: bytes, max_pixels: int) -> Image.Image | None:
    """A HEIC photo (what phones write, through an eyepiece too) decoded by libheif through pi-heif, with
    its orientation applied; None for anything else (``head``: the file's first 64 bytes). PIL has no HEVC decoder."""
    if not _is_heic(head):
        return None
    try:
        heif = _open_heic(source)
        if reduction_factor(*heif.size, max_pixels, jpeg=False) is None:  # within it, reduced after decoding (_decode)
            raise too_large(*heif.size, max_pixels, jpeg=False)
        im = Image.frombytes(heif.mode, heif.size, heif.data, "raw", heif.mode, heif.stride)
        im.info["icc_profile"] = heif.info.get("icc_profile")  # a phone's Display P3, applied as any file's (in_srgb)
        return im
    except PARSER_ERRORS as err:
        raise ImageReadError(f"unreadable HEIC image: {err or type(err).__name__}"[:160]) from None
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)


def _deep_tiff(source, head: bytes, max_pixels: int) -> np.ndarray | None:
    """A TIFF with more than 8 bits per sample (a scientific camera's 12- or 16-bit RGB, float32) as
    8-bit RGB, read by tifffile; None for anything else, which PIL reads. PIL reads a 16-bit RGB TIFF
    by its high bytes, so 12-bit data came out almost black, and it cannot open float TIFFs at all."""
    if head[:4] not in TIFF_MAGIC:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(source) as tif:
            page = tif.pages[0]
            stack, planes = rgb_channel_pages(tif), z_stack(tif)
            if page.bitspersample <= 8 and page.sampleformat != 3 and not stack and planes is None:  # 3: IEEE float
                return None
            if (reduce := reduction_factor(page.imagewidth, page.imagelength, max_pixels, jpeg=False)) is None:
                raise too_large(page.imagewidth, page.imagelength, max_pixels, jpeg=False)
            if planes is not None:
                arr = sharpest_plane(tif, *planes)
            else:
                arr = np.moveaxis(tif.series[0].asarray().reshape(3, page.imagelength, page.imagewidth), 0, -1) if stack else page.asarray()
    except PARSER_ERRORS as err:  # tifffile.TiffFileError is a ValueError
        raise ImageReadError(f"unreadable image: {err or type(err).__name__}"[:160]) from None
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar: channels first
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3 or min(arr.shape[:2]) < 1:
        raise ImageReadError(f"unreadable image: TIFF samples of shape {arr.shape} are not an RGB or grayscale picture")
    return to_uint8(arr[:, :, :3] if reduce == 1 else block_mean(arr[:, :, :3], reduce))


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """``arr`` (H x W x C, any depth) averaged over ``factor`` x ``factor`` blocks, as PIL's ``Image.reduce`` does for
    8-bit images (edge blocks cut by the border averaged over the pixels they hold), in float32: a deep TIFF is
    reduced before its samples are scaled to 8 bits (``to_uint8`` works in float64)."""
    height, width = arr.shape[:2]
    rows, cols = -(-height // factor), -(-width // factor)
    sums = np.add.reduceat(np.add.reduceat(arr, np.arange(0, height, factor), axis=0, dtype=np.float32), np.arange(0, width, factor), axis=1)
    counts = np.minimum(factor, height - factor * np.arange(rows))[:, None] * np.minimum(factor, width - factor * np.arange(cols))[None, :]
    return sums / counts[:, :, None]


def _stack_axes(tif, named: bool = False) -> list[tuple[str, int]]:
    """The axes longer than 1 of a TIFF's first series, with their lengths, as its metadata names them; [] for a file
    of one page, one whose metadata cannot be parsed, or (``named``) one without ImageJ or OME metadata."""
    try:
        if len(tif.pages) < 2 or (named and not (tif.is_imagej or tif.is_ome)):
            return []
        series = tif.series[0]
    except PARSER_ERRORS:  # metadata it cannot parse: then the pages are read as any file's
        return []
    return [(axis, n) for axis, n in zip(series.axes, series.shape) if n > 1]


def rgb_channel_pages(tif) -> bool:
    """True for a TIFF whose colour channels are its pages: red, green and blue as three grey pages, as ImageJ/Fiji
    saves a 3-channel image and OME-TIFF a CYX one (their metadata names the axes). Read as one RGB picture; a focal
    stack that its metadata names (``z_stack``) by its sharpest plane; any other file of several pages (several fields,
    a stack without such metadata) by its first page."""
    shown = _stack_axes(tif)
    return "".join(axis for axis, _ in shown) == "CYX" and shown[0][1] == 3


def z_stack(tif) -> tuple[int, int] | None:
    """(planes, pages per plane) of a focal stack whose ImageJ or OME metadata names its Z axis: RGB or grey pages
    (axes ZYX, ZYXS) or three channel pages per plane (ZCYX); None for anything else, a plain multi-page TIFF
    included (its pages may as well be several fields: its metadata does not say)."""
    shown = _stack_axes(tif, named=True)
    axes = "".join(axis for axis, _ in shown)
    if axes in ("ZYX", "ZYXS"):
        return shown[0][1], 1
    return (shown[0][1], 3) if axes == "ZCYX" and shown[1][1] == 3 else None


def sharpest_plane(tif, planes: int, per_plane: int) -> np.ndarray:
    """The plane of a focal stack in best focus: the largest variance of the Laplacian of its grey levels (Pech-Pacheco
    et al. 2000), each plane judged at most 512 px wide, so that a stack of large planes costs one read of each."""
    from scipy import ndimage

    best, best_focus = None, -1.0
    for z in range(planes):
        pages = [tif.asarray(key=z * per_plane + c) for c in range(per_plane)]
        plane = np.stack(pages, -1) if per_plane > 1 else pages[0]
        grey = plane.astype(np.float32) if plane.ndim == 2 else plane[..., :3].astype(np.float32).mean(-1)
        factor = max(1, -(-max(grey.shape) // 512))
        small = block_mean(grey[..., None], factor)[..., 0] if factor > 1 else grey
        focus = float(ndimage.laplace(small / max(float(small.max()), 1e-12)).var())
        if focus > best_focus:
            best, best_focus = plane, focus
    return best


def tiff_pages(path: str | os.PathLike) -> int:
    """How many full-size images a TIFF file holds (a z-stack or several fields saved as pages; reduced-size pages,
    thumbnails and pyramid levels, not counted); 1 for anything else. The first page's header says whether another
    follows (three reads of a few bytes: about 10 us), so only a file with several pages is opened to compare sizes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO named .tif: not waited on (pread then fails)
        try:
            head = os.pread(fd, 16, 0)
            if head[:4] not in TIFF_MAGIC:
                return 1
            order, big = ("<" if head[:2] == b"II" else ">"), head[2:4] in (b"+\x00", b"\x00+")
            offset, count, entry, pointer = (struct.unpack(order + "Q", head[8:16])[0], "Q", 20, "Q") if big else \
                (struct.unpack(order + "I", head[4:8])[0], "H", 12, "I")
            (entries,) = struct.unpack(order + count, os.pread(fd, struct.calcsize(count), offset))
            after = os.pread(fd, struct.calcsize(pointer), offset + struct.calcsize(count) + entries * entry)
            if not struct.unpack(order + pointer, after)[0]:
                return 1
        finally:
            os.close(fd)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if rgb_channel_pages(tif) or z_stack(tif) is not None:  # read as one picture: the RGB image, the sharpest plane
                return 1
        with Image.open(path) as im:
            size = im.size
            return sum(1 for _ in ImageSequence.Iterator(im) if im.size == size)
    except PARSER_ERRORS:  # unreadable: said when it is decoded
        return 1


def several_pages(paths: Sequence[Path]) -> str | None:
    """What to say of the TIFF files among ``paths`` that hold several images (a z-stack, several fields saved as
    pages), of which only the first is read, and how to read the others; None when there are none."""
    stacks = [(path, pages) for path in paths if path.suffix.lower() in (".tif", ".tiff") and (pages := tiff_pages(path)) > 1]
    if not stacks:
        return None
    (first, pages), verb = stacks[0], "holds" if len(stacks) == 1 else "hold"
    return (f"{plural(len(stacks), 'TIFF file')} {verb} several images (a z-stack, or several fields saved as pages; "
            f"{first.name}: {pages} pages): only the first page of each is read (a z-stack saved by Fiji or as OME-TIFF is "
            "read by its sharpest plane); save each page as its own file to read "
            "them all (Fiji: Image > Stacks > Stack to Images)")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header: PIL's, or tifffile's for a TIFF that PIL cannot open (float samples)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        if _is_heic(_head(path, 64)):
            try:
                return tuple(_open_heic(path).size)
            except PARSER_ERRORS:
                raise ImageReadError("unreadable HEIC image: no size in its header") from None
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return page.imagewidth, page.imagelength
        except PARSER_ERRORS:
            raise ImageReadError("unreadable image: no size in its header") from None


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Samples of any depth to 0-255, by the smallest container that holds the image's largest value:
    floats up to 1.0 as fractions of white; integers (or larger floats) as 8-, 10-, 12-, 14- or 16-bit data,
    so a 12-bit camera's image keeps its exposure instead of being stretched to its own maximum."""
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    top = float(values.max())
    if arr.dtype.kind == "f" and top <= 1.0:
        white = 1.0
    else:
        white = next((2.0**bits - 1 for bits in (8, 10, 12, 14, 16) if top <= 2**bits - 1), top or 1.0)
    return np.round(values * (255.0 / white)).clip(0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """An image array encoded as PNG (for a report's or a web page's inline images)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (16-bit, palette, RGBA, CMYK, grayscale) to 8-bit RGB."""
    if im.width < 1 or im.height < 1:
        raise ValueError("empty image")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = Image.fromarray(to_uint8(np.asarray(im)))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    im = im.convert("RGB")
    im.load()
    return im


def resize_center_crop(im: Image.Image | np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """The central square (``crop`` of the shorter side), resized to ``size x size`` (bilinear, antialiased;
    ``localise.resize_box``). Cropping before resizing keeps memory bounded for extreme aspect ratios (a 2000x3 strip).
    """
    rgb = np.asarray(im)
    h, w = rgb.shape[:2]
    side = max(1, round(min(w, h) * crop))
    left, top = (w - side) // 2, (h - side) // 2
    if side == size:
        return rgb[top : top + side, left : left + side].copy()
    return localise.resize_box(rgb, (left, top, left + side, top + side), size)


@dataclass(frozen=True)
class View:
    """The square of an image a model sees, at ``size`` x ``size``, and its colour normalisation.

    ``crop``: the central fraction of the shorter side (a centred cell, as CellaVision tiles are).
    ``cell``: a window centred on the located white cell, whose diameter fills this fraction of
    the window (see localise); ``crop`` is then unused. ``colour``: the colour normalisation of
    each window (see stain: none, white or reinhard, whose target OD statistics are ``stain``).
    ``context`` > 1: training decodes that factor more around the same centre, for augmentation
    to rotate or shift into view. ``reduce`` (central crops only): shrink the image first by the
    largest of 8, 4 or 2 that still leaves the crop ``size`` pixels across (see ``reduction``).
    ``cast``: the training images' range of background colours; a whole image whose background is
    well yellower than it (its blue share well below) has its cast corrected first (see
    stain.correct_cast).
    """

    size: int
    crop: float = 1.0
    cell: float | None = None
    stain: tuple[float, ...] | None = None
    context: float = 1.0
    colour: str = "none"
    reduce: bool = False
    cast: tuple[float, ...] | None = None

    def with_context(self, factor: float) -> View:
        return replace(self, size=round(self.size * factor), context=factor)


REDUCTIONS = (8, 4, 2)


def reduction(height: int, width: int, view: View) -> int:
    """By how much an image of ``height`` x ``width`` shrinks before ``view`` frames it: with
    ``view.reduce``, the largest of 8, 4 and 2 whose reduced image still has a central crop of
    ``view.size`` pixels or more; otherwise 1.

    Why: a JPEG decodes at 1/2, 1/4 or 1/8 of its size in libjpeg-turbo's DCT (half the time at 1/2),
    and the crop is then resized from half the pixels. Arrays, PIL images and other formats are
    shrunk by block averaging (``Image.reduce``, the same sizes), so every input still goes through
    one pipeline; the two shrinkings differ by decoder rounding (docs/benchmarks.md, "Decoding at
    half size").
    """
    if not view.reduce or view.cell is not None:
        return 1
    crop = min(1.0, view.crop * view.context)
    return next((f for f in REDUCTIONS if round(min(-(-height // f), -(-width // f)) * crop) >= view.size), 1)


MIN_SIDE_SHARE = 0.25  # see frame: a 20 px thumbnail shown to a 112 px model; PBC tiles shrunk to 64 px: 482 of 515 right


def frame(rgb: np.ndarray, view: View, reduced: bool = False) -> tuple[np.ndarray, bool | None, bool]:
    """``rgb`` (H, W, 3 uint8, whole) as ``view`` shows it, whether a cell was located (None when the
    view is not cell-centric) and whether it was recoloured to look like a slide: a black background
    painted where the window shows it, or a colour cast corrected (``localise.cell_window``,
    ``stain.correct_cast``). A grayscale image, which has no stain colour to read (``stain.colourless``),
    and an image too small to hold a cell's detail (its side, or the central crop's, under MIN_SIDE_SHARE
    of the model's input: magnified more than 4x) count as recoloured too, so that they are out of domain
    for a model that never trained on such images.
    The one function every path (files, uploads, arrays, PIL images; train, evaluate, predict, serve,
    explain, export) goes through. ``reduced``: ``rgb`` was already decoded at ``reduction``'s scale
    (a JPEG; see ``load_view``)."""
    if not reduced and (factor := reduction(*rgb.shape[:2], view)) > 1:
        rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
    if view.cell is not None:
        out, found, recoloured = localise.cell_window(rgb, view.size, view.cell, view.context, view.cast)
    else:
        crop = min(1.0, view.crop * view.context)
        corrected = stain.correct_cast(rgb, view.cast)
        out, found, recoloured = resize_center_crop(corrected, view.size, crop), None, corrected is not rgb
    few_pixels = min(rgb.shape[:2]) * (1.0 if view.cell is not None else min(1.0, view.crop)) < MIN_SIDE_SHARE * view.size
    return stain.apply(out, view.colour, view.stain), found, recoloured or few_pixels or stain.colourless(rgb)


def load_view(source: str | os.PathLike | bytes, view: View, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bool | None, bool]:
    """A file (path) or an upload (bytes) decoded and framed as ``view`` shows it; see ``frame``.

    A JPEG decodes in libjpeg-turbo at ``reduction``'s scale (whole unless ``view.reduce``); anything
    else, or a JPEG it cannot take (EXIF orientation, CMYK, damage), decodes whole through PIL and is
    reduced in ``frame``. Without ``reduce``, a path, its bytes, its decoded array and a PIL image of
    it give the same pixels, so the same probabilities.
    """
    data = source if isinstance(source, bytes) else None
    if data is None and Path(source).suffix.lower() in (".jpg", ".jpeg"):
        data = _readable(source).read_bytes()
    if data and (rgb := _jpeg_scaled(data, max_pixels, lambda height, width: reduction(height, width, view))) is not None:
        return frame(rgb, view, reduced=True)
    rgb = decode_bytes(source, None, max_pixels) if isinstance(source, bytes) else load_rgb(source)
    return frame(rgb, view)
