"""Kill a real fullscale run at random moments, resume it each time, and check it ends as if never killed.

    python scripts/fault_injection.py [--kills 10] [--seed 0] [--processes 1|2]

Builds a tiny Llama and a dataset in a temporary directory, runs the training once without
interruption (the reference), then runs the same command again and again, sending SIGKILL from
outside at random moments (inside steps, accumulation windows, evaluations and saves alike),
until the run completes. It then compares the final adapter bitwise, the per-step losses, the
evaluations, the early-stopping step and the best step with the reference, and prints the result.
Exit code 0 when everything matches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    import torch
    import yaml
    from safetensors.torch import load_file

    from conftest import write_reverse_task
    from tiny import save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="fullscale-faults-"))
    model_dir = save_tiny_model(work / "model")
    data = write_reverse_task(work / "train.jsonl", n=160)
    settings = dict(model_name_or_path=str(model_dir), train_file=str(data), max_steps=120,
                    per_device_train_batch_size=4 // args.processes, gradient_accumulation_steps=2,
                    eval_steps=4, save_steps=3, save_total_limit=2, logging_steps=1, learning_rate=3e-3,
                    lora_dropout=0.1, early_stopping_patience=6, early_stopping_min_delta=0.001, eval_split=0.1)

    def command(name: str) -> list[str]:
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(dict(settings, output_dir=str(work / name))))
        if args.processes > 1:
            torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
            return [torchrun, "--nproc_per_node", str(args.processes), "-m", "fullscale", "train", str(cfg)]
        return [sys.executable, "-m", "fullscale", "train", str(cfg)]

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    t0 = time.time()
    ref = subprocess.run(command("reference"), env=env, capture_output=True, text=True)
    if ref.returncode != 0:
        print(ref.stderr)
        return 1
    duration = time.time() - t0
    print(f"reference run: {duration:.1f}s")

    rng = random.Random(args.seed)
    kills = 0
    while kills < args.kills:
        proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        # Wait until the run is training (past its imports and resume), then kill it a random
        # moment later: inside a step, a window, an evaluation or a save alike.
        metrics = work / "killed" / "metrics.jsonl"
        seen = metrics.read_text().count("\n") if metrics.exists() else 0
        while proc.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") <= seen + 1):
            time.sleep(0.01)
        if proc.poll() is not None:
            break  # finished before the kill
        delay = rng.uniform(0.0, 0.5)
        time.sleep(delay)
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        state = sorted((work / "killed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
        print(f"kill {kills}: {delay:.2f}s after training resumed, at step ~{lines[-1]['step'] if lines else 0}; "
              f"checkpoints now {[p.name for p in state]}")
    final = subprocess.run(command("killed"), env=env, capture_output=True, text=True)
    if final.returncode != 0:
        print(final.stderr)
        return 1

    def summary(run: Path):
        result = json.loads((run / "training_result.json").read_text())
        weights = load_file(str(run / f"checkpoint-{result['total_steps']}" / "adapter_model.safetensors"))
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [(r["step"], r["loss"]) for r in records if r["event"] == "train"]
        evals = [(r["step"], r["eval_loss"]) for r in records if r["event"] == "eval"]
        return result, weights, losses, evals

    ra, wa, la, ea = summary(work / "reference")
    rb, wb, lb, eb = summary(work / "killed")
    checks = {
        "adapter bitwise equal": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
        "per-step losses equal": la == lb,
        "evaluations equal": ea == eb,
        "stop step and reason equal": (ra["total_steps"], ra["stop_reason"]) == (rb["total_steps"], rb["stop_reason"]),
        "best step equal": ra["best_step"] == rb["best_step"],
    }
    print(f"{kills} kills; reference stopped by {ra['stop_reason']} at step {ra['total_steps']}, best step "
          f"{ra['best_step']}; resumes recorded: {rb['num_resumes']}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
