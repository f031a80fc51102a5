"""The config: `schema` declares every key once (type, default, one-line doc, choices); `load`
reads YAML and key=value overrides into it, strictly, every problem reported at once."""

from fullscale.config.load import SOURCE_KEYS, build_config, load_config, parse_overrides, read_yaml
from fullscale.config.schema import (
    ATTN_IMPLEMENTATIONS,
    AUTO_BOOL,
    DATASET_FORMATS,
    FIELDS,
    FORMATS,
    HEALTH_ACTIONS,
    INVALID_ROWS,
    REPORT_TO,
    RESUME,
    SCHEDULERS,
    Config,
    describe_keys,
    effective_early_stopping,
    is_hub_name,
    train_data,
    train_sources,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS", "AUTO_BOOL", "DATASET_FORMATS", "FIELDS", "FORMATS", "HEALTH_ACTIONS", "INVALID_ROWS",
    "REPORT_TO", "RESUME", "SCHEDULERS", "SOURCE_KEYS", "Config", "build_config", "describe_keys",
    "effective_early_stopping", "is_hub_name", "load_config", "parse_overrides", "read_yaml", "train_data",
    "train_sources",
]
