"""Model directories: model.safetensors is checked against config.json before any network is
built or any tensor read (docs/ARCHITECTURE.md, Contracts: "Model directories"), and a mismatch
is one short line, for the library and for `upscale`."""

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sr3_engine.__main__ import main
from sr3_engine.runtime import model_dir
from sr3_engine.unet import SR3UNet

DEMO = model_dir.ASSETS_DIR / "demo-x4"
SHORT = 300  # characters a mismatch line may take (the paths here are pytest's, about 80)


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fails the test if model_dir builds a network anywhere but on the meta device, or reads tensor data."""
    def only_on_meta(config):
        assert torch.get_default_device().type == "meta", "a network was allocated before the weights were checked"
        return SR3UNet(config)

    def no_tensor_read(*args, **kwargs):
        raise AssertionError("tensor data was read before the header was checked")

    monkeypatch.setattr(model_dir, "SR3UNet", only_on_meta)
    monkeypatch.setattr(model_dir, "load_file", no_tensor_read)


def _demo_with(tmp_path: Path, **model) -> Path:
    """A copy of demo-x4 whose config.json asks for another network, the weights left as they are."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in (model_dir.CONFIG_FILE, model_dir.WEIGHTS_FILE):
        shutil.copy(DEMO / name, directory / name)
    document = json.loads((directory / model_dir.CONFIG_FILE).read_text())
    document["model"].update(model)
    (directory / model_dir.CONFIG_FILE).write_text(json.dumps(document))
    return directory


def _differences(expected: dict[str, tuple[int, ...]], weights: Path) -> list[str]:
    """The names where a safetensors file (read by safetensors itself) and a state_dict's shapes differ,
    in the state_dict's order, then the file's unexpected names."""
    with safe_open(str(weights), "pt") as file:
        found = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    return [name for name, shape in expected.items() if found.get(name) != shape] + \
        [name for name in found if name not in expected]


def _run_upscale(tmp_path: Path, directory: Path) -> int:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return main(["upscale", str(image), "-o", str(tmp_path / "out"), "--model", str(directory), "--steps", "2",
                 "--no-progress"])


def test_the_bundled_model_loads_bit_identically():
    model, spec = model_dir.load("demo-x4")
    stored = load_file(str(DEMO / model_dir.WEIGHTS_FILE))
    state = model.state_dict()
    # float16 on disk: half the bytes of the float32 parameters, which the byte check must allow.
    assert {value.dtype for value in stored.values()} == {torch.float16}
    assert state.keys() == stored.keys()
    assert all(value.dtype == torch.float32 and torch.equal(value, stored[name].float())
               for name, value in state.items())


@pytest.mark.parametrize("edit", [{"channel_mults": [1] * 200}, {"inner_channels": 100_000}],
                         ids=["200 levels", "inner_channels 100000"])
def test_a_config_asking_for_another_network_is_one_short_line_before_anything_is_allocated(
        tmp_path, nothing_allocated, edit):
    directory = _demo_with(tmp_path, **edit)
    config = model_dir.read_spec(directory).model
    if "inner_channels" in edit:  # 160 GB: its shapes can only be read off the meta device
        with torch.device("meta"):
            expected = {name: tuple(value.shape) for name, value in SR3UNet(config).state_dict().items()}
    else:
        expected = {name: tuple(value.shape) for name, value in SR3UNet(config).state_dict().items()}
    differences = _differences(expected, directory / model_dir.WEIGHTS_FILE)
    with pytest.raises(ValueError) as info:
        model_dir.load(directory)
    message = str(info.value)
    assert message.startswith(f"{directory / model_dir.WEIGHTS_FILE}: does not match config.json (")
    assert len(message) < SHORT and "\n" not in message
    more = int(re.fullmatch(r".*; and ([\d,]+) more differences\)", message).group(1).replace(",", ""))
    named = differences[:len(differences) - more]
    positions = [message.find(f"{name} ") for name in named]
    assert named and -1 not in positions and positions == sorted(positions)


@pytest.mark.parametrize("edit", [{"channel_mults": [1] * 200}, {"inner_channels": 100_000}],
                         ids=["200 levels", "inner_channels 100000"])
def test_upscale_exits_2_with_one_short_error_line(tmp_path, capsys, nothing_allocated, edit):
    directory = _demo_with(tmp_path, **edit)
    assert _run_upscale(tmp_path, directory) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {directory / model_dir.WEIGHTS_FILE}: does not match config.json (")
    assert err.count("\n") == 1 and len(err) < SHORT and not (tmp_path / "out").exists()


def test_a_header_claiming_shapes_the_file_does_not_hold_is_refused_before_allocation(tmp_path, nothing_allocated):
    directory = _demo_with(tmp_path, inner_channels=100_000)
    with torch.device("meta"):
        shapes = {name: list(value.shape) for name, value in
                  SR3UNet(model_dir.read_spec(directory).model).state_dict().items()}
    header = json.dumps({name: {"dtype": "F16", "shape": shape, "data_offsets": [0, 8]}
                         for name, shape in shapes.items()}).encode()
    (directory / model_dir.WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    needed = 2 * sum(int(np.prod(shape)) for shape in shapes.values())
    with pytest.raises(ValueError) as info:
        model_dir.load(directory)
    assert str(info.value) == (f"{directory / model_dir.WEIGHTS_FILE}: config.json's network needs {needed:,} bytes "
                               "of weights in the dtypes the header gives; the file holds 8")


def _with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("content, message", [
    (struct.pack("<Q", 2**40) + b"{}", "declares a 1,099,511,627,776-byte safetensors header; more than the "
                                        "16,777,216 bytes read"),
    (struct.pack("<Q", 1000) + b"{}", "not a readable safetensors file (a 1,000-byte header declared in 10 bytes)"),
    (b"\x01\x00", "not a readable safetensors file (shorter than the 8 bytes of its header length)"),
    (_with_header(b"[" * 100_000), "not a readable safetensors file (its header is not valid JSON: "),
    (_with_header(b'{"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}', bytes(8)),
     "x: dtype I64 is not one of ['BF16', 'F16', 'F32', 'F64', 'F8_E4M3', 'F8_E5M2']"),
    (_with_header(b'{"a\\nb": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}'),
     "a\\nb: shape [-1] is not a list of sizes"),
], ids=["over the cap", "past the end", "no length", "nested JSON", "integer dtype", "negative size"])
def test_a_bad_header_is_one_line_before_any_tensor_is_read(tmp_path, nothing_allocated, content, message):
    directory = _demo_with(tmp_path)
    (directory / model_dir.WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(ValueError) as info:
        model_dir.load(directory)
    assert str(info.value).startswith(f"{directory / model_dir.WEIGHTS_FILE}: {message}")
    assert "\n" not in str(info.value)


def test_a_mismatch_names_its_differences_in_order_and_counts_the_rest():
    expected = {"a": (1,), "b": (2, 3), "c": (4,)}
    assert model_dir.shape_mismatch(expected, {"a": (1,), "b": (2, 3), "c": (4,)}) is None
    assert model_dir.shape_mismatch(expected, {"a": (1,), "b": (3, 2), "d": (4,)}) == \
        "b is [3, 2], not [2, 3]; missing c; unexpected d"
    many = {f"w{i}": (i,) for i in range(1000)}
    message = model_dir.shape_mismatch(many, {})
    shown = message.split("; and ")[0].split("; ")
    assert shown == [f"missing w{i}" for i in range(len(shown))]
    assert message.endswith(f"; and {1000 - len(shown):,} more differences")
    assert len(model_dir.shape_mismatch({"n" * 10_000: (1,)}, {})) < 60

