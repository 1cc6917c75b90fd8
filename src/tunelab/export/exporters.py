"""`tunelab export`: a run's result as a peft adapter directory, merged full weights, or GGUF for
llama.cpp (the merged model, or a LoRA adapter for `--lora`); a base model alone as GGUF."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
from safetensors.torch import save_file

from tunelab.config.schema import ModelConfig
from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.export.gguf_export import GGUF_TYPES, write_lora, write_model
from tunelab.files import check_output_folder, check_parent_folders, staged_write
from tunelab.methods import Method
from tunelab.models.loader import load_model, source_gguf
from tunelab.models.quantize import dequantize_linears
from tunelab.runs import LoadedRun, load_run

FORMATS = ("peft", "merged", "gguf", "gguf-adapter")


def export_run(source: str | Path, export_format: str, out: str | Path, gguf_type: str = "f16") -> Path:
    """Write `source` (a run directory; for `gguf`, also a model: alias, HF directory, hub id) in
    `export_format` at `out` (a directory, or a .gguf file). Nothing is left at `out` on failure."""
    if export_format not in FORMATS:
        raise TunelabError(f"--format: '{export_format}' is not one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise TunelabError(f"--gguf-type: '{gguf_type}' is not one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    to_file = export_format.startswith("gguf")
    if to_file and out.suffix != ".gguf":
        raise TunelabError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    if to_file and out.exists():
        raise TunelabError(f"--out {out} exists")
    if out.exists() and not out.is_dir():
        raise TunelabError(f"--out {out} is a file; --format {export_format} writes a directory")
    if to_file:
        check_parent_folders(out)
    else:
        check_output_folder(out)
    write = _writer(source, export_format, gguf_type)
    with staged_write(out, directory=not to_file) as staging:  # nothing is left at --out on failure
        write(staging)
    return out


def _writer(source: str | Path, export_format: str, gguf_type: str) -> Callable[[Path], None]:
    """What writes the export at a staging path, its source loaded."""
    if export_format == "gguf" and not (Path(source) / "config.yaml").is_file():  # a model, not a run
        model, tokenizer = load_model(ModelConfig(name=str(source)))
        return partial(_write_gguf, model, tokenizer, gguf_type=gguf_type, model_name=str(source))
    run = load_run(source)
    if export_format == "gguf":
        return partial(_write_gguf, _merge(run), run.tokenizer, gguf_type=gguf_type, model_name=run.config.model.name)
    return partial({"peft": _write_peft, "merged": _write_merged, "gguf-adapter": _write_gguf_adapter}[export_format], run)


def _write_peft(run: LoadedRun, directory: Path) -> None:
    write_peft_adapter(run.method, run.model, run.config.model.name, directory)


def write_peft_adapter(method: Method, model, base_model: str, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, as `peft.PeftModel.from_pretrained` reads them."""
    config, tensors = method.peft_export(model)
    config["base_model_name_or_path"] = base_model
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def _merge(run: LoadedRun):
    """The run's model with the method folded into its weights, and no quantized layer left."""
    run.method.merge(run.model)
    if dequantize_linears(run.model):
        console.print(f"[yellow]merged into the dequantized weights of the base (model.quantize: {run.config.model.quantize})[/yellow]")
    return run.objective.merged_model(run.model, run.tokenizer)


def _write_merged(run: LoadedRun, directory: Path) -> None:
    """A plain Hugging Face checkpoint: the method folded into the base weights (a reward model's,
    with its head, as a sequence-classification checkpoint)."""
    _merge(run).save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)


def _write_gguf(model, tokenizer, path: Path, *, gguf_type: str, model_name: str) -> None:
    write_model(model, tokenizer, path, gguf_type, name=Path(model_name).name, pre_tokenizer=_pre_tokenizer_of(model_name))


def _write_gguf_adapter(run: LoadedRun, path: Path) -> None:
    adapters = run.method.lora_factors(run.model)
    write_lora(run.model, adapters, path, name=f"{Path(run.config.output).name} (LoRA of {run.config.model.name})")


def _pre_tokenizer_of(model_name: str) -> str | None:
    """The pre-tokenizer name of the GGUF file a model was converted from (None for others)."""
    path = source_gguf(model_name)
    if path is None:
        return None
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field is None else field.contents()
