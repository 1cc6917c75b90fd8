"""tunelab: adapt any Hugging Face causal language model, measure the result, and ship it.

Python API (mirrors the CLI):
    config = tunelab.load_config("run.yaml", ["train.lr=1e-4"])
    result = tunelab.train(config)            # -> RunResult(output_dir, report)
"""

import logging

# torchao, which transformers imports whenever it is installed, warns on import about CUDA kernels a
# CPU build cannot load, and torch about torchao's enum registration: neither concerns our users.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from tunelab.config import RunConfig, load_config  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.train import RunResult  # noqa: E402
from tunelab.train import train as _train  # noqa: E402

__version__ = "0.1.0"


def train(config, overrides=None, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train from a RunConfig, a YAML path or a dict (with optional `key.sub=value` overrides)."""
    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    elif overrides:
        config = load_config(config.to_dict(), overrides)
    return _train(config, resume=resume, overwrite=overwrite)


__all__ = ["train", "load_config", "RunConfig", "RunResult", "TunelabError", "__version__"]
