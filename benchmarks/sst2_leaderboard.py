"""The measured SST-2 leaderboard of docs/leaderboard.md.

Writes the training file the sweep reads (a seeded, label-balanced subset of SST-2's train split in
chat "messages" form, prompted exactly as the built-in `sst2` eval task prompts dev.tsv), then runs
`tunelab compare docs/leaderboard/sst2_sweep.yaml`: every cell trains SmolLM2-135M-Instruct on the
same rows for the same steps and is scored on the full dev split by constrained label scoring.

    python benchmarks/sst2_leaderboard.py --shared ../shared          # data, then the whole sweep
    python benchmarks/sst2_leaderboard.py --shared ../shared --data-only
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

from tunelab.eval.tasks import BUILTIN

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "docs" / "leaderboard" / "sst2_sweep.yaml"
# The sweep's base config reads these (paths relative to docs/leaderboard/).
DATA_DIR = REPO / "runs" / "sst2-data"


def write_training_rows(train_tsv: Path, out: Path, n_train: int, n_eval: int, seed: int) -> dict:
    """`n_train` + `n_eval` distinct rows of train.tsv, half of each label, as chat messages."""
    task = BUILTIN["sst2"]
    by_label: dict[str, list[str]] = {}
    with open(train_tsv, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            by_label.setdefault(row["label"], []).append(row["sentence"].strip())
    rng = random.Random(seed)
    per_label = (n_train + n_eval) // len(by_label)
    picked = {label: rng.sample(sentences, per_label) for label, sentences in sorted(by_label.items())}
    splits = {"train": [], "eval": []}
    for label, sentences in picked.items():
        cut = n_train // len(by_label)
        splits["train"] += [(s, label) for s in sentences[:cut]]
        splits["eval"] += [(s, label) for s in sentences[cut:]]
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in splits.items():
        rng.shuffle(rows)
        with open(out / f"{split}.jsonl", "w") as handle:
            for sentence, label in rows:
                messages = [
                    {"role": "user", "content": task["prompt"].format(sentence=sentence)},
                    {"role": "assistant", "content": task["labels"][label]},
                ]
                handle.write(json.dumps({"messages": messages}) + "\n")
        counts[split] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="the folder holding data/sst2/")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200, help="held-out train rows for the runs' eval loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("compare_args", nargs=argparse.REMAINDER, help="passed on to `tunelab compare`")
    args = parser.parse_args()
    counts = write_training_rows(Path(args.shared) / "data" / "sst2" / "train.tsv", DATA_DIR, args.n_train, args.n_eval, args.seed)
    print(f"wrote {counts} rows to {DATA_DIR}")
    if not args.data_only:
        subprocess.run([sys.executable, "-m", "tunelab", "compare", str(SWEEP), *args.compare_args], check=True)


if __name__ == "__main__":
    main()
