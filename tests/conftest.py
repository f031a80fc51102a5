import json
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_reverse_task(path: Path, n: int = 96, seed: int = 0) -> Path:
    """prompt/completion rows: reverse a short word (variable lengths, so padding varies)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
            fh.write(json.dumps({"prompt": f"rev {w}:", "completion": w[::-1]}) + "\n")
    return path


def pytest_collection_modifyitems(config, items):
    """With parallel workers (make test), the long tests (marked slow) start first, so no worker
    is left alone with one at the end. The order is the same in every worker, as xdist requires."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + char tokenizer saved with save_pretrained, as a user would bring it."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def reverse_data(tmp_path_factory):
    return write_reverse_task(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, reverse_data):
    """Config for a short real run on the tiny model; keyword overrides on top."""
    from fullscale.config import load_config

    def make(**overrides):
        values = {
            "model_name_or_path": str(tiny_model_dir),
            "train_file": str(reverse_data),
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "eval_steps": 3,
            "save_steps": 3,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "lora_dropout": 0.0,
            "gradient_checkpointing": False,
            "report_to": "none",
            "eval_split": 0.1,
            "eval_samples": 0,   # sample generations have their own tests (test_report, test_trackers)
        }
        values.update(overrides)
        return load_config(None, values)

    return make


ROOT = Path(__file__).parents[1]


def run_cli(*args, fault=None, env_extra=None, timeout=300, wait=True, **popen):
    """`python -m fullscale ARGS` as a user runs it (this checkout's sources, one thread), with an
    optional FULLSCALE_FAULT; wait=False returns the Popen (stdout and stderr piped, text)."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("FULLSCALE_FAULT", None)
    if fault:
        env["FULLSCALE_FAULT"] = fault
    cmd = [sys.executable, "-m", "fullscale", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **popen)


def torchrun(*args, nproc: int = 2) -> list[str]:
    """`torchrun` on `nproc` processes of this machine for `args`, on a port of its own
    (--standalone), so the launches of tests running side by side never meet."""
    import shutil

    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [exe, "--standalone", "--nproc_per_node", str(nproc), *map(str, args)]


def free_port() -> int:
    """A TCP port nothing listens on now (for `accelerate launch --main_process_port`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> dict[int, float]:
    """Per-step train losses from metrics.jsonl (needs logging_steps=1)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"}


@pytest.fixture(autouse=True, scope="session")
def private_tokenization_cache(tmp_path_factory):
    """Tests never read or write the user's tokenization cache."""
    path = tmp_path_factory.mktemp("fullscale-cache")
    old = os.environ.get("FULLSCALE_CACHE")
    os.environ["FULLSCALE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FULLSCALE_CACHE", None)
    else:
        os.environ["FULLSCALE_CACHE"] = old
