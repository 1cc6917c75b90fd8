"""Reward functions for the objectives that learn from scored samples (GRPO, RAFT).

A reward function is called as TRL calls one, on a batch of completions:

    reward(prompts=[...], completions=[...], completion_ids=[[...], ...], **fields) -> list[float]

`prompts` are the rows' prompts (text or message lists), `completions` the generated texts,
`completion_ids` their token ids, and each field of the rows (an `answer`, a program's `tests`)
comes as a list over the batch under its own name. A run names its rewards in
`objective.rewards`: a built-in by `name` (they reuse the eval's scorers) or a user's function by
`function: "module:function"` (or `"path/to/file.py:function"`), each with a `weight`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import TunelabError
from tunelab.scoring.answers import exact_match, fenced_code, final_number, json_scores, numbers_equal, parse_json_object
from tunelab.scoring.sandbox import SandboxLimits, run_python


class RewardSpec(BaseModel):
    """One entry of `objective.rewards`."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["math_exact", "exact_match", "json_fields", "code", "format", "length"] | None = None
    function: str | None = Field(default=None, description="a user's reward: 'module:function' or 'path/to/file.py:function'")
    weight: float = 1.0
    field: str | None = Field(default=None, description="the row field compared with ('answer'; code: 'tests')")
    pattern: str | None = Field(default=None, description="format: the regex a completion must contain (re.search, DOTALL)")
    target: int | None = Field(default=None, ge=1, description="length: completion tokens past which the penalty starts")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardSpec:
        if (self.name is None) == (self.function is None):
            raise ValueError("a reward names exactly one of 'name' (a built-in) or 'function' ('module:function')")
        if self.name == "format":
            if self.pattern is None:
                raise ValueError("reward 'format' needs a 'pattern' (a regex)")
            try:
                re.compile(self.pattern)
            except (re.error, OverflowError) as error:  # OverflowError: a repeat count past what re can hold
                raise ValueError(f"reward 'format': pattern {self.pattern!r} is not a valid regex ({error})") from None
        if self.name == "length" and self.target is None:
            raise ValueError("reward 'length' needs a 'target' (completion tokens)")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"reward function {self.function!r} must be 'module:function' or 'path/to/file.py:function'")
        return self

    @property
    def label(self) -> str:
        """The name its metrics go by (`rewards/<label>/mean`)."""
        return self.name or self.function.rsplit(":", 1)[1]


# ---- Built-ins: one score in [0, 1] (length: a penalty in [-1, 0]) per completion


def math_exact(completions, answers) -> list[float]:
    """1 when the completion's final number (GSM8K's `####`, else its last number) equals the answer."""
    return [float(numbers_equal(final_number(c), str(a))) for c, a in zip(completions, answers)]


def exact_match_reward(completions, answers) -> list[float]:
    return [float(exact_match(c, str(a))) for c, a in zip(completions, answers)]


def json_fields(completions, answers) -> list[float]:
    """The share of the answer record's fields the completion's first JSON object gets right."""
    records = [a if isinstance(a, dict) else parse_json_object(str(a)) for a in answers]
    if any(r is None for r in records):
        raise TunelabError("reward 'json_fields': the answer field must be a JSON object")
    return [json_scores(c, r)["json_field_accuracy"] for c, r in zip(completions, records)]


def code_passes(completions, tests, limits: SandboxLimits = SandboxLimits()) -> list[float]:
    """1 when the completion's program followed by the row's tests runs to the end in the sandbox."""
    scores = []
    for completion, test in zip(completions, tests):
        test = "\n".join(test) if isinstance(test, list) else str(test)
        scores.append(float(run_python(f"{fenced_code(completion)}\n\n{test}\n", limits).passed))
    return scores


def format_match(completions, pattern: str) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.search(c) is not None) for c in completions]


def length_penalty(completion_ids, target: int) -> list[float]:
    """0 up to `target` tokens, then falling linearly to -1 at twice the target."""
    return [-min(1.0, max(0, len(ids) - target) / target) for ids in completion_ids]


def builtin(spec: RewardSpec) -> Callable:
    """The built-in as a function of TRL's calling convention."""
    field = spec.field or ("tests" if spec.name == "code" else "answer")

    def column(fields: dict) -> list:
        if field not in fields:
            raise TunelabError(f"reward '{spec.name}' reads the row field '{field}', which the rows do not have (set the reward's 'field')")
        return fields[field]

    def reward(prompts, completions, completion_ids, **fields) -> list[float]:
        if spec.name == "math_exact":
            return math_exact(completions, column(fields))
        if spec.name == "exact_match":
            return exact_match_reward(completions, column(fields))
        if spec.name == "json_fields":
            return json_fields(completions, column(fields))
        if spec.name == "code":
            return code_passes(completions, column(fields))
        if spec.name == "format":
            return format_match(completions, spec.pattern)
        return length_penalty(completion_ids, spec.target)

    return reward


def load_function(reference: str) -> Callable:
    """A user's reward function from 'module:function' (importable, or relative to the working
    directory) or 'path/to/file.py:function'."""
    module_name, _, function_name = reference.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise TunelabError(f"reward function {reference!r}: file {path} not found")
            spec = importlib.util.spec_from_file_location(f"tunelab_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.append(str(Path.cwd()))
            module = importlib.import_module(module_name)
    except TunelabError:
        raise
    except Exception as error:  # the user's module may fail to import in any way
        raise TunelabError(f"reward function {reference!r}: cannot import {module_name}: {type(error).__name__}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TunelabError(f"reward function {reference!r}: {module_name} has no function '{function_name}'")
    return function


class Rewards:
    """The run's weighted reward functions, each checked on every call."""

    def __init__(self, specs: list[RewardSpec]):
        self.specs = specs
        self.functions = [builtin(s) if s.name else load_function(s.function) for s in specs]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise TunelabError(f"objective.rewards: two rewards share a name ({', '.join(labels)}); each needs its own")

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.specs]

    def score(self, prompts: list, completions: list[str], completion_ids: list[list[int]], fields: list[dict], where: list[str]) -> list[list[float]]:
        """Each reward function's score of each completion (one list per function, unweighted).
        A function that raises or returns anything but one number per completion stops the run,
        naming itself and the row."""
        columns = {key: [f.get(key) for f in fields] for key in {k for f in fields for k in f}}
        scores = []
        for spec, function in zip(self.specs, self.functions):
            try:
                values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            except TunelabError as error:
                raise TunelabError(f"reward '{spec.label}': {error}") from None
            except Exception as error:  # a user's function may fail in any way: find the row it fails on
                raise TunelabError(
                    f"reward '{spec.label}' raised {type(error).__name__}: {error} (on {self._failing_row(function, prompts, completions, completion_ids, fields, where)})"
                ) from None
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                raise TunelabError(f"reward '{spec.label}' must return a list of {len(completions)} numbers (one per completion), got {type(values).__name__}")
            for value, row in zip(values, where):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise TunelabError(f"reward '{spec.label}' returned {value!r} for the completion of {row}; a reward must be a finite number")
            scores.append([float(v) for v in values])
        return scores

    def _failing_row(self, function, prompts, completions, completion_ids, fields, where) -> str:
        for i, row in enumerate(where):
            try:
                function(prompts=prompts[i : i + 1], completions=completions[i : i + 1], completion_ids=completion_ids[i : i + 1], **{k: [v] for k, v in fields[i].items()})
            except Exception:
                return row
        return "the batch as a whole; each row alone passes"
