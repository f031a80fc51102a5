"""The embedded demo: a tiny pretrained Llama base, its tokenizer, a dataset and a config.

Everything here ships with the package, so `fullscale train` with no config needs no network.
Rebuild the base and data with `python scripts/build_demo_base.py`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

DEMO_DIR = Path(__file__).parent
DEMO_BASE = DEMO_DIR / "base"
DEMO_TRAIN = DEMO_DIR / "data" / "train.jsonl"
DEMO_CONFIG = DEMO_DIR / "demo.yaml"


def demo_settings() -> dict:
    """The demo's config values (applied before any user file or override)."""
    return yaml.safe_load(DEMO_CONFIG.read_text()) or {}
