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

Only PNG, JPEG, WebP, TIFF and BMP are decoded. Pillow can open many more formats, some
by running external programs (EPS through Ghostscript), which is not something a file
dropped into an input folder should be able to trigger.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
DEFAULT_MAX_PIXELS = 8192 * 8192
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WebP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"BM", "BMP"),
)

# Pillow's decompression-bomb limit is a module global; changing it for one call must not
# race with another thread changing it for another.
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
    """An input image that cannot be used; str() is one line, `<path>: <reason>`."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure
    delete it, so `path` is never left half-written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temporary(target: Path) -> Path:
    # Not tempfile.mkstemp: its files are private (0600) and would stay so after the rename;
    # O_CREAT with 0666 gives the permissions the user's umask asks for, like any new file.
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image's colour as a (3, H, W) float32 tensor in [0, 1]; alpha is dropped and
    16-bit and float images are rescaled (Pillow's own convert("RGB") clips them to 255)."""
    rgb = image if image.mode == "RGB" else to_rgb_or_rgba(image).convert("RGB")
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an 8-bit RGB PIL image (rounded, not truncated)."""
    array = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully into an 8-bit 'RGB' or 'RGBA' image, upright per its EXIF
    orientation. `max_pixels` (None: no limit) rejects larger images before decoding them.
    Raises ImageError for anything that is not a usable image."""
    path = Path(path)
    _check_file(path)
    try:
        # The size check happens while the header is parsed; decoding, the slow part, runs
        # outside the lock so that threads can decode in parallel.
        with _pixel_limit(max_pixels):
            opened = Image.open(path, formats=INPUT_FORMATS)
        with opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, f"larger than the limit of {max_pixels} pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(path, _unidentified_reason(path)) from None
    # Pillow's decoders raise a grab-bag of exception types on malformed data (OSError,
    # SyntaxError, struct.error, IndexError, ...); each of them means this file is unusable.
    except Exception as error:
        raise ImageError(path, f"corrupt or truncated image data ({_describe(error)})") from None
    if upright.width == 0 or upright.height == 0:
        raise ImageError(path, f"the image has no pixels ({upright.width}x{upright.height})")
    try:
        return to_rgb_or_rgba(upright)
    except ValueError as error:
        raise ImageError(path, f"unsupported pixel format {upright.mode} ({_describe(error)})") from None


def to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """`image` as 8-bit 'RGBA' if it carries any transparency, else as 8-bit 'RGB'."""
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_8bit(image)
    return image.convert("RGBA" if has_alpha(image) else "RGB")


def has_alpha(image: Image.Image) -> bool:
    """An alpha band (straight or premultiplied) or a transparent colour key (tRNS)."""
    bands = image.getbands()
    return "A" in bands or "a" in bands or image.info.get("transparency") is not None


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


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except OSError as error:
        raise ImageError(path, f"cannot read it ({_describe(error)})") from None
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Point Pillow's decompression-bomb check at `max_pixels` and make its warning (which
    Pillow only prints for sizes between the limit and twice the limit) an error."""
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _unidentified_reason(path: Path) -> str:
    # Pillow reports a file whose header it cannot parse exactly like a file in an unknown
    # format; the signature tells the user which of the two they have.
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError:
        head = b""
    for signature, name in _SIGNATURES:
        if head.startswith(signature) and (name != "WebP" or head[8:12] == b"WEBP"):
            return f"corrupt {name} file (it starts like one, but its header cannot be parsed)"
    return "not a PNG, JPEG, WebP, TIFF or BMP image"


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return " ".join(error.strerror.split())
    return one_line(error)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` as a PNG at `path` through a temporary file, so `path` is either the
    complete image or untouched."""
    target = Path(path)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target


def collect_inputs(paths: Iterable[str | os.PathLike],
                   exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Expand files and folders into the list of images to process.

    A named file is always kept, whatever its extension, so a wrong file is reported
    rather than skipped. A folder contributes every file with an image extension
    (case-insensitive) below it, sorted, skipping hidden entries (dotfiles such as
    macOS '._x.png' resource forks, '.git') and the folders in `exclude`. A path that
    does not exist raises ImageError. Each file appears once, at its first mention.
    """
    skipped = {Path(folder).resolve() for folder in exclude}
    found: dict[Path, None] = {}
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.update(dict.fromkeys(_images_below(path, skipped)))
        elif path.exists():
            found[path] = None
        else:
            raise ImageError(path, "no such file or directory")
    return list(found)


def _images_below(folder: Path, skipped: set[Path]) -> list[Path]:
    if folder.resolve() in skipped:
        return []
    images = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in skipped]
        images.extend(Path(root) / f for f in files
                      if not f.startswith(".") and Path(f).suffix.lower() in INPUT_EXTENSIONS)
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
