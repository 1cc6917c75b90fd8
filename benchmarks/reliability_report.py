"""Run the bad-input corpus and the fault suite, and write docs/reliability.md from their results.

    python benchmarks/reliability_report.py [--out docs/reliability.md]

Each corpus or fault test names its class with `record_property("reliability", CLASS)` (the SIGKILL
loop's trials also record where they killed the run and what resume found); this script runs those
test files under pytest with a JUnit XML report and counts, per class, the cases tried and the cases
that ended as the contract says. It exits non-zero when any case did not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = [
    "tests/test_bad_inputs_data.py",
    "tests/test_bad_inputs_config.py",
    "tests/test_bad_inputs_paths.py",
    "tests/test_data_properties.py",
    "tests/test_config_properties.py",
    "tests/test_faults.py",
]
CONTRACT = """\
# Reliability: the bad-input corpus and the fault suite

The contract: every bad input ends in exit status 1 and one line (plus at most a short hint) naming
the file and line or the config key, with no traceback and the output directory exactly as it was
before; a crash never costs more than the work since the last checkpoint, and resuming after any
fault ends bitwise equal to the uninterrupted run.

The cases are tests of the default suite (`python -m pytest`). This page is written by
`python benchmarks/reliability_report.py`, which runs them and counts the results per class: a case
"holds" when its test passed, i.e. everything the contract says was asserted and held.
"""

LIMITS = """\
## Outside the contract

- Command-line usage errors that typer itself catches (an unknown option, a word where a number
  belongs, `--max-batch 0` below an option's minimum) keep typer's convention: exit status 2 with
  its usage box.
- The SIGKILL loop and the signal tests kill `tunelab train` on the tiny in-process model (LoRA, SFT);
  the other objectives' SIGKILL-resume tests (`tests/test_objectives.py`, `tests/test_sampling_objectives.py`)
  kill right after a checkpoint.
- A data file is read whole into memory before its rows are converted (the converted rows were
  always held whole).
"""

CLASS_NOTES = {
    "data files": "every reader (.jsonl, .json, .csv, .tsv, .parquet, gzipped; SFT, preference, prompt and task rows) through `train`, `eval --task`, `bench --data`: "
    "defects refused, and valid variants (BOM, CRLF, TSV, gzip, a quoted newline, a 10 MB row) read as the plain file",
    "configs": "every key of every schema (run, method and objective options, eval task, sweep) with a wrong type and an out-of-range value, YAML tags and anchors, non-mapping configs",
    "paths": "outputs that are files or read-only, relative paths from another directory, runs from another tunelab, pickle-only models, missing or corrupt adapters, for every command",
    "property: data converters": "hypothesis: any row or file either converts or raises TunelabError",
    "property: config loader": "hypothesis: any YAML text and overrides either load or raise TunelabError",
    "fault: damaged checkpoint": "bit flips, a torn write, missing files: resume passes over the damaged checkpoint, bitwise equal",
    "fault: disk full": "ENOSPC injected at the write layer (OSError and safetensors' own error) and a real full tmpfs",
    "fault: two trainers": "a second trainer is refused at once; a SIGKILLed holder leaves no stale lock",
    "fault: SIGINT/SIGTERM": "a checkpoint at the current step, then an exact resume; a second Ctrl-C stops at once",
    "fault: SIGKILL loop": "20 seeded kill points (below); every resume bitwise equal to the uninterrupted run",
}


def run_tests(junit: Path) -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1", *TEST_FILES]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def read_cases(junit: Path) -> list[dict]:
    cases = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "reliability" not in properties:
            continue
        outcome = "skipped" if case.find("skipped") is not None else "failed" if case.find("failure") is not None or case.find("error") is not None else "held"
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, **properties})
    return cases


def render(cases: list[dict], seconds: float) -> str:
    by_class: dict[str, list[dict]] = defaultdict(list)
    for case in cases:
        by_class[case["reliability"]].append(case)
    lines = [
        CONTRACT,
        f"Run on {datetime.now(timezone.utc):%Y-%m-%d} in {seconds:.0f} s.",
        "",
        "| class | what | cases tried | held | failed | skipped |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in sorted(by_class, key=lambda n: (list(CLASS_NOTES).index(n) if n in CLASS_NOTES else len(CLASS_NOTES), n)):
        group = by_class[name]
        counts = {outcome: sum(c["outcome"] == outcome for c in group) for outcome in ("held", "failed", "skipped")}
        lines.append(f"| {name} | {CLASS_NOTES.get(name, '')} | {len(group)} | {counts['held']} | {counts['failed']} | {counts['skipped']} |")
    total = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("held", "failed", "skipped")}
    lines.append(f"| **all** | | **{len(cases)}** | **{total['held']}** | **{total['failed']}** | **{total['skipped']}** |")

    kills = sorted((c for c in cases if c["reliability"] == "fault: SIGKILL loop"), key=lambda c: c["id"])
    lines += [
        "",
        "## The SIGKILL loop",
        "",
        "Each trial kills `tunelab train` (SIGKILL) at the seeded call of a function, checks what `eval`/`export` read from",
        "the directory it left, resumes with `--resume`, and compares the final adapter with the uninterrupted run's, bit for bit.",
        "",
    ]
    lines += ["| trial | killed at | the directory after the kill | resumed from step | final weights |", "|---|---|---|---:|---|"]
    for case in kills:
        trial = case["id"].rsplit("[", 1)[-1].rstrip("]")
        result = "bitwise equal" if case["outcome"] == "held" else case["outcome"].upper()
        resumed = {"None": "none: from the start"}.get(case.get("resumed from step", "?"), case.get("resumed from step", "?"))
        lines.append(f"| {trial} | {case.get('kill', '?')} | {case.get('after the kill', '?')} | {resumed} | {result} |")
    lines += ["", LIMITS]
    failed = [c["id"] for c in cases if c["outcome"] == "failed"]
    if failed:
        lines += ["", "## Failing cases", "", *(f"- `{case_id}`" for case_id in failed)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        started = datetime.now(timezone.utc)
        code = run_tests(junit)
        cases = read_cases(junit)
        seconds = (datetime.now(timezone.utc) - started).total_seconds()
    args.out.write_text(render(cases, seconds))
    failed = sum(c["outcome"] == "failed" for c in cases)
    print(f"{len(cases)} cases, {failed} failed -> {args.out}")
    return 0 if code == 0 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
