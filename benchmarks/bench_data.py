"""Full-scale data: memory and time of preparing a large chat set into the token store, and of
starting from it, in one process and under torchrun.

    .venv/bin/python benchmarks/bench_data.py --rows 200000        # ~5 min on 2 cores

Each figure comes from a fresh process (peak RSS is the kernel's VmHWM of that process; a torchrun
figure is the largest rank's). Rows are generated chat exchanges (messages format) tokenized with
the demo's character tokenizer (one character = one token), so tokens ~ characters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {q}"},
                                              {"role": "assistant", "content": a}]}) + "\n")


PREPARE = r"""
import json, os, sys, time, resource
t0 = time.time()
from fullscale.demo import DEMO_BASE
from fullscale.data import prepare_data
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(DEMO_BASE))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
c0 = time.process_time()
t1 = time.time()
data = prepare_data(train_file=sys.argv[1], eval_file=None, eval_split=0.0, dataset_format="messages",
                    max_seq_length=512, seed=0, tokenizer=tok)
t2 = time.time()
# Touch every example the way a DataLoader does (lengths, then a pass over all of them).
n = sum(len(ex["input_ids"]) for ex in data.train[:2000]) and len(data.train)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"tokens": data.train_stats.num_tokens, "examples": n, "from_store": data.from_store,
                  "baseline_rss": base, "peak_rss": status("VmHWM:"), "rss_after": status("VmRSS:"),
                  "seconds": t2 - t1, "cpu_seconds": time.process_time() - c0 + children.ru_utime + children.ru_stime,
                  "children_peak_rss": children.ru_maxrss * 1024, "import_seconds": t1 - t0}))
"""


def run_prepare(data: Path, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), FULLSCALE_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = subprocess.run([PY, "-c", PREPARE, str(data)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train(config: Path, cache: Path, *, processes: int) -> dict:
    """Whole `fullscale train` (max_steps 1): seconds from launch to the first step's record, CPU
    seconds of all processes, the largest process's peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), FULLSCALE_CACHE=str(cache), OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "fullscale", "train", str(config)]
    if processes > 1:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "fullscale", "train",
               str(config)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    run_dir = Path(json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))["output_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r["time"] for r in records if r["event"] == "train")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("data: tokenized by")), "")
    return {"seconds_to_first_step": first - t0, "cpu_seconds": (after.ru_utime - before.ru_utime)
            + (after.ru_stime - before.ru_stime), "peak_rss": after.ru_maxrss * 1024, "ranks_line": line}


def write_config(path: Path, data: Path, run_dir: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "train_file": str(data), "model_name_or_path": str(ROOT / "src/fullscale/demo/base"),
        "output_dir": str(run_dir), "dataset_format": "messages", "max_seq_length": 512, "max_steps": 1,
        "eval_split": 0.0, "eval_steps": 0, "early_stopping_patience": 0, "save_steps": 1000,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "report_to": "none",
        "gradient_checkpointing": False, "logging_steps": 1, "seed": 0}))
    return path


def datasets_map(data: Path, num_proc: int) -> dict:
    """The same rows through datasets.map(num_proc): chat template + tokenize (no label masking)."""
    code = r"""
import json, sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
from fullscale.demo import DEMO_BASE
tok = AutoTokenizer.from_pretrained(str(DEMO_BASE))
ds = load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
t0 = time.time()
def f(batch):
    texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
    return {"input_ids": tok(texts, add_special_tokens=False)["input_ids"]}
out = ds.map(f, batched=True, num_proc=int(sys.argv[2]), remove_columns=ds.column_names, load_from_cache_file=False)
n = sum(len(x) for x in out["input_ids"])
print(json.dumps({"seconds": time.time() - t0, "tokens": n}))
"""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_DATASETS_OFFLINE="1")
        out = subprocess.run([PY, "-c", code, str(data), str(num_proc), cache], capture_output=True, text=True,
                             env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--skip-datasets", action="store_true", help="skip the datasets.map comparison")
    p.add_argument("--skip-torchrun", action="store_true")
    p.add_argument("--big", type=int, metavar="ROWS",
                   help="instead: ROWS rows (2,100,000 give ~100M tokens) prepared and trained for 3 steps by 2 processes")
    args = p.parse_args()
    if args.big:
        return big(args.big)
    import torch
    import transformers

    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "chat.jsonl"
        write_rows(data, args.rows)
        print(f"data: {args.rows:,} chat rows, {data.stat().st_size / 2**20:.1f} MiB")
        cache = tmp / "cache"
        cold = run_prepare(data, cache)
        per_token = (cold["peak_rss"] - cold["baseline_rss"]) / cold["tokens"]
        store = next((cache / "tokenized").glob("*.store"))
        print(f"cold prepare: {cold['tokens']:,} tokens in {cold['seconds']:.1f} s ({cold['tokens'] / cold['seconds']:,.0f} "
              f"tokens/s, CPU {cold['cpu_seconds']:.1f} s); peak RSS +{per_token:.1f} B/token over the process after "
              f"imports ({(cold['peak_rss'] - cold['baseline_rss']) / 2**20:.0f} MiB); RSS after "
              f"+{(cold['rss_after'] - cold['baseline_rss']) / 2**20:.0f} MiB; workers' peak "
              f"{cold['children_peak_rss'] / 2**20:.0f} MiB; store {store.stat().st_size / 2**20:.0f} MiB")
        warm = run_prepare(data, cache)
        print(f"warm open: {warm['seconds']:.2f} s (store: {warm['from_store']}); RSS +"
              f"{(warm['rss_after'] - warm['baseline_rss']) / 2**20:.1f} MiB after reading 2,000 examples")
        config = write_config(tmp / "c.yaml", data, tmp / "run1")
        t = run_train(config, cache, processes=1)
        print(f"warm `fullscale train` (1 process): first step {t['seconds_to_first_step']:.1f} s after launch")
        if not args.skip_torchrun:
            small = tmp / "small.jsonl"
            write_rows(small, 2000, seed=1)
            cache2 = tmp / "cache2"
            t_small = run_train(write_config(tmp / "s.yaml", small, tmp / "run-small"), cache2, processes=2)
            t_cold = run_train(write_config(tmp / "c2.yaml", data, tmp / "run2"), cache2, processes=2)
            t_warm = run_train(write_config(tmp / "c3.yaml", data, tmp / "run3"), cache2, processes=2)
            print(f"torchrun 2 processes, cold store: {t_cold['ranks_line']}; CPU {t_cold['cpu_seconds']:.0f} s for "
                  f"both processes (one process's cold prepare: {cold['cpu_seconds']:.0f} s CPU); first step "
                  f"{t_cold['seconds_to_first_step']:.1f} s")
            print(f"torchrun 2 processes, warm store: first step {t_warm['seconds_to_first_step']:.1f} s; largest "
                  f"rank's peak RSS {t_warm['peak_rss'] / 2**20:.0f} MiB vs {t_small['peak_rss'] / 2**20:.0f} MiB with "
                  f"2,000 rows: +{(t_warm['peak_rss'] - t_small['peak_rss']) / 2**20:.0f} MiB for the data")
        if not args.skip_datasets:
            ref = datasets_map(data, 2)
            print(f"datasets.map(num_proc=2), chat template + tokenize: {ref['tokens']:,} tokens in {ref['seconds']:.1f} s "
                  f"({ref['tokens'] / ref['seconds']:,.0f} tokens/s); fullscale prepare (with label masks, checks and "
                  f"store) {cold['tokens'] / cold['seconds']:,.0f} tokens/s = "
                  f"{(cold['tokens'] / cold['seconds']) / (ref['tokens'] / ref['seconds']):.2f}x")


def big(rows: int) -> None:
    """The full-scale case: a set of ~100M tokens, cold, under torchrun with 2 processes."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "big.jsonl"
        t0 = time.time()
        write_rows(data, rows)
        print(f"data: {rows:,} chat rows, {data.stat().st_size / 2**30:.2f} GiB (written in {time.time() - t0:.0f} s)")
        config = write_config(tmp / "big.yaml", data, tmp / "run")
        text = config.read_text().replace("max_steps: 1", "max_steps: 3")
        config.write_text(text)
        t = run_train(config, tmp / "cache", processes=2)
        store = next((tmp / "cache" / "tokenized").glob("*.store"))
        meta, _ = __import__("fullscale.data.store", fromlist=["x"]).read_header(store)
        tokens = meta["train_stats"]["num_tokens"]
        print(f"torchrun 2 processes, cold: {tokens:,} tokens; {t['ranks_line']}; first step "
              f"{t['seconds_to_first_step']:.0f} s after launch; largest process's peak RSS "
              f"{t['peak_rss'] / 2**30:.2f} GiB ({t['peak_rss'] / tokens:.1f} B/token); store {store.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
