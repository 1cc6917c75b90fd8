"""`tunelab export`: a run's result as a peft adapter directory or as merged full weights."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from tunelab.errors import TunelabError
from tunelab.runs import load_run

FORMATS = ("peft", "merged")


def export_run(run_dir: str | Path, export_format: str, out: str | Path) -> Path:
    if export_format not in FORMATS:
        raise TunelabError(f"--format: '{export_format}' is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"--out {out} exists and is not empty")
    run = load_run(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if export_format == "peft":
            _write_peft(run, staging)
        else:
            _write_merged(run, staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_peft(run, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, as `peft.PeftModel.from_pretrained` reads them."""
    config, tensors = run.method.peft_export(run.model)
    config["base_model_name_or_path"] = run.config.model.name
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def _write_merged(run, directory: Path) -> None:
    """A plain Hugging Face checkpoint: the method folded into the base weights (a reward model's,
    with its head, as a sequence-classification checkpoint)."""
    run.method.merge(run.model)
    run.objective.merged_model(run.model, run.tokenizer).save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)
