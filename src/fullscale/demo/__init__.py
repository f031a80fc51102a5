"""The embedded demo that `fullscale train` runs with no config: a tiny pretrained Llama base
(base/), its character-level tokenizer, the bundled dataset (data/train.jsonl) and the recommended
trainer settings (demo.yaml). See README.md in this folder and scripts/build_demo_base.py."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
BASE_DIR = DEMO_DIR / "base"
TRAIN_FILE = DEMO_DIR / "data" / "train.jsonl"
CONFIG_FILE = DEMO_DIR / "demo.yaml"
