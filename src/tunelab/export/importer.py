"""`tunelab import`: a peft adapter directory as a tunelab run directory (eval, generate, export and
further training then take it like any run)."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import parse_config
from tunelab.config.loader import dump_config
from tunelab.errors import TunelabError
from tunelab.files import staged_write
from tunelab.methods.peft_io import read_peft_config
from tunelab.runs import load_peft_model, save_artifacts, write_run_file


def import_peft(peft_dir: str | Path, output: str | Path, model: str | None = None, overwrite: bool = False) -> Path:
    """Write a run directory at `output` holding the peft adapter at `peft_dir`, on base `model`
    (default: the adapter's base_model_name_or_path)."""
    peft_dir, output = Path(peft_dir), Path(output)
    base = model or read_peft_config(peft_dir).get("base_model_name_or_path")
    if not base:
        raise TunelabError(f"{peft_dir}: the adapter names no base model; pass --model")
    if output.exists() and not output.is_dir():
        raise TunelabError(f"--output {output} is a file; a run is a directory")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise TunelabError(f"--output {output} exists and is not empty (pass --overwrite to replace it)")
    # An imported run was not trained by tunelab: its data section only records where it came from.
    config = parse_config(
        {
            "model": base,
            "data": {"train": f"(imported from peft adapter {peft_dir})"},
            "method": {"from_peft": str(peft_dir)},
            "output": str(output),
        },
        where=str(peft_dir / "adapter_config.json"),
    )
    loaded, tokenizer, method = load_peft_model(peft_dir, config.model)
    # The run holds the weights itself: it must not depend on the peft directory staying around.
    config.method.from_peft = None
    with staged_write(output) as staging:  # replaces what --overwrite replaces whole, or leaves it
        save_artifacts(method, loaded, tokenizer, config, staging)
        write_run_file(staging)
        dump_config(config, staging / "config.yaml")
    return output
