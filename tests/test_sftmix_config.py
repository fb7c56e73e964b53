"""`SFTMixConfig` and `ConfidenceConfig`: every field documented in the docstring's Parameters block as TRL's configs
do, and the fields with choices typed `Literal`, which the parser and Python construction both enforce."""

import ast
import dataclasses
import re
import typing

import pytest

from sftmix_trl import SFTMixError
from sftmix_trl.confidence import ConfidenceConfig
from sftmix_trl.sftmix.config import SFTMixConfig


def own_fields(config_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_type) if f.name in vars(config_type).get("__annotations__", {})]


def documented(config_type: type) -> dict[str, str]:
    """Field name -> the `(...)` text of its entry in the docstring's Parameters block."""
    block = config_type.__doc__.split("Parameters:", 1)[1]
    return dict(re.findall(r"^ {8}(\w+) \((.+)\):$", block, flags=re.MULTILINE))


@pytest.mark.parametrize("config_type", [SFTMixConfig, ConfidenceConfig])
def test_every_field_is_documented_with_its_type_and_default(config_type):
    entries = documented(config_type)
    for spec in own_fields(config_type):
        assert spec.name in entries, f"{config_type.__name__}.{spec.name} has no entry in the docstring"
        if spec.default is None:
            assert "*optional*" in entries[spec.name] and "defaults to" not in entries[spec.name]
        else:
            stated = re.search(r"defaults to `(.+?)`", entries[spec.name])
            assert stated and ast.literal_eval(stated.group(1)) == spec.default, spec.name
    assert set(entries) == {spec.name for spec in own_fields(config_type)}, "an entry names no field"


def test_sftmix_config_points_to_every_stage1_field():
    stage1 = SFTMixConfig.__doc__.split("> Stage 1", 1)[1]
    assert [f.name for f in dataclasses.fields(ConfidenceConfig) if f"`{f.name}`" not in stage1] == []


@pytest.mark.parametrize(
    ("config_type", "name", "choices"),
    [
        (SFTMixConfig, "mixup_lambda_per", ("pair", "batch")),
        (ConfidenceConfig, "prompt_fit_model", ("base", "reference")),
    ],
)
def test_fields_with_choices_are_typed_literal(config_type, name, choices):
    hint = typing.get_type_hints(config_type)[name]
    assert typing.get_origin(hint) is typing.Literal and typing.get_args(hint) == choices


def test_a_value_outside_a_literal_field_is_refused_in_python(tmp_path):
    with pytest.raises(SFTMixError, match=r"`mixup_lambda_per` must be one of \['pair', 'batch'\], got 'batches'"):
        SFTMixConfig(output_dir=str(tmp_path), mixup_lambda_per="batches", report_to="none")
