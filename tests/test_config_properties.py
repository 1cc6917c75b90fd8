"""Properties of the config loader: whatever the file holds and whatever the overrides say,
`load_config` returns a valid RunConfig or raises TunelabError, never anything else."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError
from tunelab.methods.registry import method_names, method_options_model
from tunelab.objectives.registry import objective_names, objective_options_model

# The function-scoped fixtures (record_property, the cache folder) hold nothing an input changes.
SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a pydantic model, its nested models' included."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += schema_keys(annotation, f"{prefix}{name}.")
    return keys


def literal_values(model: type[BaseModel]) -> set:
    """The choices of every Literal field of a model (valid values the schema names)."""
    found = set()
    for info in model.model_fields.values():
        stack = [info.annotation]
        while stack:
            annotation = stack.pop()
            if typing.get_origin(annotation) is typing.Literal:
                found |= set(typing.get_args(annotation))
            else:
                stack += [arg for arg in typing.get_args(annotation) if not isinstance(arg, (str, int))]
    return found


OPTIONS = {"method": [method_options_model(name) for name in method_names()], "objective": [objective_options_model(name) for name in objective_names()]}
KEYS = sorted({*schema_keys(RunConfig), *(f"{section}.{key}" for section, models in OPTIONS.items() for model in models for key in schema_keys(model))})
SECTIONS = [info.annotation for info in RunConfig.model_fields.values() if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)]
NAMES = sorted({"tiny-random-llama", *(v for model in [*SECTIONS, *OPTIONS["method"], *OPTIONS["objective"]] for v in literal_values(model) if isinstance(v, str))})
VALID = {"model": "tiny-random-llama", "data": {"train": "train.jsonl"}, "method": {"name": "lora", "r": 4}, "train": {"max_steps": 2, "lr": 0.001}}

# Top-level keys and the keys validators look at first: drawn as often as all the others together.
VALIDATED_KEYS = sorted({*RunConfig.model_fields, "method.name", "method.from_peft", "objective.name", "train.optimizer"})
keys = st.sampled_from(KEYS) | st.sampled_from(VALIDATED_KEYS)
# Pieces of YAML syntax (tags, anchors, flow and block collections, scalars YAML resolves to
# other types) for texts that are nearly YAML configs.
YAML_PIECES = [
    *(f"{key.rpartition('.')[2]}:" for key in VALIDATED_KEYS),
    *("name:", "r:", "lr:", "train:", "\n", "\n  ", "\n    ", "- ", ": ", ", ", "[", "]", "{", "}", "'", '"', "#", "&a ", "*a", "<<: ", "? ", "|", ">"),
    *("!!int ", "!!float ", "!!timestamp ", "!!binary ", "!!set ", "!!python/object/apply:os.system ", "!!python/name:os.getcwd ", "!custom "),
    *("~", "null", "yes", "0x1F", "1e-3", ".inf", "2024-13-45", "2024-01-02 03:04:05", "12:30:00", "lora", "tiny-random-llama", "\t", "\x00", "\ufeff"),
]
yaml_like_texts = st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=4), max_size=40).map("".join)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=64),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(NAMES),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys | st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def near_valid_configs(draw) -> dict:
    """A valid config with a few keys of the schema set to drawn values, or removed."""
    config = yaml.safe_load(yaml.safe_dump(VALID))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        *sections, leaf = draw(keys).split(".")
        node = config
        for section in sections:
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node = node[section]
        if draw(st.integers(min_value=0, max_value=5)) == 0:
            node.pop(leaf, None)
        else:
            node[leaf] = draw(values)
    return config


configs = st.one_of(near_valid_configs(), st.dictionaries(keys | st.text(max_size=8), values, max_size=6), values)
yaml_texts = st.builds(lambda config, flow: yaml.safe_dump(config, default_flow_style=flow, allow_unicode=True), configs, st.sampled_from([False, True, None]))
override_strings = st.lists(
    st.one_of(st.text(max_size=30), st.builds(lambda key, value: f"{key}={value}", keys, st.text(max_size=20) | yaml_like_texts | yaml_texts)),
    max_size=3,
)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("property") / "run.yaml"


def load_or_refuse(path: Path, overrides: list[str]) -> RunConfig | TunelabError:
    """load_config's result, or its TunelabError; any other exception escapes (and fails the test)."""
    try:
        return load_config(path, overrides)
    except TunelabError as err:
        return err


def check_outcome(outcome, path: Path) -> None:
    if isinstance(outcome, RunConfig):
        assert RunConfig.model_validate(outcome.to_dict()) == outcome  # a valid config, round-tripping
    else:  # an error names where: the file, or the override
        assert str(path) in str(outcome) or "override" in str(outcome), str(outcome)


@SETTINGS
@given(content=st.one_of(st.text(), st.binary(), yaml_like_texts), overrides=override_strings)
def test_any_file_content_loads_or_is_refused(content, overrides, config_path, record_property):
    record_property("reliability", "property: config loader")
    config_path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    check_outcome(load_or_refuse(config_path, overrides), config_path)


@SETTINGS
@given(text=yaml_texts, overrides=override_strings)
def test_any_yaml_structure_loads_or_is_refused(text, overrides, config_path, record_property):
    record_property("reliability", "property: config loader")
    config_path.write_text(text, encoding="utf-8")
    check_outcome(load_or_refuse(config_path, overrides), config_path)


def test_the_structures_reach_valid_configs(config_path, record_property):
    """The drawn structures are not all refused: valid configs (other than VALID itself) are drawn too."""
    record_property("reliability", "property: config loader")

    def loads_changed(config) -> bool:
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return config != VALID and isinstance(load_or_refuse(config_path, []), RunConfig)

    assert loads_changed(find(near_valid_configs(), loads_changed, settings=settings(database=None, max_examples=2000)))
