from tunelab.config.loader import dump_config, flatten_keys, load_config, parse_config
from tunelab.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig

__all__ = ["RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "load_config", "parse_config", "dump_config", "flatten_keys"]
