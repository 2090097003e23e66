"""Image and file I/O: loading untrusted images without crashing, tensors <-> PIL, atomic writes.

The engine serves folders of user images, and one bad file must not take down a run of
thousands: every way a file can be unusable (missing, empty, not an image, corrupt,
truncated, a decompression bomb) becomes one `ImageError` whose message is a single line
naming the file. Decoding is forced inside the guarded region because Pillow decodes
lazily, and a truncated file only fails when its pixels are read.

Every image comes out as 8-bit 'RGB', or 'RGBA' when it carries transparency, so the
engine sees one pixel format. Higher bit depths are rescaled, not clipped: 16-bit values
are divided by 257 (65535 -> 255), 32-bit integer images ('I') are taken to hold 16-bit
data (that is how Pillow represents 16-bit sources), and float images ('F') to hold [0, 1].

What is usable but worth telling the user (only the first frame of a multi-page TIFF or
an animated PNG/WebP is used; Pillow skipped damaged EXIF data) becomes an `ImageWarning`,
a one-line warning naming the file: the library never prints, and a command turns these
into `note:` lines with `image_warnings`.

Only PNG, JPEG, WebP, TIFF and BMP are decoded. Pillow can open many more formats, some
by running external programs (EPS through Ghostscript), which is not something a file
dropped into an input folder should be able to trigger.

Writes go through `atomic_path`: a temporary file beside the target, `.{name}.{8 hex}.tmp`,
moved into place when complete. The writer holds an advisory lock (flock) on it while it
lives, so `sweep_temporaries` can delete the ones a killed process left (the kernel drops
the lock with the process) without touching one that a running process is writing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import stat
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import fcntl
except ImportError:  # Windows: no flock, so temporaries are never swept there
    fcntl = None  # type: ignore[assignment]

INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
DEFAULT_MAX_PIXELS = 8192 * 8192
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WebP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"BM", "BMP"),
)

# The names `_create_temporary` gives; `sweep_temporaries` deletes nothing else.
TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")

# Pillow's decompression-bomb limit and the warnings filters are process-wide; changing them
# for one call must not race with another thread changing them for another.
_SHARED_STATE_LOCK = threading.Lock()


class ImageError(ValueError):
    """An input image that cannot be used; str() is one line, `<path>: <reason>`."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")


class ImageFormatError(ImageError):
    """The data is not in one of the formats decoded (`INPUT_FORMATS`)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (the decompression-bomb guard)."""


class ImageWarning(UserWarning):
    """A usable input image with something its user should know; str() is one line,
    `<path>: <note>`."""

    def __init__(self, path: str | os.PathLike, note: str):
        self.path = Path(path)
        self.note = " ".join(note.split())
        super().__init__(f"{self.path}: {self.note}")


@contextlib.contextmanager
def image_warnings(report: Callable[[ImageWarning], Any]) -> Iterator[None]:
    """Hand every ImageWarning raised in the block to `report` instead of the warnings
    machinery; other warnings go on as if the block had not caught them."""
    with _diverted(ImageWarning, report):
        yield


@contextlib.contextmanager
def _diverted(category: type[Warning], handle: Callable[[Any], Any]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield
    for warning in caught:
        if issubclass(warning.category, category):
            handle(warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                                   source=warning.source)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it to `path`, on failure delete
    it, so `path` is never left half-written. With `overwrite=False` an existing `path` is
    never replaced: FileExistsError instead, decided atomically, so that of two processes
    claiming one name exactly one gets it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, handle = _create_temporary(target)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, target)
        else:
            # A new hard link fails when the name exists; a rename would replace it, and a
            # check before the rename would leave a gap for another process.
            os.link(tmp, target)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(handle)


def _create_temporary(target: Path) -> tuple[Path, int]:
    """A new empty file `.{target.name}.{8 hex}.tmp` beside `target` and an open descriptor
    holding its lock; close the descriptor when done with the file."""
    # Not tempfile.mkstemp: its files are private (0600) and would stay so after the rename;
    # O_CREAT with 0666 gives the permissions the user's umask asks for, like any new file.
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        # A sweep may have taken the file between its creation and the lock.
        if _names(handle, tmp):
            return tmp, handle
        os.close(handle)


def _names(handle: int, path: Path) -> bool:
    """Whether `path` is the file open as `handle`."""
    try:
        found, held = os.stat(path, follow_symlinks=False), os.fstat(handle)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of `atomic_path` that processes killed while writing
    (SIGKILL, a power cut) left in `folder`; returns them. A temporary whose writer is still
    running is locked and kept. Without flock (Windows) nothing is deleted."""
    if fcntl is None:
        return []
    try:
        with os.scandir(folder) as listing:
            entries = [entry for entry in listing
                       if TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        path = Path(entry.path)
        try:
            handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(handle, path):
                path.unlink()
                removed.append(path)
        # BlockingIOError: its writer is alive; anything else: not ours to force.
        except OSError:
            pass
        finally:
            os.close(handle)
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Raise OSError unless a file can be created in `folder` or, while it does not exist,
    in the nearest folder above it that does (where it would be created)."""
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    probe, handle = _create_temporary(existing / "write-probe")
    # Unlinked while its lock is held: once closed, another process's sweep may take it first.
    probe.unlink()
    os.close(handle)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image's colour as a (3, H, W) float32 tensor in [0, 1]; alpha is dropped and
    16-bit and float images are rescaled (Pillow's own convert("RGB") clips them to 255)."""
    rgb = image if image.mode == "RGB" else to_rgb_or_rgba(image).convert("RGB")
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an 8-bit RGB PIL image (rounded half to even, not
    truncated). In NumPy, which runs on the calling thread alone: torch would start a pool of
    threads for each thread that calls it (a service's request threads), and idle pools spin."""
    array = np.round(np.clip(image.detach().float().cpu().numpy(), 0.0, 1.0) * np.float32(255.0))
    return Image.fromarray(array.astype(np.uint8).transpose(1, 2, 0), mode="RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully into an 8-bit 'RGB' or 'RGBA' image, upright per its EXIF
    orientation. `max_pixels` (None: no limit) rejects larger images before decoding them.
    Raises ImageError for anything that is not a usable image (ImageFormatError for an unknown
    format, ImageTooLargeError over `max_pixels`); warns ImageWarning when only the first of
    several frames is used, or when Pillow skipped damaged metadata."""
    path = Path(path)
    check_file(path)

    def head() -> bytes:
        try:
            with path.open("rb") as file:
                return file.read(12)
        except OSError:
            return b""

    return _decode(path, path, head, max_pixels)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, name: str = "upload") -> Image.Image:
    """`load_image` for image bytes held in memory (an upload): the same formats, guards and
    errors, which name the data `name`."""
    if not data:
        raise ImageError(name, "empty data (0 bytes)")
    return _decode(io.BytesIO(data), name, lambda: bytes(data[:12]), max_pixels)


def _decode(source: Path | BinaryIO, name: str | os.PathLike, head: Callable[[], bytes],
            max_pixels: int | None) -> Image.Image:
    skipped_metadata: list[str] = []

    def skip_metadata(message: Warning) -> None:
        skipped_metadata.append(one_line(message))

    try:
        # Headers and metadata are parsed under the lock on shared state; decoding, the slow
        # part, runs outside it so that threads can decode in parallel.
        with _shared_state(skip_metadata), _pixel_limit(max_pixels):
            opened = Image.open(source, formats=INPUT_FORMATS)
        with opened:
            # Counted before decoding: counting seeks through a TIFF's pages, and a seek
            # after decoding would make the first frame decode again.
            with _shared_state(skip_metadata):
                frames = getattr(opened, "n_frames", 1)
            opened.load()
            with _shared_state(skip_metadata):
                upright = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(name, f"larger than the limit of {max_pixels} pixels (decompression-bomb guard)"
                                 ) from None
    except UnidentifiedImageError:
        reason = _unidentified_reason(head())
        error = ImageError if reason.startswith("corrupt") else ImageFormatError
        raise error(name, reason) from None
    # Pillow's decoders raise a grab-bag of exception types on malformed data (OSError,
    # SyntaxError, struct.error, IndexError, ...); each of them means this file is unusable.
    except Exception as error:
        raise ImageError(name, f"corrupt or truncated image data ({_describe(error)})") from None
    if upright.width == 0 or upright.height == 0:
        raise ImageError(name, f"the image has no pixels ({upright.width}x{upright.height})")
    try:
        image = to_rgb_or_rgba(upright)
    except ValueError as error:
        raise ImageError(name, f"unsupported pixel format {upright.mode} ({_describe(error)})") from None
    if frames > 1:
        warnings.warn(ImageWarning(name, f"has {frames} frames (a multi-page or animated image); "
                                         "only the first is used"), stacklevel=3)
    if skipped_metadata:
        warnings.warn(ImageWarning(name, f"damaged metadata skipped ({skipped_metadata[0]})"), stacklevel=3)
    return image


def to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """`image` as 8-bit 'RGBA' if it carries any transparency, else as 8-bit 'RGB'."""
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_8bit(image)
    return image.convert("RGBA" if has_alpha(image) else "RGB")


def has_alpha(image: Image.Image) -> bool:
    """An alpha band (straight or premultiplied) or a transparent colour key (tRNS)."""
    # By mode, not by band name: the "A" band of a CIELab ('LAB') image is a colour axis.
    return image.mode in _ALPHA_MODES or image.info.get("transparency") is not None


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        scaled = values.astype(np.float64) * 255.0
    else:
        scaled = values.astype(np.float64) / 257.0
    gray = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if key is None or image.mode == "F":
        return gray.convert("RGB")
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), mode="L")
    out = gray.convert("RGBA")
    out.putalpha(alpha)
    return out


def check_file(path: Path) -> None:
    """Raise ImageError unless `path` is a non-empty regular file (what can be said without
    reading it)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except OSError as error:
        raise ImageError(path, f"cannot read it ({_describe(error)})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageError(path, "is a directory, not an image file")
    # Opening a named pipe would wait for a writer forever.
    if not stat.S_ISREG(status.st_mode):
        raise ImageError(path, "not a regular file (a pipe, socket or device)")
    if status.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


@contextlib.contextmanager
def _shared_state(skip_metadata: Callable[[Warning], Any]) -> Iterator[None]:
    """Hold the lock on process-wide state, and hand Pillow's UserWarnings (its reports of
    damaged EXIF data) to `skip_metadata` rather than to the user as Python warnings."""
    with _SHARED_STATE_LOCK, _diverted(UserWarning, skip_metadata):
        yield


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Point Pillow's decompression-bomb check at `max_pixels` and make its warning (which
    Pillow only prints for sizes between the limit and twice the limit) an error. Only
    inside `_shared_state`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _unidentified_reason(head: bytes) -> str:
    # Pillow reports data whose header it cannot parse exactly like data in an unknown
    # format; the signature (the first 12 bytes) tells the user which of the two they have.
    for signature, name in _SIGNATURES:
        if head.startswith(signature) and (name != "WebP" or head[8:12] == b"WEBP"):
            return f"corrupt {name} file (it starts like one, but its header cannot be parsed)"
    return "not a PNG, JPEG, WebP, TIFF or BMP image"


def printable(text: str) -> str:
    """`text` safe to print on any stream: the bytes of a file name that are not UTF-8
    (which Python decodes to lone surrogates, b"caf\\xe9" as "caf\\udce9") shown as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte decodes to (a Windows name)
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return " ".join(error.strerror.split())
    return one_line(error)


def outscaled(image: Image.Image, input_size: tuple[int, int], outscale: float) -> Image.Image:
    """A model's output resized (LANCZOS) to round(outscale x the input's size), as Real-ESRGAN's
    --outscale does."""
    size = (max(1, round(outscale * input_size[0])), max(1, round(outscale * input_size[1])))
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def save_png(image: Image.Image, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write `image` as a PNG at `path` through a temporary file, so `path` is either the
    complete image or untouched; `overwrite=False`: FileExistsError if `path` exists (see
    `atomic_path`)."""
    target = Path(path)
    with atomic_path(target, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")
    return target


def collect_inputs(paths: Iterable[str | os.PathLike],
                   exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Expand files and folders into the list of images to process.

    A named path is kept as it is unless it is a folder: a file of any extension, and also
    a path that does not exist or cannot be resolved (a symbolic-link loop), so that a wrong
    path is reported by `load_image` rather than skipped or fatal for the whole list. A folder
    contributes every entry with an image extension (case-insensitive) below it, sorted,
    skipping hidden entries (dotfiles such as macOS '._x.png' resource forks, '.git') and the
    folders in `exclude`; such an entry that is not a file (a folder named 'x.png', a broken
    link) is kept to be reported, and a folder named like an image is never searched. Each
    path appears once, at its first mention.
    """
    skipped = {Path(folder).resolve() for folder in exclude}
    found: dict[Path, None] = {}
    for name in paths:
        path = Path(name)
        if path.is_dir() and not _named_like_an_image(path.name):
            found.update(dict.fromkeys(_images_below(path, skipped)))
        else:
            found[path] = None
    return list(found)


def _named_like_an_image(name: str) -> bool:
    return Path(name).suffix.lower() in INPUT_EXTENSIONS


def _images_below(folder: Path, skipped: set[Path]) -> list[Path]:
    if folder.resolve() in skipped:
        return []
    images = []
    for root, dirs, files in os.walk(folder):
        visible = [d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in skipped]
        dirs[:] = [d for d in visible if not _named_like_an_image(d)]
        images.extend(Path(root) / name for name in (*files, *visible)
                      if not name.startswith(".") and _named_like_an_image(name))
    return sorted(images)


def output_names(inputs: Sequence[Path]) -> list[str]:
    """One output file name '<stem>.png' per input, in order, all distinct.

    The first input with a given stem keeps it; later ones become '<stem>-2.png',
    '<stem>-3.png', ..., skipping names that another input's own stem would take.
    Comparison ignores case, since 'A.png' and 'a.png' are one file on macOS and Windows.
    """
    own = [path.stem for path in inputs]
    taken = {stem.casefold() for stem in own}
    claimed: set[str] = set()
    names = []
    for stem in own:
        name = stem
        if stem.casefold() in claimed:
            suffix = 2
            while f"{stem}-{suffix}".casefold() in taken:
                suffix += 1
            name = f"{stem}-{suffix}"
            taken.add(name.casefold())
        claimed.add(name.casefold())
        names.append(f"{name}.png")
    return names
