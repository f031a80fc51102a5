"""What a resume needs besides the checkpoint: the run directory's state, fingerprints of the
model, tokenizer and data, the compatibility check, and continuity of the records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from fullscale import checkpoint as ckpt
from fullscale.config import Config
from fullscale.errors import ConfigError
from fullscale.fingerprint import (FINGERPRINT_VERSION, data_fingerprint, legacy_data_fingerprint,
                                   legacy_hash_files, model_files, model_fingerprint, tokenizer_files_fingerprint)

# Settings whose change makes a resumed run a different run. The model, tokenizer and data are
# compared by content (fingerprints), not by path; the batch by what each step sees.
EXACTNESS_KEYS = (
    "dataset_format", "dataset_columns", "alpaca_template", "alpaca_template_with_input", "dataset_config",
    "dataset_split", "max_seq_length", "invalid_rows", "packing", "group_by_length", "seed", "eval_split",
    "learning_rate", "gradient_accumulation_steps", "warmup_ratio", "weight_decay", "lr_scheduler_type",
    "max_grad_norm", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "num_train_epochs",
    "max_steps", "bf16", "early_stopping_patience", "early_stopping_min_delta", "eval_steps",
)
# lora_target_modules' default before it was named `attention` (what a run of an earlier version recorded).
LEGACY_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Changes that do not alter what is computed: accepted on resume and recorded.
HARMLESS_KEYS = ("logging_steps", "eval_samples", "eval_sample_tokens", "max_invalid_share", "eval_time_budget", "memory_budget_gb", "memory_margin", "plan_check", "report_to", "save_steps", "save_total_limit", "output_dir", "resume",
                 "force_resume", "dataloader_num_workers", "per_device_eval_batch_size", "tf32",
                 "attn_implementation", "gradient_checkpointing", "trust_remote_code",
                 "model_name_or_path", "train_file", "eval_file", "per_device_train_batch_size")

def fingerprints(config: Config, *, model_path: str, train_file: str, num_processes: int) -> dict[str, Any]:
    return {
        "version": FINGERPRINT_VERSION,
        "model": model_fingerprint(model_path),
        "tokenizer": tokenizer_files_fingerprint(model_path),
        "train_data": data_fingerprint(train_file),
        "eval_data": data_fingerprint(config.eval_file),
        # What one step sees: examples per micro-step across all processes, and the window.
        "global_micro_batch": config.per_device_train_batch_size * num_processes,
        "config": config.fingerprint(EXACTNESS_KEYS),
    }


def legacy_fingerprints(config: Config, *, model_path: str, train_file: str) -> dict[str, Any]:
    """The version-1 fingerprints of the same files, to compare with a run made before version 2."""
    p = Path(model_path)
    return {"model": legacy_hash_files(model_files(p), p) if p.is_dir() else f"hub:{model_path}",
            "train_data": legacy_data_fingerprint(train_file),
            "eval_data": legacy_data_fingerprint(config.eval_file)}


def compare(config: Config, saved_config: dict[str, Any], saved_fp: dict[str, Any],
            current_fp: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that break exactness or meaning, harmless changes), each as 'what: old -> new'."""
    breaking, harmless = [], []
    for key in EXACTNESS_KEYS:
        if key == "lora_target_modules" and saved_config.get(key) == list(LEGACY_DEFAULT_TARGETS) and \
                getattr(config, key) in ("attention", list(LEGACY_DEFAULT_TARGETS)):
            continue   # the default before it was named `attention`; the adapter's tensor names are compared too
        if key in saved_config and saved_config[key] != getattr(config, key):
            breaking.append(f"{key}: {saved_config[key]!r} -> {getattr(config, key)!r}")
    labels = {"model": "base model files", "tokenizer": "tokenizer files", "train_data": "train data contents",
              "eval_data": "eval data contents", "global_micro_batch": "examples per micro-step across processes "
              "(per_device_train_batch_size x processes)"}
    for key, label in labels.items():
        if key in saved_fp and saved_fp[key] != current_fp.get(key):
            if key == "global_micro_batch":
                breaking.append(f"{label}: {saved_fp[key]} -> {current_fp[key]}")
            else:
                breaking.append(f"{label} changed")
    for key in HARMLESS_KEYS:
        if key in saved_config and saved_config[key] != getattr(config, key, None):
            harmless.append(f"{key}: {saved_config[key]!r} -> {getattr(config, key)!r}")
    return breaking, harmless


def refuse(run_dir: Path, breaking: list[str]) -> ConfigError:
    lines = "; ".join(breaking)
    return ConfigError(
        f"cannot resume {run_dir}: {lines}. Resuming with these changes would not continue the run that was "
        "started (the result would be neither exact nor meaningful). Restore them, use another output_dir for "
        "a new run, or set force_resume: true to continue anyway")


def prepare_run_dir(config: Config, manager: ckpt.CheckpointManager,
                    say: Callable[[str], None]) -> ckpt.CheckpointInfo | None:
    """Main process only, with the run lock held: clean leftovers, choose the checkpoint to resume
    from (or none). Never deletes or replaces a previous run's results: a directory holding results
    but no checkpoint to resume is refused unless `resume: restart` moves the old run aside."""
    from fullscale import rundir

    run_dir = manager.run_dir
    for note in manager.cleanup():
        say(note)
    if config.resume == "restart":
        rundir.move_aside(run_dir, say)
        return None
    results = rundir.previous_results(run_dir)
    steps = [s for s, _ in manager.checkpoint_dirs()]
    if config.resume == "never" and (steps or results or (run_dir / "config.yaml").exists()):
        held = f"checkpoints at steps {steps}" if steps else ", ".join(results) or "the start of a run"
        raise ConfigError(
            f"output_dir {run_dir} already holds a run ({held}) and resume is 'never'; choose another output_dir "
            "for a fresh run, set resume: auto to continue this one, or resume: restart to move it into "
            f"{run_dir}/previous-<time>/ and start over (fullscale never deletes a run to start over)")
    if steps:
        info = manager.newest_verified(say=say)
        if info is not None:
            return info
        raise ConfigError(
            f"output_dir {run_dir}: no checkpoint verifies (each was set aside as checkpoint-N.invalid-<time>, "
            "see the lines above), and fullscale does not silently start such a run over from step 0. Run again "
            "with resume=restart to move the old run into previous-<time>/ and start from step 0, or use another "
            "output_dir")
    same_keys = EXACTNESS_KEYS + ("model_name_or_path", "train_file", "eval_file")
    same_run = lambda saved: all(saved.get(k) == getattr(config, k) for k in same_keys)  # noqa: E731
    if results and not rundir.interrupted_start(run_dir, same_run):
        raise ConfigError(
            f"output_dir {run_dir} holds the results of a previous run ({', '.join(results)}) but no checkpoint to "
            "resume from; a fresh start would replace them. Run again with resume=restart to move them into "
            f"{run_dir}/previous-<time>/ and start from step 0, or choose another output_dir")
    return None


def logged_after(run_dir: Path, step: int) -> set[tuple[str, int]]:
    """The (event, step) pairs metrics.jsonl holds after `step`: what a resume from `step` redoes
    and the trackers already have."""
    out = set()
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec.get("step"), int) and rec["step"] > step:
            out.add((rec.get("event"), rec["step"]))
    return out


def truncate_metrics(run_dir: Path, step: int, *, keep_events: tuple[str, ...] = (), eval_redone: bool = False) -> int:
    """Drop metrics.jsonl records written after `step` (they are about to be redone), and the
    evaluation at `step` itself when `eval_redone` (the checkpoint was saved before it).

    Returns the last step the dropped records had reached (the work redone ends there)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return step
    kept, reached, prefix, offset = [], step, 0, 0   # prefix: the bytes of the leading lines all kept
    whole = True
    with open(path, "rb") as fh:
        raw = fh.read()
    for raw_line in raw.splitlines(keepends=True):
        line = raw_line.decode("utf-8", errors="replace").rstrip("\n")
        offset += len(raw_line)
        try:
            rec = json.loads(line)
        except ValueError:
            whole = False
            continue  # a line cut by a kill
        rec_step = rec.get("step", 0)
        reached = max(reached, rec_step)
        if ((rec_step > step and rec.get("event") not in keep_events) or rec.get("event") == "train_end"
                or (eval_redone and rec_step == step and rec.get("event") == "eval")):
            whole = False
            continue
        kept.append(line)
        if whole and raw_line.endswith(b"\n"):
            prefix = offset
        elif whole:
            whole = False
    if prefix == sum(len(x.encode()) + 1 for x in kept):
        # The records to drop are the file's tail (metrics.jsonl only grows): cut it there, in
        # place. It needs no free space, which a resume after a full disk may not have.
        if prefix != len(raw):
            os.truncate(path, prefix)
        return reached
    from fullscale.checkpoint import write_text

    write_text(path, "".join(x + "\n" for x in kept))
    return reached
