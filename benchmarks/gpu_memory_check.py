"""The memory plan against the measured peak on one CUDA GPU: `fullscale plan`'s training peak
next to torch.cuda.max_memory_allocated over real steps (fullscale.plan.probe: forward, backward
and the AdamW update of the real fullscale model + LoRA), for three configurations of Llama-shaped
models from 1B to 8B with random bf16 weights. Target: error within 10%.

    python benchmarks/gpu_memory_check.py                      # the three cases (~2 min on an H200)
    python benchmarks/gpu_memory_check.py --cases 8b-ckpt      # one of them
    python benchmarks/gpu_memory_check.py --allow-cpu --size tiny   # the script itself, on the CPU

The model is built from a LlamaConfig directly on the device (no weights written or read), as in
bench_gpu.py; the plan reads the same config.json. On the CPU the probe measures resident memory
growth against the plan's CPU rows, so the figures there only check that the script runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import SIZES, llama_config, random_base_model  # noqa: E402
from bench_throughput import word_tokenizer  # noqa: E402

# name: (model size, fullscale settings). Gradient checkpointing on and off, short and long rows.
CASES = {
    "1b-ckpt": ("1b", dict(max_seq_length=2048, per_device_train_batch_size=8, gradient_checkpointing=True)),
    "3b-nockpt": ("3b", dict(max_seq_length=1024, per_device_train_batch_size=4, gradient_checkpointing=False)),
    "8b-ckpt": ("8b", dict(max_seq_length=4096, per_device_train_batch_size=4, gradient_checkpointing=True)),
}
TINY = {"tiny-ckpt": ("tiny", dict(max_seq_length=256, per_device_train_batch_size=4, gradient_checkpointing=True)),
        "tiny-nockpt": ("tiny", dict(max_seq_length=128, per_device_train_batch_size=4, gradient_checkpointing=False))}
TARGET = 0.10


def check(name: str, size: str, settings: dict, *, device: torch.device, workdir: Path) -> dict:
    from fullscale.config import load_config
    from fullscale.plan import build_plan, probe

    tokenizer = word_tokenizer(SIZES[size][-1])
    model_dir = workdir / name
    cfg = llama_config(size, tokenizer, settings["max_seq_length"])
    cfg.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train_file = workdir / "train.jsonl"
    train_file.write_text(json.dumps({"prompt": "w1 w2", "completion": " w3"}) + "\n")
    config = load_config(None, dict(model_name_or_path=str(model_dir), train_file=str(train_file),
                                    output_dir=str(workdir / f"run-{name}"), bf16=device.type == "cuda",
                                    attn_implementation="sdpa", gradient_accumulation_steps=1, plan_check=False,
                                    **settings))
    plan = build_plan(config, num_processes=1, device=device)
    args = SimpleNamespace(llama_config=cfg, device=device)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    with random_base_model(args):
        timing = probe(config, plan, device=device, num_steps=2)
    planned, measured = timing.planned_peak_bytes, timing.measured_peak_bytes
    return {"case": name, "size": size, **settings, "planned_gb": planned / 2**30, "measured_gb": measured / 2**30,
            "error": (planned - measured) / measured if measured else float("nan"),
            "micro_step_s": timing.micro_step_seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", help=f"cases to run (default: all of {sorted(CASES)})")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (checks the script)")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: the tiny cases (with --allow-cpu)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("gpu_memory_check: no CUDA device here; skipped (run it on a GPU machine, or pass --allow-cpu "
              "--size tiny to check the script on the CPU)")
        return 0
    cases = TINY if args.size == "tiny" else CASES
    names = args.cases or list(cases)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    workdir = Path(tempfile.mkdtemp(prefix="fullscale-gpu-memory-"))
    rows = []
    try:
        for case in names:
            size, settings = cases[case]
            try:
                row = check(case, size, settings, device=device, workdir=workdir)
            except Exception as exc:   # one case failing (out of memory) must not hide the others
                print(f"{case}: failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
                continue
            rows.append(row)
            print(f"{case:12s} batch {row['per_device_train_batch_size']} x {row['max_seq_length']}, checkpointing "
                  f"{'on ' if row['gradient_checkpointing'] else 'off'}: planned {row['planned_gb']:6.2f} GB, measured "
                  f"{row['measured_gb']:6.2f} GB, error {100 * row['error']:+5.1f}% "
                  f"({'within' if abs(row['error']) <= TARGET else 'OUTSIDE'} {TARGET:.0%})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0 if rows and len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
