"""Typed run configuration: sections (`schema`), YAML files and overrides (`files`), typed conversion (`typed_yaml`).

Every mistake a user can make in a config (unknown key, wrong type, value out of range) is reported as one
`ConfigError` line naming the key, with a close-match suggestion for typos; the command lines turn it into exit
code 2.
"""
from goca_fast.config.files import config_to_yaml, load_config, resolve_config, shipped_config_dirs
from goca_fast.config.schema import (Config, DataConfig, EngineConfig, EvalConfig, GocaConfig, ModelConfig,
                                     OptimConfig, SyntheticConfig, config_from_dict, validate)
from goca_fast.config.typed_yaml import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "EngineConfig", "EvalConfig", "GocaConfig", "ModelConfig",
           "OptimConfig", "SyntheticConfig", "config_from_dict", "config_to_yaml", "load_config", "resolve_config",
           "shipped_config_dirs", "validate"]
