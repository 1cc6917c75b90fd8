"""Bad configs for every command that reads one: run configs (`tunelab train`), eval task YAMLs
(`tunelab eval --task`) and sweep YAMLs (`tunelab compare`). Each ends in exit status 1 and one
error line naming the file and line (or the override) and the dotted key, with nothing written.

The wrong-typed and out-of-range values are generated from the pydantic schemas (RunConfig's
sections, every registered method's and objective's options, TaskConfig, SweepConfig), so a new
option is covered as soon as it exists.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from helpers import TINY_MODEL, assert_clean_failure, invoke, tiny_run_config, tree_state, write_yaml
from tunelab.compare.sweep import SweepConfig
from tunelab.config import RunConfig, load_config
from tunelab.config.schema import GALORE_DEFAULTS
from tunelab.eval.tasks import TaskConfig
from tunelab.methods.registry import method_names, method_options_model
from tunelab.objectives.registry import objective_names, objective_options_model

# ---- Writing a config as YAML, knowing the line of every key


def yaml_with_lines(mapping: dict) -> tuple[str, dict[str, int]]:
    """`mapping` as block-style YAML (scalars and lists of scalars as JSON, which YAML reads as
    written), and the 1-based line of each dotted key (a list item's by its index: `grid.0.name`)."""
    lines: list[str] = []
    key_lines: dict[str, int] = {}

    def block(node: dict, prefix: str, indent: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            key_lines[path] = len(lines) + 1
            if isinstance(value, dict) and value:
                lines.append(f"{indent}{key}:")
                block(value, f"{path}.", indent + "  ")
            elif isinstance(value, list) and value and all(isinstance(item, dict) and item for item in value):
                lines.append(f"{indent}{key}:")
                for index, item in enumerate(value):
                    first = len(lines)
                    key_lines[f"{path}.{index}"] = first + 1
                    block(item, f"{path}.{index}.", indent + "    ")
                    lines[first] = f"{indent}  - {lines[first].lstrip()}"
            else:
                lines.append(f"{indent}{key}: {json.dumps(value)}")
                if isinstance(value, list):  # a flow list: its items are on its line
                    key_lines.update({f"{path}.{index}": len(lines) for index in range(len(value))})

    block(mapping, "", "")
    return "\n".join(lines) + "\n", key_lines


def write_config(path: Path, mapping: dict) -> dict[str, int]:
    text, key_lines = yaml_with_lines(mapping)
    path.write_text(text)
    return key_lines


# ---- Bad values derived from a field's annotation and constraints

ANY_KIND = {str, int, float, bool, list, dict, type(None)}


def yaml_kinds(annotation) -> set[type]:
    """The kinds of YAML value (str, int, float, bool, list, dict, NoneType) an annotation accepts."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return ANY_KIND
    if origin is Annotated:
        return yaml_kinds(args[0])
    if origin in (Union, types.UnionType):
        return set().union(*(yaml_kinds(arg) for arg in args))
    if origin is Literal:
        return {type(arg) for arg in args}
    if annotation in (int, float):
        return {int, float}
    if annotation in (str, bool, type(None)):
        return {annotation}
    if origin in (list, tuple, set):
        return {list}
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return {dict}
    raise AssertionError(f"no YAML kind known for {annotation!r}: extend yaml_kinds")


def is_valid(value, annotation, metadata: list) -> bool:
    try:
        TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation).validate_python(value)
    except ValidationError:
        return False
    return True


def wrong_type_value(annotation, metadata: list):
    """A value of a YAML kind the field does not take: a list where a mapping belongs, else the
    first of a string, a list and a mapping that it does not take (None: it takes them all)."""
    kinds = yaml_kinds(annotation)
    candidates = (["not-a-mapping"], "not-a-value") if dict in kinds else ("not-a-value", ["not-a-value"], {"not-a-value": 1})
    for value in candidates:
        if type(value) not in kinds and not is_valid(value, annotation, metadata):
            return value
    return None


def bound_values(annotation, metadata: list) -> list[tuple[str, Any, str]]:
    """(which bound, a value just past it, where in the value: "" or a list item's ".0") for each
    constraint of the annotation and of its union members: ge/gt below, le/lt above, min_length one
    short, a Literal's unknown choice; the constraints of a list's items as a one-item list."""
    found = []
    for constraint in metadata:
        if isinstance(constraint, annotated_types.Ge):
            found.append(("below", constraint.ge - 1, ""))
        elif isinstance(constraint, annotated_types.Gt):
            found.append(("below", constraint.gt, ""))
        elif isinstance(constraint, annotated_types.Le):
            found.append(("above", constraint.le + 1, ""))
        elif isinstance(constraint, annotated_types.Lt):
            found.append(("above", constraint.lt, ""))
        elif isinstance(constraint, annotated_types.MinLen):
            assert constraint.min_length == 1, "a longer minimum needs valid items to fill it"
            found.append(("empty", "" if str in yaml_kinds(annotation) else [], ""))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        inner = [m for item in args[1:] for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        found += bound_values(args[0], inner)
    elif origin in (Union, types.UnionType):
        found += [bound for arg in args for bound in bound_values(arg, [])]
    elif origin is Literal:
        found.append(("choice", "not-a-choice", ""))
    elif origin is list:
        found += [(which, [value], f".0{item}") for which, value, item in bound_values(args[0], [])]
    return found


def out_of_range_values(annotation, metadata: list) -> list[tuple[str, Any, str]]:
    """The bound values the whole field refuses (a union member may take another's), one per value."""
    refused = {}
    for which, value, item in bound_values(annotation, metadata):
        if not is_valid(value, annotation, metadata):
            refused.setdefault(json.dumps(value), (which, value, item))
    return list(refused.values())


# ---- Cases: one config with one bad value


@dataclass(frozen=True)
class Case:
    id: str  # e.g. "train.lr-wrong-type", "method.lora.r-out-of-range"
    key: str  # the dotted key as the config spells it ("method.r"), a list item's by its index
    config: dict


def with_value(config: dict, path: tuple, value) -> dict:
    copy = json.loads(json.dumps(config))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copy


def model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (itself, or as the items of a list), if any."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def schema_cases(model: type[BaseModel], config: dict, path: tuple = (), name: str = "") -> list[Case]:
    """A wrong-typed value and each out-of-range value of every field of `model` (which validates
    the part of `config` at `path`), and of the models nested in it. `name`: the case ids' prefix
    (default: the dotted path)."""
    cases = []
    section = config
    for part in path:
        section = section[part]
    for field, info in model.model_fields.items():
        key = ".".join(map(str, (*path, field)))
        label = f"{name}.{field}" if name else key
        base = config
        for setting, value in CONTEXT.get(key, {}).items():
            base = with_value(base, setting, value)
        wrong = wrong_type_value(info.annotation, info.metadata)
        if wrong is not None:
            cases.append(Case(f"{label}-wrong-type", key, with_value(base, (*path, field), wrong)))
        bounds = out_of_range_values(info.annotation, info.metadata)
        for which, value, item in bounds:
            suffix = "" if len(bounds) == 1 else f"-{which}"
            cases.append(Case(f"{label}-out-of-range{suffix}", key + item, with_value(base, (*path, field), value)))
        nested = model_of(info.annotation)
        if nested is not None and isinstance(section.get(field), dict):
            cases += schema_cases(nested, base, (*path, field), label)
        elif nested is not None and isinstance(section.get(field), list):
            cases += schema_cases(nested, base, (*path, field, 0), f"{label}.0")
    return cases


# The values of required options (no default) in the minimal section of each method or objective.
REQUIRED_OPTIONS = {"teacher": TINY_MODEL, "rewards": [{"name": "exact_match"}]}
# Keys checked only in some setting of their section: the GaLore options need optimizer: galore.
CONTEXT = {f"train.{key}": {("train", "optimizer"): "galore"} for key in GALORE_DEFAULTS}


def minimal_section(options: type[BaseModel], name: str) -> dict:
    return {"name": name, **{field: REQUIRED_OPTIONS[field] for field, info in options.model_fields.items() if info.is_required()}}


# Valid configs of each kind; their files need not exist: every case fails before they are read.


def run_mapping(folder: Path) -> dict:
    return {**tiny_run_config(folder / "run", folder / "train.jsonl"), "objective": {"name": "sft"}}


def task_mapping(folder: Path) -> dict:
    return {"type": "exact_match", "data": str(folder / "rows.jsonl")}


def sweep_mapping(folder: Path) -> dict:
    base = {key: value for key, value in run_mapping(folder).items() if key != "output"}
    return {"base": base, "task": task_mapping(folder), "output": str(folder / "sweep"), "seeds": [0], "grid": [{"method": {"name": "lora"}}]}


def run_config_cases(folder: Path) -> list[Case]:
    """RunConfig's keys and sections, then each method's and objective's options (`method` and
    `objective` are validated by the options class their `name` picks)."""
    base = run_mapping(folder)
    cases = schema_cases(RunConfig, base)
    for section, names, options_of in (("method", method_names(), method_options_model), ("objective", objective_names(), objective_options_model)):
        cases.append(Case(f"{section}-wrong-type", section, with_value(base, (section,), ["not-a-mapping"])))
        for name in names:
            options = options_of(name)
            cases += schema_cases(options, with_value(base, (section,), minimal_section(options, name)), (section,), f"{section}.{name}")
    return cases


# The folder the generated configs' paths are in: each test puts its tmp_path there (see `moved`).
FOLDER = Path("/tunelab-test-folder")
COMMANDS = {
    "train": lambda path, *overrides: invoke("train", path, *overrides),
    "eval --task": lambda path, *overrides: invoke("eval", TINY_MODEL, *overrides, "--task", path),
    "compare": lambda path, *overrides: invoke("compare", path, *overrides),
}
GENERATED = {"train": run_config_cases(FOLDER), "eval --task": schema_cases(TaskConfig, task_mapping(FOLDER)), "compare": schema_cases(SweepConfig, sweep_mapping(FOLDER))}


def moved(config: dict, folder: Path) -> dict:
    """`config` with its paths in `folder` instead of FOLDER (so that a case wrongly taken as valid
    writes where the test sees it)."""
    return json.loads(json.dumps(config).replace(str(FOLDER), str(folder)))


def test_the_generator_covers_every_option(record_property):
    """Every method's and objective's options and every section have cases; each valid base
    config is valid (else its cases could fail for another reason)."""
    record_property("reliability", "configs")
    ids = {case.id for case in GENERATED["train"]}
    for name in method_names():
        assert {f"method.{name}.name-wrong-type", f"method.{name}.name-out-of-range", f"method.{name}.from_peft-wrong-type"} <= ids
    for name in objective_names():
        assert f"objective.{name}.name-out-of-range" in ids
        load_config(with_value(run_mapping(FOLDER), ("objective",), minimal_section(objective_options_model(name), name)))
    assert {"model-wrong-type", "train.lr-wrong-type", "train.lr-out-of-range", "method.lora.r-out-of-range", "data.eval_split-out-of-range-above"} <= ids
    assert {"objective.grpo.rewards.0.target-out-of-range", "train.galore_target-out-of-range-empty", "train.report_to-out-of-range"} <= ids
    assert {"max_new_tokens-out-of-range", "type-out-of-range"} <= {case.id for case in GENERATED["eval --task"]}
    assert {"grid.0.vary-wrong-type", "seeds-out-of-range", "base-wrong-type"} <= {case.id for case in GENERATED["compare"]}
    load_config(run_mapping(FOLDER))
    load_config(task_mapping(FOLDER), schema=TaskConfig)
    load_config(sweep_mapping(FOLDER), schema=SweepConfig)


@pytest.mark.parametrize("command, case", [pytest.param(command, case, id=f"{command.split()[0]}:{case.id}") for command, cases in GENERATED.items() for case in cases])
def test_a_bad_value_names_its_key_and_line(command, case, tmp_path, record_property):
    record_property("reliability", "configs")
    path = tmp_path / "config.yaml"
    key_lines = write_config(path, moved(case.config, tmp_path))
    before = tree_state(tmp_path)
    message = assert_clean_failure(COMMANDS[command](path), f"{path}:{key_lines[case.key]}: `{case.key}`")
    assert len(message.splitlines()) == 1, message  # one problem, one line
    assert tree_state(tmp_path) == before


# ---- Files that are not a config


@dataclass(frozen=True)
class FileCase:
    id: str
    content: bytes | None  # None: a directory
    expected: tuple[str, ...]  # pieces of the message besides the path; ":N" for its line


EVIL_TAGS = [
    '!!python/object/apply:os.system ["touch PWNED"]',
    "!!python/object/new:os.system [touch PWNED]",
    "!!python/object:tunelab.config.schema.RunConfig {model: x}",
    "!!python/name:os.system",
    "!!python/module:os",
]
FILE_CASES = [
    FileCase("empty-file", b"", ("empty",)),
    FileCase("only-comments", b"# nothing here\n\n", ("empty",)),
    FileCase("a-list", b"- model: tiny-random-llama\n- data: x\n", ("mapping",)),
    FileCase("a-string", b"just words\n", ("mapping",)),
    FileCase("not-utf8", b"model: tiny-random-llama\ndata:\n  train: \xff\xfe\x00bin\n", (":3", "UTF-8")),
    FileCase("binary", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, (":1", "UTF-8")),
    FileCase("nul-character", b"model: tiny\x00random\n", (":1", "invalid YAML")),
    FileCase("bad-int-tag", b"model: m\nseed: !!int twelve\n", (":2", "invalid YAML", "twelve")),
    FileCase("empty-int-tag", b"model: m\nseed: !!int\n", (":2", "invalid YAML")),
    FileCase("bad-bool-tag", b"model: m\npacking: !!bool maybe\n", (":2", "invalid YAML", "maybe")),
    FileCase("impossible-date", b"model: m\nname: 2024-13-45\n", (":2", "invalid YAML", "2024-13-45")),
    FileCase("unhashable-key", b"model: m\n? [a, b]\n: c\n", (":2", "invalid YAML")),
    FileCase("nested-too-deeply", b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n", ("invalid YAML",)),
    FileCase("a-directory", None, ("directory",)),
    *(FileCase(f"tag-{tag.split()[0].removeprefix('!!')}", f"model: m\ndata:\n  train: {tag}\n".encode(), (":3", "invalid YAML")) for tag in EVIL_TAGS),
]


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("case", FILE_CASES, ids=lambda case: case.id)
def test_a_file_that_is_not_a_config(command, case, tmp_path, monkeypatch, record_property):
    record_property("reliability", "configs")
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would land
    path = tmp_path / "config.yaml"
    if case.content is None:
        path.mkdir()
    else:
        path.write_bytes(case.content)
    before = tree_state(tmp_path)
    expected_line = [piece for piece in case.expected if piece.startswith(":")]
    others = [piece for piece in case.expected if not piece.startswith(":")]
    assert_clean_failure(COMMANDS[command](path), f"{path}{expected_line[0] if expected_line else ''}", *others)
    assert tree_state(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.content is not None], ids=lambda case: case.id)
def test_a_task_file_that_is_not_a_config(case, tmp_path, monkeypatch, record_property):
    record_property("reliability", "configs")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "task.yaml"
    path.write_bytes(case.content)
    before = tree_state(tmp_path)
    expected_line = [piece for piece in case.expected if piece.startswith(":")]
    others = [piece for piece in case.expected if not piece.startswith(":")]
    assert_clean_failure(COMMANDS["eval --task"](path), f"{path}{expected_line[0] if expected_line else ''}", *others)
    assert tree_state(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path, record_property):
    """ "Billion laughs": nine levels of nine aliases would be 9^9 strings, if anything expanded them."""
    record_property("reliability", "configs")
    levels = ", ".join(f"&l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, 9))
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndata: {{train: t}}\nbomb: [&l0 [{', '.join(['x'] * 9)}], {levels}]\n")
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("train", path), f"{path}:3: `bomb`: unknown key")
    assert tree_state(tmp_path) == before


def test_a_missing_config_file_names_where_it_was_looked_for(tmp_path, monkeypatch, record_property):
    record_property("reliability", "configs")
    monkeypatch.chdir(tmp_path)
    assert_clean_failure(invoke("train", "configs/run.yaml"), str(tmp_path / "configs" / "run.yaml"), str(tmp_path), "not found")


# ---- Anchors, aliases and merge keys: plain YAML, loaded as written out


ANCHORED = """\
model:
  name: &model_name tiny-random-llama
  dtype: &dtype float32
  device: cpu
data:
  train: &train_file {train_file}
  eval: *train_file
  max_length: 64
method:
  name: lora
  target: &targets [q_proj, v_proj]
objective:
  name: distill
  teacher: *model_name
  teacher_dtype: *dtype
train:
  <<: {{max_steps: 3, batch_size: 4, lr: 0.01}}
  lr: 0.001
output: {output}
"""
EXPANDED = """\
model: {{name: tiny-random-llama, dtype: float32, device: cpu}}
data: {{train: {train_file}, eval: {train_file}, max_length: 64}}
method: {{name: lora, target: [q_proj, v_proj]}}
objective: {{name: distill, teacher: tiny-random-llama, teacher_dtype: float32}}
train: {{max_steps: 3, batch_size: 4, lr: 0.001}}
output: {output}
"""


def test_anchors_and_aliases_load_as_the_expanded_config(tmp_path, record_property):
    record_property("reliability", "configs")
    values = {"train_file": tmp_path / "train.jsonl", "output": tmp_path / "run"}
    anchored, expanded = tmp_path / "anchored.yaml", tmp_path / "expanded.yaml"
    anchored.write_text(ANCHORED.format(**values))
    expanded.write_text(EXPANDED.format(**values))
    assert load_config(anchored) == load_config(expanded)
    assert load_config(anchored).train.lr == 0.001  # a key beside `<<` wins over the merged one


def test_a_bad_value_merged_in_names_the_merging_mapping(tmp_path, record_property):
    record_property("reliability", "configs")
    path = tmp_path / "run.yaml"
    path.write_text(ANCHORED.format(train_file=tmp_path / "t.jsonl", output=tmp_path / "run").replace("batch_size: 4", "batch_size: four"))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "<<:" in text)
    before = tree_state(tmp_path)
    assert_clean_failure(invoke("train", path), f"{path}:{line}: `train.batch_size`", "four")
    assert tree_state(tmp_path) == before


# ---- Overrides and several problems at once


MAPPINGS = {"train": run_mapping, "eval --task": task_mapping, "compare": sweep_mapping}


@pytest.mark.parametrize(
    "command, override, key",
    [
        pytest.param("train", "train.lr=abc", "train.lr", id="train:train.lr=abc"),
        pytest.param("train", "method.r=-1", "method.r", id="train:method.r=-1"),
        pytest.param("train", "train={lr: abc}", "train.lr", id="train:train={lr: abc}"),
        pytest.param("train", "method.name=qlora", "method.name", id="train:method.name=qlora"),
        pytest.param("eval --task", "max_new_tokens=many", "max_new_tokens", id="eval:max_new_tokens=many"),
        pytest.param("compare", "seeds=[]", "seeds", id="compare:seeds=[]"),
    ],
)
def test_a_bad_override_names_the_override(command, override, key, tmp_path, record_property):
    record_property("reliability", "configs")
    path = write_yaml(tmp_path / "config.yaml", MAPPINGS[command](tmp_path))
    before = tree_state(tmp_path)
    message = assert_clean_failure(COMMANDS[command](path, override), f"command-line override {override}: `{key}`")
    assert str(path) not in message
    assert tree_state(tmp_path) == before


def test_several_problems_are_one_per_line_under_one_heading(tmp_path, record_property):
    record_property("reliability", "configs")
    config = run_mapping(tmp_path)
    config["train"].update(lr="fast", batch_size=0)
    path = tmp_path / "run.yaml"
    key_lines = write_config(path, config)
    before = tree_state(tmp_path)
    result = invoke("train", path)
    message = assert_clean_failure(result, f"{path}:{key_lines['train.lr']}: `train.lr`", one_line=False)
    assert message.splitlines()[0] == "error: invalid config:"
    assert any(f"{path}:{key_lines['train.batch_size']}: `train.batch_size`" in line for line in message.splitlines()[1:])
    assert tree_state(tmp_path) == before


def test_a_reward_pattern_too_big_to_compile(tmp_path, record_property):
    record_property("reliability", "configs")
    config = run_mapping(tmp_path)
    config["objective"] = {"name": "grpo", "rewards": [{"name": "format", "pattern": "a{4294967296}"}]}
    path = tmp_path / "run.yaml"
    key_lines = write_config(path, config)
    assert_clean_failure(invoke("train", path), f"{path}:{key_lines['objective.rewards.0']}: `objective.rewards.0`")
