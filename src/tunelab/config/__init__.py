from tunelab.config.loader import changed_keys, dump_config, load_config, parse_config
from tunelab.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig

__all__ = ["RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "load_config", "parse_config", "dump_config", "changed_keys"]
