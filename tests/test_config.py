"""Configs are user input: every field of UNetConfig and ScheduleConfig holds its declared type, and a
bad config.json is one line naming the file and the field."""

import json

import pytest

import sr3_engine as sr3
from sr3_engine.config import MAX_SCHEDULE_STEPS, ScheduleConfig, UNetConfig
from sr3_engine.runtime import model_dir

TINY = UNetConfig.named("tiny").to_dict()


@pytest.mark.parametrize("field, value, message", [
    ("channel_mults", "122", "UNetConfig.channel_mults must be a list of integers; got '122'"),
    ("channel_mults", [1, 2.0], "UNetConfig.channel_mults must be a list of integers; got (1, 2.0)"),
    ("attn_resolutions", [True], "UNetConfig.attn_resolutions must be a list of integers; got (True,)"),
    ("attn_resolutions", [0], "UNetConfig.attn_resolutions must be positive integers; got (0,)"),
    ("inner_channels", "16", "UNetConfig.inner_channels must be an integer; got '16'"),
    ("inner_channels", 16.0, "UNetConfig.inner_channels must be an integer; got 16.0"),
    ("norm_groups", True, "UNetConfig.norm_groups must be an integer; got True"),
    ("dropout", "0", "UNetConfig.dropout must be a finite number; got '0'"),
    ("dropout", float("nan"), "UNetConfig.dropout must be a finite number; got nan"),
    ("skip_rescale", 1, "UNetConfig.skip_rescale must be true or false; got 1"),
    ("noise_level_input", None, "UNetConfig.noise_level_input must be a string; got None"),
    ("residual_scale", "4", "UNetConfig.residual_scale must be a finite number or null; got '4'"),
    ("residual_scale", 0, "UNetConfig.residual_scale must be positive or null; got 0"),
    ("residual_scale", -2.5, "UNetConfig.residual_scale must be positive or null; got -2.5"),
])
def test_unet_config_fields_hold_their_types(field, value, message):
    with pytest.raises(ValueError) as info:
        UNetConfig.from_dict({**TINY, field: value})
    assert str(info.value) == message


def test_json_numbers_that_are_exact_still_load():
    assert UNetConfig.from_dict({**TINY, "dropout": 0}).dropout == 0
    assert UNetConfig.from_dict(json.loads(UNetConfig.named("tiny").to_json())) == UNetConfig.named("tiny")


@pytest.mark.parametrize("entry, message", [
    ({"steps": 10**10}, f"ScheduleConfig.steps must be an integer in [1, {MAX_SCHEDULE_STEPS}]; got 10000000000"),
    ({"steps": 0}, f"ScheduleConfig.steps must be an integer in [1, {MAX_SCHEDULE_STEPS}]; got 0"),
    ({"steps": 100.0}, "ScheduleConfig.steps must be an integer; got 100.0"),
    ({"steps": "100"}, "ScheduleConfig.steps must be an integer; got '100'"),
    ({"respace": 1.5}, "ScheduleConfig.respace must be an integer or null; got 1.5"),
    ({"start": "1e-4"}, "ScheduleConfig.start must be a finite number; got '1e-4'"),
    ({"kind": 3}, "ScheduleConfig.kind must be a string; got 3"),
])
def test_schedule_config_fields_hold_their_types_and_steps_are_bounded(entry, message):
    with pytest.raises(ValueError) as info:
        ScheduleConfig.from_dict(entry)
    assert str(info.value) == message
    assert ScheduleConfig(steps=MAX_SCHEDULE_STEPS).steps == MAX_SCHEDULE_STEPS


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(scale=2.7), "scale must be an integer in [1, 32]; got 2.7"),
    (lambda d: d.update(scale=1000), "scale must be an integer in [1, 32]; got 1000"),
    (lambda d: d.update(scale="four"), "scale must be an integer in [1, 32]; got 'four'"),
    (lambda d: d.update(format_version="1"), "format_version must be an integer; got '1'"),
    (lambda d: d["model"].update(channel_mults="122"),
     "model: UNetConfig.channel_mults must be a list of integers; got '122'"),
    (lambda d: d["schedule"].update(steps=10**10),
     f"schedule: ScheduleConfig.steps must be an integer in [1, {MAX_SCHEDULE_STEPS}]; got 10000000000"),
])
def test_a_bad_config_json_is_one_line_naming_the_file_and_the_field(tiny_model, tmp_path, edit, message):
    sr3.SR3Engine(tiny_model, scale=2, progress=False).save_pretrained(tmp_path)
    document = json.loads((tmp_path / "config.json").read_text())
    edit(document)
    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError) as info:
        model_dir.read_spec(tmp_path)
    assert str(info.value) == f"{tmp_path / 'config.json'}: {message}"


def test_a_config_without_residual_scale_diffuses_the_image_and_one_with_it_round_trips():
    old = {key: value for key, value in TINY.items() if key != "residual_scale"}
    assert UNetConfig.from_dict(old).residual_scale is None
    residual = UNetConfig.from_dict({**TINY, "residual_scale": 4})
    assert residual.residual_scale == 4 and UNetConfig.from_json(residual.to_json()) == residual
