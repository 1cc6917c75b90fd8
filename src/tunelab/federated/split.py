"""One data file split among clients: IID (a seeded shuffle cut into near-equal parts) or
Dirichlet(α) over a label (for each label, its rows shared out by proportions drawn from Dir(α):
small α gives each client a few dominant labels, large α approaches IID; Hsu et al. 2019).

Every row goes to exactly one client, each client keeps its rows in file order, and the same file,
count, α and seed always give the same split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.data.formats import read_rows
from tunelab.errors import TunelabError, shown

# Fresh Dirichlet draws tried (from the same seeded stream) until every client has a row.
DIRICHLET_TRIES = 1000
# The value of `by` that reads a row's answer text instead of a field.
ANSWER = "answer"


@dataclass(frozen=True)
class Part:
    rows: list[dict]
    labels: dict[str, int] | None  # rows per label (Dirichlet splits)


def split_rows(path: Path, count: int, how: str, alpha: float | None, by: str | None, seed: int) -> list[Part]:
    """The rows of `path` shared among `count` clients."""
    located = list(read_rows(path))
    if not located:
        raise TunelabError(f"{path}: the data set is empty (clients.file)")
    if count > len(located):
        raise TunelabError(f"clients.count {count}: {path} has only {len(located)} rows, fewer than one per client")
    if how == "iid":
        return [Part([located[i][1] for i in part], None) for part in iid_split(len(located), count, seed)]
    labels = [row_label(row, by, where) for where, row in located]
    parts = dirichlet_split(labels, count, alpha, seed)
    return [Part([located[i][1] for i in part], dict(sorted(Counter(labels[i] for i in part).items()))) for part in parts]


def iid_split(n: int, count: int, seed: int) -> list[list[int]]:
    """Row indices 0..n-1 shuffled by `seed` and cut into `count` parts whose sizes differ by at most one."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, count)]


def dirichlet_split(labels: list[str], count: int, alpha: float, seed: int) -> list[list[int]]:
    """Row indices by client: each label's rows (shuffled) cut by proportions q ~ Dir(α·1_count),
    drawn again while a client would get no row."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(count)]
        for label in sorted(by_label):
            rows = rng.permutation(by_label[label])
            shares = rng.dirichlet([alpha] * count)
            cuts = np.round(np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, piece in enumerate(np.split(rows, cuts)):
                parts[client] += piece.tolist()
        if all(parts):
            return [sorted(int(i) for i in part) for part in parts]
    raise TunelabError(f"clients: Dirichlet({alpha}) over {len(labels)} rows left a client without rows in {DIRICHLET_TRIES} draws; raise clients.alpha or lower clients.count")


def row_label(row: dict, by: str, where: str) -> str:
    """What a Dirichlet split groups rows by: the row's top-level field `by`, or (`by: answer`, in a
    row without such a field) the answer it trains on."""
    if by in row:
        value = row[by]
        if value is None or isinstance(value, (dict, list)):
            raise TunelabError(f"{where}: field '{by}' (clients.by) must be a label, a string or a number; got {shown(value)}")
        return str(value)
    if by == ANSWER:
        return answer_text(row, where)
    raise TunelabError(f"{where}: no field '{by}' to split the clients by (clients.by: a top-level field of every row, or `answer` for the answer text)")


def answer_text(row: dict, where: str) -> str:
    """The text a training row teaches: its last assistant turn (messages, conversations), its
    `output` (alpaca) or its `completion` (prompt/completion)."""
    for key, role_key, text_key, roles in (("messages", "role", "content", ("assistant",)), ("conversations", "from", "value", ("gpt", "assistant", "model"))):
        turns = row.get(key)
        if isinstance(turns, list):
            answers = [turn.get(text_key) for turn in turns if isinstance(turn, dict) and turn.get(role_key) in roles]
            if answers and isinstance(answers[-1], str):
                return answers[-1].strip()
    for key in ("output", "completion"):
        if isinstance(row.get(key), str):
            return row[key].strip()
    raise TunelabError(f"{where}: no answer to split the clients by (clients.by: answer reads the last assistant turn, `output` or `completion`)")
