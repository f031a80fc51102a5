"""The embedded demo that `fullscale train` runs with no config: a tiny pretrained Llama base
(base/), its character-level tokenizer, the bundled dataset (data/train.jsonl) and the recommended
trainer settings (demo.yaml). Everything ships with the package, so the demo needs no network.
See README.md in this folder; rebuild with `python scripts/build_demo_base.py`."""

from __future__ import annotations

from pathlib import Path

import yaml

DEMO_DIR = Path(__file__).resolve().parent
DEMO_BASE = DEMO_DIR / "base"
DEMO_TRAIN = DEMO_DIR / "data" / "train.jsonl"
DEMO_CONFIG = DEMO_DIR / "demo.yaml"

# Names used by scripts/build_demo_base.py and scripts/measure_demo_task.py.
BASE_DIR, TRAIN_FILE, CONFIG_FILE = DEMO_BASE, DEMO_TRAIN, DEMO_CONFIG


def demo_settings() -> dict:
    """The demo's config values (applied before any user file or override)."""
    return yaml.safe_load(DEMO_CONFIG.read_text()) or {}
