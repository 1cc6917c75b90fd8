"""Run configs: YAML loading, shorthands, `key.sub=value` overrides, and errors that name key and line."""

from __future__ import annotations

import re
import textwrap

import pytest

from tunelab.config import DataConfig, RunConfig, TrainConfig, dump_config, load_config
from tunelab.errors import TunelabError

VALID = """\
model: tiny-random-llama
data:
  train: data/train.jsonl
  max_length: 256
method:
  name: lora
  r: 8
  target: [q_proj, v_proj]
train:
  max_steps: 20
  lr: 0.001
  batch_size: 4
output: runs/test
"""


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def line_of(text: str, fragment: str) -> int:
    """The 1-based line of the only line of `text` containing `fragment`."""
    lines = [n for n, line in enumerate(textwrap.dedent(text).splitlines(), start=1) if fragment in line]
    assert len(lines) == 1, f"{fragment!r} is on lines {lines}"
    return lines[0]


def config_error(path, overrides=None) -> str:
    with pytest.raises(TunelabError) as info:
        load_config(path, overrides)
    return str(info.value)


def error_line(message: str, key: str) -> str:
    """The line of a multi-error message that is about `key`."""
    about = [line for line in message.splitlines() if f"`{key}`" in line]
    assert about, f"no error names `{key}` in:\n{message}"
    return about[0]


# --- valid configs ------------------------------------------------------------------------------


def test_valid_file_loads_with_model_shorthand(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert isinstance(config, RunConfig)
    assert config.model.name == "tiny-random-llama"
    assert config.model.dtype == "auto"  # the other model keys keep their defaults
    assert config.data.train == "data/train.jsonl"
    assert config.data.max_length == 256
    assert (config.method.name, config.method.r, config.method.target) == ("lora", 8, ["q_proj", "v_proj"])
    assert (config.train.max_steps, config.train.lr, config.train.batch_size) == (20, 0.001, 4)
    assert config.output == "runs/test"


def test_method_shorthand_and_defaults(tmp_path):
    config = load_config(write(tmp_path, "model: m\ndata:\n  train: t.jsonl\nmethod: full\n"))
    assert config.method.name == "full"
    default = load_config(write(tmp_path, "model: m\ndata:\n  train: t.jsonl\n", "default.yaml"))
    assert default.method.name == "lora"
    assert default.train == TrainConfig()
    assert default.data == DataConfig(train="t.jsonl")


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path, VALID),
        [
            "train.batch_size=16",
            "train.lr=1e-4",
            "train.warmup=0.1",
            "method.target=[o_proj, k_proj, up_proj]",
            "data.packing=false",
            "train.adam_betas=[0.8, 0.95]",
            "output=runs/other",
        ],
    )
    assert config.train.batch_size == 16 and isinstance(config.train.batch_size, int)
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)
    assert config.train.warmup == pytest.approx(0.1)
    assert config.method.target == ["o_proj", "k_proj", "up_proj"]
    assert config.data.packing is False
    assert config.train.adam_betas == (0.8, 0.95)
    assert config.output == "runs/other"
    # keys not overridden keep the file's values
    assert (config.method.r, config.train.max_steps, config.data.max_length) == (8, 20, 256)


def test_override_sub_key_of_model_given_as_a_string(tmp_path):
    config = load_config(write(tmp_path, VALID), ["model.dtype=float32", "model.device=cpu"])
    assert config.model.name == "tiny-random-llama"
    assert (config.model.dtype, config.model.device) == ("float32", "cpu")


def test_override_sub_key_of_method_given_as_a_string(tmp_path):
    path = write(tmp_path, "model: m\ndata:\n  train: t.jsonl\nmethod: lora\n")
    config = load_config(path, ["method.r=4", "method.dropout=0.1"])
    assert (config.method.name, config.method.r, config.method.dropout) == ("lora", 4, 0.1)


def test_override_adds_a_section_absent_from_the_file(tmp_path):
    config = load_config(write(tmp_path, "model: m\ndata:\n  train: t.jsonl\n"), ["train.epochs=2"])
    assert config.train.epochs == 2.0


def test_dict_overrides_are_nested(tmp_path):
    config = load_config(write(tmp_path, VALID), {"train": {"lr": 0.5}, "data": {"too_long": "drop"}})
    assert config.train.lr == 0.5 and config.data.too_long == "drop"
    assert config.train.batch_size == 4  # siblings of an overridden key stay


def test_dump_then_load_round_trips(tmp_path):
    config = load_config(write(tmp_path, VALID), ["model.dtype=bfloat16"])
    dump_config(config, tmp_path / "dumped.yaml")
    assert load_config(tmp_path / "dumped.yaml") == config


def test_dict_source_is_not_modified(tmp_path):
    source = {"model": "m", "data": {"train": "t.jsonl"}}
    load_config(source, ["data.max_length=64"])
    assert source == {"model": "m", "data": {"train": "t.jsonl"}}


# --- errors name the key and where it is ---------------------------------------------------------


@pytest.mark.parametrize(
    "section, bad_line, key",
    [
        ("", "modle: x", "modle"),
        ("train:\n  max_steps: 5\n", "  lerning_rate: 0.1", "train.lerning_rate"),
        ("data:\n  train: t.jsonl\n", "  max_lenght: 64", "data.max_lenght"),
        ("method:\n  name: lora\n", "  rank: 4", "method.rank"),
    ],
)
def test_unknown_key_names_dotted_key_and_line(tmp_path, section, bad_line, key):
    # the base config defines `data` and `model`; the bad section comes after it
    base = "model: m\n" + ("" if section.startswith("data:") else "data:\n  train: t.jsonl\n")
    text = base + section + bad_line + "\n"
    path = write(tmp_path, text)
    message = config_error(path)
    line = error_line(message, key)
    assert f"{path}:{line_of(text, bad_line.strip())}:" in line
    assert "unknown key" in line


@pytest.mark.parametrize(
    "key, yaml_line, expected_words",
    [
        ("train.batch_size", "  batch_size: abc", "integer"),
        ("train.lr", "  lr: -1", "greater than 0"),
        ("train.max_steps", "  max_steps: 0", "greater than or equal to 1"),
        ("data.max_length", "  max_length: 0", "greater than or equal to 8"),
        ("data.too_long", "  too_long: cut", "truncate"),
        ("method.r", "  r: 0", "greater than or equal to 1"),
        ("method.dropout", "  dropout: 1.5", "less than 1"),
        ("model.dtype", "  dtype: float8", "float32"),
    ],
)
def test_bad_value_names_key_and_line(tmp_path, key, yaml_line, expected_words):
    section, name = key.split(".")
    sections = {
        "model": ["  name: m"],
        "data": ["  train: t.jsonl"],
        "method": ["  name: lora"],
        "train": [],
    }
    sections[section].append(yaml_line)
    text = "".join(f"{s}:\n" + "".join(line + "\n" for line in lines) for s, lines in sections.items() if lines)
    path = write(tmp_path, text)
    message = config_error(path)
    line = error_line(message, key)
    assert f"{path}:{line_of(text, yaml_line.strip())}:" in line
    assert expected_words in line


def test_every_error_of_a_file_is_reported_at_once(tmp_path):
    text = "model: m\ndata:\n  train: t.jsonl\n  max_length: 1\ntrain:\n  lr: 0\n  batch_sise: 2\n"
    message = config_error(write(tmp_path, text))
    for key in ("data.max_length", "train.lr", "train.batch_sise"):
        error_line(message, key)


def test_unknown_method_name(tmp_path):
    text = "model: m\ndata:\n  train: t.jsonl\nmethod:\n  name: dora\n  r: 4\n"
    path = write(tmp_path, text)
    line = error_line(config_error(path), "method.name")
    assert "dora" in line and "lora" in line  # names the bad one and the choices
    assert f"{path}:{line_of(text, 'name: dora')}:" in line


def test_unknown_method_name_as_shorthand(tmp_path):
    path = write(tmp_path, "model: m\ndata:\n  train: t.jsonl\nmethod: qlora_plus\n")
    assert "qlora_plus" in error_line(config_error(path), "method")


def test_both_eval_sources_fail(tmp_path):
    text = "model: m\ndata:\n  train: t.jsonl\n  eval: e.jsonl\n  eval_split: 0.1\n"
    message = config_error(write(tmp_path, text))
    assert "data.eval" in message and "data.eval_split" in message


def test_both_max_steps_and_epochs_fail(tmp_path):
    text = "model: m\ndata:\n  train: t.jsonl\ntrain:\n  max_steps: 10\n  epochs: 2\n"
    message = config_error(write(tmp_path, text))
    assert "train.max_steps" in message and "train.epochs" in message


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_eval_split_must_be_a_fraction(tmp_path, value):
    text = f"model: m\ndata:\n  train: t.jsonl\n  eval_split: {value}\n"
    error_line(config_error(write(tmp_path, text)), "data.eval_split")


def test_missing_required_keys_are_named(tmp_path):
    message = config_error(write(tmp_path, "train:\n  lr: 0.1\n"))
    assert "`model`" in message and "`data`" in message


def test_missing_nested_required_key_points_at_its_parent(tmp_path):
    text = "model: m\ndata:\n  max_length: 64\n"
    path = write(tmp_path, text)
    line = error_line(config_error(path), "data.train")
    assert f"{path}:{line_of(text, 'data:')}:" in line


def test_bad_override_is_attributed_to_the_command_line(tmp_path):
    message = config_error(write(tmp_path, VALID), ["train.lr=-3", "method.rank=2"])
    assert "command-line override" in error_line(message, "train.lr")
    assert "command-line override" in error_line(message, "method.rank")
    assert "run.yaml" not in message


@pytest.mark.parametrize("override", ["train.lr", "=3", "data.train.path=x"])
def test_malformed_override(tmp_path, override):
    with pytest.raises(TunelabError, match=re.escape(override.partition("=")[0] or "key.sub=value")):
        load_config(write(tmp_path, VALID), [override])


@pytest.mark.parametrize(
    "text, bad_fragment",
    [
        ("model: m\ndata:\n  train: t.jsonl\n  eval: a: b\n", "eval: a: b"),
        ("model: m\ndata:\n  train: t.jsonl\ntrain:\n\tlr: 0.1\n", "\tlr: 0.1"),
        ("model: m\ndata:\n  train: t.jsonl\n- item\n", "- item"),
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path, text, bad_fragment):
    path = write(tmp_path, text)
    message = config_error(path)
    assert f"{path}:{line_of(text, bad_fragment)}:" in message
    assert "invalid YAML" in message


@pytest.mark.parametrize("text", ["- model: m\n", "just a string\n"])
def test_config_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    assert str(path) in config_error(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(TunelabError, match="not found"):
        load_config(tmp_path / "absent.yaml")
