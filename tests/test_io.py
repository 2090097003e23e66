"""sr3_engine.io: every input becomes 8-bit RGB/RGBA or one precise ImageError; writes are atomic."""

import os
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr3_engine.io import (ImageError, ImageWarning, atomic_path, check_writable, collect_inputs, image_warnings,
                           load_image, output_names, pil_to_tensor, printable, save_png, sweep_temporaries)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rgb(height=8, width=12, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def _error(path, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return info.value


@pytest.mark.parametrize("fmt, suffix, lossless", [
    ("PNG", ".png", True), ("TIFF", ".tif", True), ("WEBP", ".webp", True), ("BMP", ".bmp", True),
    ("JPEG", ".jpg", False),
])
def test_formats_load_as_rgb(tmp_path, fmt, suffix, lossless):
    source = _rgb()
    path = tmp_path / f"image{suffix}"
    source.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 8)
    if lossless:
        assert np.array_equal(np.asarray(image), np.asarray(source))


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    path = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (8, 16)
    top, bottom = np.asarray(image)[3, 4].astype(int), np.asarray(image)[12, 4].astype(int)
    assert top[0] > 200 and top[2] < 60, "the stored left half (red) must end up on top"
    assert bottom[2] > 200 and bottom[0] < 60


def test_grayscale_becomes_equal_rgb_channels(tmp_path):
    gray = np.arange(96, dtype=np.uint8).reshape(8, 12) * 2
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    image = load_image(tmp_path / "gray.png")
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.repeat(gray[..., None], 3, axis=2))


def test_palette_without_and_with_transparency(tmp_path):
    palette_image = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_image.save(tmp_path / "opaque.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "opaque.png")), np.asarray(palette_image.convert("RGB")))

    index = np.asarray(palette_image)[0, 0]
    palette_image.save(tmp_path / "keyed.png", transparency=int(index))
    keyed = load_image(tmp_path / "keyed.png")
    assert keyed.mode == "RGBA"
    alpha = np.asarray(keyed)[..., 3]
    assert np.array_equal(alpha == 0, np.asarray(palette_image) == index)


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535, 300]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 4, 128, 255, 1]


def test_16_bit_colour_key_becomes_alpha(tmp_path):
    values = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "keyed16.png", transparency=1000)
    image = load_image(tmp_path / "keyed16.png")
    assert image.mode == "RGBA"
    assert np.asarray(image)[0, :, 3].tolist() == [255, 0, 255]


def test_float_images_are_taken_as_unit_range(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 1].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("mode, expected", [("RGBA", "RGBA"), ("LA", "RGBA"), ("CMYK", "RGB"), ("1", "RGB"),
                                            ("LAB", "RGB")])  # the "A" band of CIELab is no alpha
def test_other_modes(tmp_path, mode, expected):
    path = tmp_path / ("image.tif" if mode in ("CMYK", "LAB") else "image.png")
    _rgb().convert(mode).save(path)
    image = load_image(path)
    assert image.mode == expected and image.size == (12, 8)


def test_rgba_keeps_its_alpha_values(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (8, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgba)


def test_pil_to_tensor_rescales_16_bit_images():
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert pil_to_tensor(deep)[:, 0].mul(255).round().tolist() == [[0, 128, 255]] * 3


def test_corrupt_png(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(200))
    assert "corrupt PNG" in _error(path).reason


def test_truncated_jpeg(tmp_path):
    _rgb(64, 64).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(path).reason.lower()


def test_truncated_png_fails_while_decoding(tmp_path):
    _rgb(64, 64).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _error(path).reason


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    assert _error(path).reason == "not a PNG, JPEG, WebP, TIFF or BMP image"


def test_formats_outside_the_allow_list_are_refused(tmp_path):
    _rgb().save(tmp_path / "image.gif")
    assert _error(tmp_path / "image.gif").reason == "not a PNG, JPEG, WebP, TIFF or BMP image"


def test_empty_missing_and_directory(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.png").reason
    assert _error(tmp_path / "missing.png").reason == "no such file"
    assert "directory" in _error(tmp_path).reason


@pytest.mark.parametrize("pixels", [150, 256, 10_000])  # Pillow warns up to 2x its limit and raises beyond
def test_pixel_limit(tmp_path, pixels):
    path = tmp_path / "big.png"
    Image.new("RGB", (pixels, 1)).save(path)
    limit_before = Image.MAX_IMAGE_PIXELS
    assert "limit of 100 pixels" in _error(path, max_pixels=100).reason
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert load_image(path, max_pixels=pixels).size == (pixels, 1)
    assert load_image(path, max_pixels=None).size == (pixels, 1)


def test_image_error_is_a_one_line_value_error():
    error = ImageError("dir/a.png", "bad\nthing  here")
    assert isinstance(error, ValueError)
    assert str(error) == "dir/a.png: bad thing here" and error.path == Path("dir/a.png")


def test_save_png_writes_a_png_and_leaves_no_temporary(tmp_path):
    target = save_png(_rgb(), tmp_path / "out" / "x.png")
    assert target == tmp_path / "out" / "x.png"
    with Image.open(target) as image:
        assert image.format == "PNG" and image.size == (12, 8)
    assert os.listdir(tmp_path / "out") == ["x.png"]


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"previous")
    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (4, 4)), target)  # PNG cannot hold CMYK
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["x.png"]


def test_of_two_exclusive_writers_of_one_name_exactly_one_wins(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(FileExistsError):
        with atomic_path(target, overwrite=False) as loser:
            loser.write_bytes(b"loser")
            with atomic_path(target, overwrite=False) as winner:
                winner.write_bytes(b"winner")
    assert target.read_bytes() == b"winner" and os.listdir(tmp_path) == ["x.png"]
    with pytest.raises(FileExistsError):
        save_png(_rgb(), target, overwrite=False)
    assert target.read_bytes() == b"winner" and os.listdir(tmp_path) == ["x.png"]
    save_png(_rgb(), target)
    assert Image.open(target).size == (12, 8)


def test_sweep_deletes_stale_temporaries_only(tmp_path):
    stale = tmp_path / ".a.png.0123abcd.tmp"
    stale.write_bytes(b"left by a killed run")
    others = [".a.png.tmp", "a.png.0123abcd.tmp", ".a.png.0123ABCD.tmp", ".a.png.0123abcde.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"not ours")
    (tmp_path / ".b.png.89abcdef.tmp").mkdir()
    with atomic_path(tmp_path / "c.png") as live:
        live.write_bytes(b"being written")
        assert sweep_temporaries(tmp_path) == [stale]
        assert live.read_bytes() == b"being written"
    assert (tmp_path / "c.png").read_bytes() == b"being written"
    assert sorted(os.listdir(tmp_path)) == sorted([*others, ".b.png.89abcdef.tmp", "c.png"])
    assert sweep_temporaries(tmp_path / "missing") == []


def test_the_temporary_of_a_killed_writer_is_swept(tmp_path):
    script = ("import os, signal, sys\n"
              "from sr3_engine.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.png")], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".x.png.") and left.name.endswith(".tmp")
    assert sweep_temporaries(tmp_path) == [left] and os.listdir(tmp_path) == []


def test_check_writable_probes_where_the_folder_is_or_would_be(tmp_path):
    check_writable(tmp_path)
    check_writable(tmp_path / "new" / "deeper")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        check_writable(tmp_path / "file")


def test_printable_shows_bytes_that_are_not_utf8():
    name = os.fsdecode(b"caf\xe9.png")
    assert printable(f"error: {name}") == "error: caf\\xe9.png"
    assert printable("café") == "café"


def test_atomic_path_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"data")
    finally:
        os.umask(previous)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_collect_inputs_recurses_sorts_and_keeps_named_files(tmp_path):
    for name in ("b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", ".hidden.png",
                 ".git/e.png", "sub/f.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    named = tmp_path / "notes.txt"
    found = collect_inputs([tmp_path, named, tmp_path / "b.png"])
    assert found == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "sub" / "c.webp",
                     tmp_path / "sub" / "deeper" / "d.tiff", tmp_path / "sub" / "f.bmp", named]


def test_collect_inputs_skips_excluded_folders(tmp_path):
    for name in ("a.png", "out/a.png", "out/deeper/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert collect_inputs([tmp_path], exclude=[tmp_path / "out"]) == [tmp_path / "a.png"]
    assert collect_inputs([tmp_path / "out"], exclude=[tmp_path / "out"]) == []
    assert collect_inputs([tmp_path / "out" / "a.png"], exclude=[tmp_path / "out"]) == [tmp_path / "out" / "a.png"]


def test_collect_inputs_keeps_named_paths_that_are_not_folders_to_be_reported(tmp_path):
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "x.png").mkdir()
    (tmp_path / "x.png" / "inside.png").write_bytes(b"x")
    named = [tmp_path / "nope", tmp_path / "loop.png", tmp_path / "x.png"]
    assert collect_inputs(named) == named
    assert _error(tmp_path / "nope").reason == "no such file"
    assert "cannot read it (Too many levels of symbolic links)" == _error(tmp_path / "loop.png").reason
    assert _error(tmp_path / "x.png").reason == "is a directory, not an image file"


def test_collect_inputs_keeps_what_a_folder_holds_under_an_image_name_but_is_not_a_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "x.png").mkdir()
    (tmp_path / "x.png" / "inside.png").write_bytes(b"x")  # a folder named like an image is not searched
    (tmp_path / "broken.png").symlink_to("nowhere.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "sub" / "not-an-image").mkdir()
    assert collect_inputs([tmp_path]) == [tmp_path / "a.png", tmp_path / "broken.png", tmp_path / "sub" / "loop.jpg",
                                          tmp_path / "x.png"]


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert _error(tmp_path / "pipe.png").reason == "not a regular file (a pipe, socket or device)"


@pytest.mark.parametrize("suffix, options", [(".tif", {}), (".png", {"duration": 100}),
                                             (".webp", {"duration": 100, "lossless": True})])
def test_only_the_first_frame_is_used_and_that_is_said(tmp_path, suffix, options):
    frames = [Image.new("RGB", (6, 4), (40 + 80 * i, 10, 200 - 60 * i)) for i in range(3)]
    path = tmp_path / f"frames{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], **options)
    with pytest.warns(ImageWarning) as caught:
        image = load_image(path)
    assert np.array_equal(np.asarray(image), np.asarray(frames[0]))
    assert [str(w.message) for w in caught] == [f"{path}: has 3 frames (a multi-page or animated image); "
                                                "only the first is used"]


def _damaged_exif() -> bytes:
    # One IFD entry (tag 0x010F, Make) whose 100 bytes of data lie beyond the end of the block.
    ifd = b"II*\x00" + struct.pack("<IHHHIII", 8, 1, 0x010F, 2, 100, 4000, 0)
    return b"Exif\x00\x00" + ifd


def test_pillow_warnings_about_damaged_exif_become_one_image_warning(tmp_path):
    path = tmp_path / "camera.jpg"
    _rgb().save(path, exif=_damaged_exif())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
    assert image.size == (12, 8)
    assert [(w.category, str(w.message)) for w in caught] == [
        (ImageWarning, f"{path}: damaged metadata skipped (Tag data larger than file. Skipping tag 271)")]


def test_image_warnings_hands_over_image_warnings_only(tmp_path):
    path = tmp_path / "frames.tif"
    Image.new("RGB", (4, 4)).save(path, save_all=True, append_images=[Image.new("RGB", (4, 4))])
    notes = []
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with image_warnings(notes.append):
            load_image(path)
            warnings.warn("unrelated", DeprecationWarning)
    assert [str(note) for note in notes] == [f"{path}: has 2 frames (a multi-page or animated image); "
                                             "only the first is used"]
    assert [(w.category, str(w.message)) for w in outside] == [(DeprecationWarning, "unrelated")]


def test_output_names_disambiguate_shared_stems():
    inputs = [Path("x/a.png"), Path("y/a.jpg"), Path("z/a-2.png"), Path("A.tif"), Path("b.png")]
    assert output_names(inputs) == ["a.png", "a-3.png", "a-2.png", "A-4.png", "b.png"]
    assert output_names([Path("p/a.png"), Path("q/a.png"), Path("r/a.png")]) == ["a.png", "a-2.png", "a-3.png"]
