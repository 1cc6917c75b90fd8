"""Build the tokenized train/eval sets of a run, cached by `datasets` so a second run skips tokenizing."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, disable_progress_bars

from tunelab.config.schema import DataConfig
from tunelab.data.formats import load_examples, read_rows
from tunelab.data.preference import fit_to_length, load_preference_examples, tokenize_preference
from tunelab.data.prompts import load_prompt_examples, tokenize_prompt
from tunelab.data.tokenize import tokenize_example
from tunelab.errors import TunelabError
from tunelab.files import check_regular_file, sha256_file
from tunelab.models.loader import cache_dir

# Bump when tokenization changes, so stale caches are not reused.
TOKENIZATION_VERSION = "2"


@dataclass
class DataStats:
    """What happened to the rows on the way to training samples (reported, never silent)."""

    rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    split: int = 0  # texts longer than max_length, split into pieces (continued pretraining)
    identical_pairs: int = 0  # preference rows whose chosen equals rejected (they teach nothing)
    format: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TokenizedData:
    train: Dataset
    eval: Dataset | None
    stats: dict[str, DataStats] = field(default_factory=dict)


def build_datasets(config: DataConfig, tokenizer, seed: int, rows: str = "sft") -> TokenizedData:
    """The train and eval sets of the kind of rows an objective reads (see objectives/base.py)."""
    train, train_stats = tokenized_split(config.train, config, tokenizer, rows)
    stats = {"train": train_stats}
    evaluation = None
    if config.eval:
        evaluation, stats["eval"] = tokenized_split(config.eval, config, tokenizer, rows)
    elif config.eval_split:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * config.eval_split))
        if n_eval >= len(order):
            raise TunelabError(f"data.eval_split: {config.eval_split} leaves no training rows out of {len(order)}")
        evaluation, train = train.select(sorted(order[:n_eval])), train.select(sorted(order[n_eval:]))
    return TokenizedData(train=train, eval=evaluation, stats=stats)


def tokenized_split(path: str, config: DataConfig, tokenizer, rows: str = "sft") -> tuple[Dataset, DataStats]:
    """The tokenized samples of one file, as a `datasets.Dataset` cached on disk by content.

    `rows`: "sft" (token ids and a target mask per row, truncated to max_length), "text" (every
    token a target; a longer text becomes several max_length pieces), "preference" or "unpaired"
    (prompt ids shared by the completions' ids, see data/preference.py), "prompt" (prompt ids and
    the row's other fields, for objectives that sample completions: data/prompts.py), "sft_or_prompt"
    (a file of prompt-only rows read as "prompt", any other as "sft"). The cache holds every row
    tokenized; which rows train, and the counts of cut and dropped ones, are worked out from it on
    each run.
    """
    if rows == "text" and config.format not in ("auto", "text"):
        raise TunelabError(f"objective 'pretrain' reads text rows ({{\"text\": ...}}); data.format is '{config.format}'")
    cache_file = cache_dir() / "tokenized" / f"{_fingerprint(path, config, tokenizer, rows)}.arrow"
    format_file = cache_file.with_suffix(".format")
    if cache_file.is_file() and format_file.is_file():
        tokenized, data_format = Dataset.from_file(str(cache_file)), format_file.read_text()
    else:
        data_format, examples, tokenize = _reader(path, config, tokenizer, rows)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        disable_progress_bars()
        tokenized = Dataset.from_list(examples).map(
            tokenize,
            with_indices=True,
            batched=rows == "text",  # one text may become several pieces
            remove_columns=list(examples[0]),
            cache_file_name=str(cache_file),
            new_fingerprint=cache_file.stem,
        )
        format_file.write_text(data_format)  # written last: its presence marks a complete cache entry

    too_long = [n > config.max_length for n in tokenized["full_length"]]
    has_mask = "target_mask" in tokenized.column_names
    # The first token is never predicted; preference completions are never empty.
    no_target = [not any(mask[1:]) for mask in tokenized["target_mask"]] if has_mask else [False] * len(tokenized)
    drop_long = config.too_long == "drop"
    cut = [long and not drop_long for long in too_long]
    file_rows = tokenized["row"]
    stats = DataStats(
        rows=len(set(file_rows)),
        format=data_format,
        truncated=0 if rows == "text" else sum(cut),
        split=len({row for row, c in zip(file_rows, cut) if c}) if rows == "text" else 0,
        dropped_too_long=len({row for row, long in zip(file_rows, too_long) if long}) if drop_long else 0,
        dropped_no_target=sum(empty and not (drop_long and long) for empty, long in zip(no_target, too_long)),
        identical_pairs=sum(tokenized["identical"]) if "identical" in tokenized.column_names else 0,
    )
    keep = [i for i, (long, empty) in enumerate(zip(too_long, no_target)) if not empty and not (drop_long and long)]
    if not keep:
        raise TunelabError(f"{path}: no row has a target token left within data.max_length={config.max_length}")
    return tokenized.select(keep), stats


def _reader(path: str, config: DataConfig, tokenizer, rows: str):
    """(format, canonical examples, the `datasets.map` function that tokenizes them) for a kind of rows.
    Each tokenized sample keeps `row` (its file row: eval generation needs the text, precomputed
    reference log-probs are keyed by it) and `full_length` (its length before any cut)."""
    max_length = config.max_length
    if rows == "sft_or_prompt":
        rows = "prompt" if _prompt_rows(path, config) else "sft"
    if rows in ("preference", "unpaired"):
        data_format, examples, _ = load_preference_examples(path, rows)

        def tokenize_pair(example: dict, row: int) -> dict:
            tokens = tokenize_preference(example, tokenizer, rows)
            full_length = len(tokens["prompt_ids"]) + max(len(v) for k, v in tokens.items() if k != "prompt_ids")
            fitted, _ = fit_to_length(tokens, max_length)
            extra = {"identical": example["chosen"] == example["rejected"]} if rows == "preference" else {"label": example["label"]}
            return fitted | extra | {"full_length": full_length, "row": row}

        return data_format, examples, tokenize_pair

    if rows == "prompt":
        data_format, examples = load_prompt_examples(path)

        def tokenize_row(example: dict, row: int) -> dict:
            return tokenize_prompt(example, tokenizer, max_length) | {"row": row}

        return data_format, examples, tokenize_row

    data_format, examples = load_examples(path, "text" if rows == "text" else config.format)
    if rows == "text":

        def tokenize_text(batch: dict, indices: list[int]) -> dict:
            pieces: dict[str, list] = {"input_ids": [], "target_mask": [], "full_length": [], "row": []}
            for segments, row in zip(batch["segments"], indices):
                ids = tokenize_example({"segments": segments}, tokenizer, "all")["input_ids"]
                for start in range(0, len(ids), max_length):
                    piece = ids[start : start + max_length]
                    pieces["input_ids"].append(piece)
                    pieces["target_mask"].append([1] * len(piece))
                    pieces["full_length"].append(len(ids))
                    pieces["row"].append(row)
            return pieces

        return data_format, examples, tokenize_text

    def tokenize(example: dict, row: int) -> dict:
        tokens = tokenize_example(example, tokenizer, config.train_on)
        truncated = {k: v[:max_length] for k, v in tokens.items()}
        return truncated | {"full_length": len(tokens["input_ids"]), "row": row}

    return data_format, examples, tokenize


def _prompt_rows(path: str, config: DataConfig) -> bool:
    """Whether a file holds prompt-only rows (`{prompt, ...}` without a completion), judged by its first row."""
    first = next(read_rows(path), (None, {}))[1]
    return config.format == "auto" and "prompt" in first and "completion" not in first


def _fingerprint(path: str, config: DataConfig, tokenizer, rows: str) -> str:
    check_regular_file(Path(path))  # missing, a directory, a FIFO: refused before it is opened
    digest = hashlib.sha256(sha256_file(Path(path)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    for part in (
        TOKENIZATION_VERSION,
        rows,
        Path(path).suffix,
        config.format,
        config.train_on,
        str(config.max_length),
        config.too_long,
        identity,
        str(tokenizer.chat_template),
        str(tokenizer.eos_token_id),
    ):
        digest.update(part.encode())
    return digest.hexdigest()[:24]
