"""Build the tokenized train/eval sets of a run, cached by `datasets` so a second run skips tokenizing."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, disable_progress_bars

from tunelab.config.schema import DataConfig
from tunelab.data.formats import load_examples
from tunelab.data.tokenize import tokenize_example
from tunelab.errors import TunelabError
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
    format: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TokenizedData:
    train: Dataset
    eval: Dataset | None
    stats: dict[str, DataStats] = field(default_factory=dict)


def build_datasets(config: DataConfig, tokenizer, seed: int) -> TokenizedData:
    train, train_stats = tokenized_split(config.train, config, tokenizer)
    stats = {"train": train_stats}
    evaluation = None
    if config.eval:
        evaluation, stats["eval"] = tokenized_split(config.eval, config, tokenizer)
    elif config.eval_split:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * config.eval_split))
        if n_eval >= len(order):
            raise TunelabError(f"data.eval_split: {config.eval_split} leaves no training rows out of {len(order)}")
        evaluation, train = train.select(sorted(order[:n_eval])), train.select(sorted(order[n_eval:]))
    return TokenizedData(train=train, eval=evaluation, stats=stats)


def tokenized_split(path: str, config: DataConfig, tokenizer) -> tuple[Dataset, DataStats]:
    """Token ids and target masks of one file, as a `datasets.Dataset` cached on disk by content.

    The cache holds every row tokenized (and truncated to max_length); which rows train, and the
    counts of truncated and dropped ones, are worked out from it on each run.
    """
    if not Path(path).is_file():  # checked here because the cache key hashes the file before it is read
        raise TunelabError(f"data file not found: {path}")
    cache_file = cache_dir() / "tokenized" / f"{_fingerprint(path, config, tokenizer)}.arrow"
    format_file = cache_file.with_suffix(".format")
    if cache_file.is_file() and format_file.is_file():
        tokenized, data_format = Dataset.from_file(str(cache_file)), format_file.read_text()
    else:
        data_format, examples = load_examples(path, config.format)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        disable_progress_bars()

        def tokenize(example: dict, row: int) -> dict:
            tokens = tokenize_example(example, tokenizer, config.train_on)
            truncated = {k: v[: config.max_length] for k, v in tokens.items()}
            # `row` ties each sample back to its file row (eval generation needs the text).
            return truncated | {"full_length": len(tokens["input_ids"]), "row": row}

        tokenized = Dataset.from_list(examples).map(
            tokenize,
            with_indices=True,
            remove_columns=list(examples[0]),
            cache_file_name=str(cache_file),
            new_fingerprint=cache_file.stem,
        )
        format_file.write_text(data_format)  # written last: its presence marks a complete cache entry

    too_long = [n > config.max_length for n in tokenized["full_length"]]
    no_target = [not any(mask[1:]) for mask in tokenized["target_mask"]]  # the first token is never predicted
    drop_long = config.too_long == "drop"
    stats = DataStats(
        rows=len(tokenized),
        format=data_format,
        truncated=0 if drop_long else sum(too_long),
        dropped_too_long=sum(too_long) if drop_long else 0,
        dropped_no_target=sum(empty and not (drop_long and long) for empty, long in zip(no_target, too_long)),
    )
    keep = [i for i, (long, empty) in enumerate(zip(too_long, no_target)) if not empty and not (drop_long and long)]
    if not keep:
        raise TunelabError(f"{path}: no row has a target token left within data.max_length={config.max_length}")
    return tokenized.select(keep), stats


def _fingerprint(path: str, config: DataConfig, tokenizer) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    for part in (
        TOKENIZATION_VERSION,
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
