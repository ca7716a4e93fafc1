"""Configuration: the commented defaults and the strict loader."""
from config.defaults import get_cfg_defaults
from config.loader import ConfigError, load_cfg

__all__ = ["ConfigError", "get_cfg_defaults", "load_cfg"]
