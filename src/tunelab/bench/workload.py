"""The benchmark workload: which model, which samples, which settings both sides train with.

Both sides read the same two files written here (Alpaca-format JSON for SFT, preference rows for
DPO, arithmetic prompts for GRPO), tokenize them with tunelab's pipeline and see the training
samples in the same order, so only the trainer differs.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.data.arithmetic_task import make_splits as make_arithmetic_splits
from tunelab.data.formats import load_examples, read_rows
from tunelab.data.preference import load_preference_examples
from tunelab.data.prompts import load_prompt_examples
from tunelab.data.records_task import make_preference_splits
from tunelab.errors import TunelabError
from tunelab.models.loader import SMOLLM2

# The default SFT data, found beside the repository (see ../shared/README.md); synthetic samples otherwise.
DEFAULT_DATA = Path("..") / "shared" / "data" / "alpaca_subsets" / "llamafactory_alpaca_en_demo.json"
SYNTHETIC = "synthetic"
# The default DPO data: the quickstart's record-extraction task as pairs (data/records_task.py).
RECORD_PAIRS = "record-pairs"
# The default GRPO data: the arithmetic questions of data/arithmetic_task.py, scored by math_exact.
ARITHMETIC = "arithmetic"
# The objective's section of the run config: TRL's DPOTrainer defaults (sigmoid loss, beta 0.1);
# TRL's GRPOTrainer defaults (dapo loss, beta 0, temperature 1, rewards scaled by the group's std)
# with 8 completions of at most 12 tokens per prompt.
OBJECTIVES = {
    "sft": {"name": "sft"},
    "dpo": {"name": "dpo", "beta": 0.1, "loss_type": "sigmoid"},
    "grpo": {"name": "grpo", "loss_type": "dapo", "beta": 0.0, "num_generations": 8, "max_completion_length": 12, "rewards": [{"name": "math_exact"}]},
}


@dataclass
class Workload:
    model: str = SMOLLM2
    objective: str = "sft"  # a key of OBJECTIVES
    # A data file of the objective's rows, in any format training reads. sft: e.g. Alpaca's, None:
    # DEFAULT_DATA when present, else synthetic; dpo: preference rows, None: record-extraction pairs
    # (or synthetic ones); grpo: prompt rows, None: arithmetic questions
    data: str | None = None
    method: str = "lora"
    steps: int = 12
    batch_size: int = 8
    max_length: int = 512
    eval_samples: int = 32
    lr: float = 1e-3
    r: int = 16
    alpha: float = 32.0
    frozen_dtype: str = "auto"  # tunelab's train.frozen_dtype (the peers train in fp32)
    quantize: str = "none"  # model.quantize; nf4: the SFT peer loads its base with bitsandbytes 4-bit
    seed: int = 0

    @property
    def train_samples(self) -> int:
        return self.steps * self.batch_size

    def as_dict(self) -> dict:
        return asdict(self)


def default_data(objective: str = "sft") -> str:
    if objective == "dpo":
        return RECORD_PAIRS
    if objective == "grpo":
        return ARITHMETIC
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):  # the cwd, then the repository root
        if (base / DEFAULT_DATA).is_file():
            return str((base / DEFAULT_DATA).resolve())
    return SYNTHETIC


def write_splits(workload: Workload, folder: Path) -> tuple[Path, Path]:
    """train.json (train_samples records, cycled if the file is smaller) and eval.json (further
    records; GRPO: held-out prompts)."""
    n = workload.train_samples + workload.eval_samples
    if workload.data == RECORD_PAIRS:
        records = make_preference_splits(n, 0, workload.seed)[0]
    elif workload.data == ARITHMETIC:
        records = make_arithmetic_splits(n, 0, workload.seed)[0]
    elif workload.data == SYNTHETIC:
        records = (synthetic_pairs if workload.objective == "dpo" else synthetic_records)(n, workload.seed)
    else:
        records = read_records(workload.data, workload.objective)
        if len(records) <= workload.eval_samples:
            raise TunelabError(f"bench --data: {workload.data} needs more than {workload.eval_samples} records")
    random.Random(workload.seed).shuffle(records)
    eval_records, pool = records[: workload.eval_samples], records[workload.eval_samples :]
    train_records = [pool[i % len(pool)] for i in range(workload.train_samples)]
    try:
        train_text, eval_text = json.dumps(train_records), json.dumps(eval_records)
    except TypeError as err:  # a parquet cell of a type JSON has none of (bytes, a timestamp)
        raise TunelabError(f"bench --data: {workload.data}: the rows must hold JSON values: {err}") from None
    folder.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = folder / "train.json", folder / "eval.json"
    train_path.write_text(train_text)
    eval_path.write_text(eval_text)
    return train_path, eval_path


# Each objective's reader of a --data file, as training reads it: a bad row is refused at its line in
# the user's file (not in the copies write_splits makes of it).
ROW_READERS = {"sft": load_examples, "dpo": lambda path: load_preference_examples(path, "preference"), "grpo": load_prompt_examples}


def read_records(path: str, objective: str) -> list[dict]:
    """The rows of a --data file (any data file training reads), each checked as the objective reads it."""
    ROW_READERS[objective](path)
    return [row for _, row in read_rows(path)]


def synthetic_records(n: int, seed: int) -> list[dict]:
    """Instruction-like records of varied length (roughly 30 to 500 tokens), for when no data is at hand."""
    rng = random.Random(seed)
    words = ["the", "a", "model", "data", "train", "loss", "token", "layer", "weight", "rank", "update", "learn", "step", "batch", "value"]

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n_words))

    return [{"instruction": text(rng.randint(3, 20)), "input": "", "output": text(rng.randint(10, 400))} for _ in range(n)]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Plain-text preference rows of the same varied lengths (each answer drawn on its own, so the
    two sequences of a pair differ in length as real pairs do)."""
    return [{"prompt": r["instruction"], "chosen": r["output"], "rejected": o["output"]} for r, o in zip(synthetic_records(n, seed), synthetic_records(n, seed + 1))]


def write_long_text(folder: Path, n_words: int, seed: int) -> Path:
    """One plain-text record of about n_words tokens or more: the long-context probe."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"long-{n_words}.jsonl"
    record = {"text": " ".join(random.Random(seed).choice(("model", "data", "rank", "token")) for _ in range(n_words))}
    path.write_text(json.dumps(record) + "\n")
    return path


def run_config(workload: Workload, train_path: Path, eval_path: Path | None, output: Path) -> dict:
    """The tunelab run config of the workload (the HF and TRL sides mirror these settings)."""
    return {
        "model": {"name": workload.model, "quantize": workload.quantize},
        "objective": OBJECTIVES[workload.objective],
        "data": {"train": str(train_path), "eval": str(eval_path) if eval_path else None, "max_length": workload.max_length},
        "method": {"name": workload.method, "r": workload.r, "alpha": workload.alpha, "dropout": 0.0},
        "train": {
            "max_steps": workload.steps,
            "batch_size": workload.batch_size,
            "lr": workload.lr,
            # HF Trainer's defaults: linear decay, no warmup, no weight decay, clip at 1.0.
            "scheduler": "linear",
            "warmup": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "save_every": 0,
            "eval_every": 0,
            "frozen_dtype": workload.frozen_dtype,
            "seed": workload.seed,
        },
        "output": str(output),
    }
