"""FSDP2 with CPU offload and DeepSpeed ZeRO-3 with offload on the GPUs of this machine: each starts,
saves, is SIGKILLed inside an accumulation window, resumes, and must end bitwise equal to its
uninterrupted run and within float rounding of DDP. A smoke test for GPU machines (the CPU test
suite runs the same paths without offload for FSDP, which needs a GPU for it).

    python benchmarks/gpu_sharded_smoke.py                 # every GPU of the machine (at least one)
    python benchmarks/gpu_sharded_smoke.py --allow-cpu     # 2 CPU processes, FSDP without offload

Prints one line per engine and exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ENGINES = {
    "fsdp-offload": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true",
                     "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"},
    "zero3-offload": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
                      "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--allow-cpu", action="store_true", help="without a GPU: 2 CPU processes, FSDP without offload")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        nproc = torch.cuda.device_count()
    elif args.allow_cpu:
        nproc = 2
        ENGINES["fsdp-offload"]["FSDP_OFFLOAD_PARAMS"] = "false"
    else:
        print("gpu_sharded_smoke: no CUDA device here; skipped (--allow-cpu checks the script on the CPU)")
        return 0
    from conftest import write_reverse_task
    from safetensors.torch import load_file
    from tiny import save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="fullscale-sharded-smoke-"))
    model_dir = save_tiny_model(work / "model")
    data = write_reverse_task(work / "train.jsonl")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"

    def run(name: str, env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(model_dir), train_file=str(data),
                                           output_dir=str(work / name), max_steps=8, per_device_train_batch_size=2,
                                           gradient_accumulation_steps=2, eval_steps=3, save_steps=2,
                                           logging_steps=1, learning_rate=3e-3, eval_split=0.1,
                                           save_total_limit=2, bf16=False, seed=0)))
        full_env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", **env)
        full_env.pop("FULLSCALE_FAULT", None)
        if fault:
            full_env["FULLSCALE_FAULT"] = fault
        return subprocess.run([torchrun, "--nproc_per_node", str(nproc), "-m", "fullscale", "train", str(cfg)],
                              capture_output=True, text=True, env=full_env, timeout=600)

    def adapter(name: str) -> dict:
        return load_file(str(work / name / "checkpoint-8" / "adapter_model.safetensors"))

    failures = 0
    try:
        t0 = time.perf_counter()
        proc = run("ddp", {})
        if proc.returncode != 0:
            print(f"ddp: failed\n{proc.stderr[-3000:]}")
            return 1
        ddp = adapter("ddp")
        for engine, env in ENGINES.items():
            t0 = time.perf_counter()
            ref = run(engine, env)
            first = run(f"{engine}-killed", env, fault="micro@5")
            resumed = run(f"{engine}-killed", env)
            if ref.returncode != 0 or resumed.returncode != 0:
                failing = ref if ref.returncode != 0 else resumed
                print(f"{engine}: FAILED to run\n{failing.stdout[-2000:]}\n{failing.stderr[-3000:]}")
                failures += 1
                continue
            a, b = adapter(engine), adapter(f"{engine}-killed")
            bitwise = all(torch.equal(a[k], b[k]) for k in a)
            vs_ddp = max((a[k] - ddp[k]).abs().max().item() for k in a)
            described = [line for line in ref.stdout.splitlines() if "FSDP2:" in line or "DeepSpeed ZeRO" in line]
            ok = bitwise and vs_ddp < 1e-4 and first.returncode != 0 and "resuming from" in resumed.stdout
            failures += not ok
            print(f"{engine:14s} {'ok ' if ok else 'FAILED'} killed + resumed bitwise equal: {bitwise}; largest "
                  f"difference from DDP {vs_ddp:.2e}; {nproc} process(es); {described[:1]} "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
