"""What an export starts from: the adapter (a run's best_model/, a checkpoint, an adapter directory),
verified, and the base it belongs to, checked by fingerprint; the dtype and device of a merge."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fullscale import checkpoint as ckpt
from fullscale.errors import first_line
from fullscale.errors import CheckpointError, ModelError, UserError
from fullscale.fingerprint import model_matches, tokenizer_files_fingerprint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class ExportError(UserError):
    """The export cannot be written as asked (output directory in use, merge verification failed)."""


# ----------------------------------------------------------------------------- the source

@dataclass
class Source:
    """An adapter to export or load, and what is known about how it was made."""

    adapter_dir: Path
    label: str                                   # "best_model/", "checkpoint-200/", or the directory
    run_dir: Path | None = None
    step: int | None = None
    eval_loss: float | None = None
    fingerprints: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None         # the run's config
    result: dict[str, Any] | None = None         # training_result.json
    recorded_base: str | None = None             # base path recorded by the run (provenance)
    base: str | None = None                      # the base to use: local dir or hub id (resolve_base)
    base_origin: str = ""                        # where `base` was read from, for messages
    # Custom modelling code runs only when the user of this invocation asks for it: never read from a
    # manifest, a run's config.yaml or trainer_state.json (files anyone may have written).
    trust_remote_code: bool = False
    origin_dir: Path | None = None               # where the adapter lives in the run, when adapter_dir is a copy

    def describe(self) -> str:
        """E.g. "best_model/ of runs/demo (step 400, eval loss 0.0198)"."""
        details = [f"step {self.step}"] if self.step is not None else []
        details += [f"eval loss {self.eval_loss:.4f}"] if self.eval_loss is not None else []
        where = f" of {self.run_dir}" if self.run_dir else ""
        return f"{self.label}{where}" + (f" ({', '.join(details)})" if details else "")

    @property
    def has_tokenizer(self) -> bool:
        return (self.adapter_dir / "tokenizer_config.json").is_file()


# What an export or a load reads of a checkpoint (the rest is the optimizer's and the resume's).
_NOT_READ = re.compile(r"^(optimizer\.pt|scheduler\.pt|rng_state_\d+\.pt)$")
SNAPSHOT_TRIES = 5


def resolve_source(run_dir: str | os.PathLike, checkpoint: str | int = "best", *,
                   for_what: str = "export") -> Source:
    """The adapter of `run_dir` to export: "best" (best_model/, else the best checkpoint),
    "latest" (the newest checkpoint with a manifest) or a step number; verified against its manifest.

    A run may be training in `run_dir`: best_model/ is replaced at each improvement and rotation
    removes checkpoints. So what is read is a copy (adapter, tokenizer, state; not the optimizer),
    checked file by file against the manifest read with it: one step's manifest never meets
    another step's weights. A copy that the run changed under it is taken again."""
    for attempt in range(SNAPSHOT_TRIES):
        source = _resolve_source(run_dir, checkpoint, for_what=for_what)
        try:
            return _snapshot(source)
        except (_Changed, FileNotFoundError):
            if attempt == SNAPSHOT_TRIES - 1:
                raise CheckpointError(
                    f"{source.adapter_dir} kept changing while it was read ({SNAPSHOT_TRIES} tries): the run in "
                    f"{run_dir} replaces it too often. Export a checkpoint (--checkpoint STEP), or wait for the "
                    "run to stop") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


class _Changed(Exception):
    """The directory being copied was replaced or removed during the copy."""


def _snapshot(source: Source) -> Source:
    """`source` read from a private copy of its adapter directory, verified against its manifest."""
    import tempfile
    import weakref

    original = source.adapter_dir
    manifest_path = original / ckpt.MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise _Changed() from None
    copy = Path(tempfile.mkdtemp(prefix="fullscale-read-"))
    weakref.finalize(source, shutil.rmtree, copy, True)
    try:
        for rel, meta in files.items():
            if _NOT_READ.match(rel):
                continue
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original / rel, target)
            if target.stat().st_size != meta.get("size") or ckpt.sha256_file(target) != meta.get("sha256"):
                raise _Changed()
        (copy / ckpt.MANIFEST).write_text(json.dumps(manifest))
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or not ckpt.is_disk_error(exc):
            raise
        shutil.rmtree(copy, ignore_errors=True)
        import logging

        logging.getLogger("fullscale").warning(
            "cannot copy %s to %s (%s): reading it in place; stop the run first if it is still training",
            original, tempfile.gettempdir(), exc.strerror)
        return source
    if ckpt.read_manifest(original) != manifest:      # replaced after the copy began
        raise _Changed()
    if (copy / ckpt.STATE).is_file() and source.step is not None:
        state = json.loads((copy / ckpt.STATE).read_text())
        if (state.get("train_state") or {}).get("step", source.step) != source.step:
            raise _Changed()
    source.origin_dir, source.adapter_dir = original, copy
    return source


def _resolve_source(run_dir: str | os.PathLike, checkpoint: str | int = "best", *,
                    for_what: str = "export") -> Source:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory: {run_dir}. Give the output_dir of a run started with "
                              "fullscale train (e.g. runs/demo)")
    manager = ckpt.CheckpointManager(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    result = _read_json(run_dir / "training_result.json")
    steps = [s for s, _ in manager.checkpoint_dirs()]
    best_model = run_dir / "best_model"
    if not best_model.is_dir():
        # A kill between moving the old best_model/ aside and renaming the new one in: the old one
        # is complete (the next `fullscale train` puts it back); read it where it is.
        aside = [p for p in sorted(run_dir.glob(f"{ckpt.TRASH_PREFIX}best_model-*"), reverse=True)
                 if ckpt.verify_directory(p) is None]
        best_model = aside[0] if aside else best_model
    if not best_model.is_dir() and not manager.valid():
        what = f"checkpoint directories at steps {steps} but none has a manifest.json (incomplete saves)" if steps \
            else "no best_model/ and no checkpoint-<step>/"
        raise CheckpointError(
            f"{run_dir} has nothing to {for_what}: {what}. A run saves its first checkpoint at save_steps and "
            f"best_model/ at its first evaluation; continue it with `fullscale resume {run_dir}` or give the "
            "output_dir of a finished run")

    checkpoint = str(checkpoint)
    if checkpoint == "best" and best_model.is_dir():
        reason = ckpt.verify_directory(best_model)
        if reason is not None:
            best = manager.best() or manager.latest()
            if for_what == "export":
                alt = f"--checkpoint {best.step} (the best checkpoint)" if best else "--checkpoint latest"
                alt = f"export a checkpoint instead with {alt}"
            else:
                alt = (f"{for_what} a checkpoint instead: fullscale {for_what} {run_dir / f'checkpoint-{best.step}'}"
                       if best else f"{for_what} a checkpoint directory of the run instead")
            raise CheckpointError(
                f"{best_model} is corrupted: {reason}. It is not used; {alt}, or re-create best_model/ by resuming "
                "the run")
        manifest = ckpt.read_manifest(best_model)
        provenance = manifest.get("provenance") or {}
        source = Source(adapter_dir=best_model, label="best_model/", run_dir=run_dir, step=manifest.get("step"),
                        eval_loss=manifest.get("eval_loss"), fingerprints=provenance.get("fingerprints") or {},
                        config=config, result=result, recorded_base=provenance.get("base_model"))
    else:
        info = _choose_checkpoint(manager, checkpoint, steps)
        reason = ckpt.verify_directory(info.path)
        if reason is not None:
            raise CheckpointError(
                f"{info.path} is corrupted: {reason}. It is not exported; choose another checkpoint with "
                f"--checkpoint STEP (`fullscale checkpoints {run_dir} --verify` lists the valid ones)")
        state = ckpt.load_state(info.path)
        source = Source(adapter_dir=info.path, label=f"{info.path.name}/", run_dir=run_dir, step=info.step,
                        eval_loss=state.get("last_eval_loss"), fingerprints=state.get("fingerprints") or {},
                        config=state.get("config") or config, result=result)
    _check_adapter_files(source.adapter_dir)
    return source


def _choose_checkpoint(manager: ckpt.CheckpointManager, checkpoint: str, steps: list[int]) -> ckpt.CheckpointInfo:
    run_dir = manager.run_dir
    if checkpoint == "best":
        info = manager.best()
        if info is None:
            raise CheckpointError(
                f"{run_dir} has no best model: no best_model/ and no checkpoint of the best evaluation (did the run "
                "evaluate? eval_split 0 and no eval_file turn evaluation off). Export --checkpoint latest instead")
        return info
    if checkpoint == "latest":
        info = manager.latest()
        assert info is not None  # resolve_source checked that a checkpoint with a manifest exists
        return info
    if not checkpoint.isdigit():
        raise CheckpointError(f"--checkpoint {checkpoint!r} is not best, latest or a step number (one of {steps})")
    for info in manager.list():
        if info.step == int(checkpoint):
            if info.valid is False:
                raise CheckpointError(f"{info.path} is not a usable checkpoint ({info.reason}); choose another "
                                      f"step (`fullscale checkpoints {run_dir} --verify` lists the valid ones)")
            return info
    raise CheckpointError(f"{run_dir} has no checkpoint-{checkpoint}; its checkpoints are at steps {steps or 'none'}")


def _check_adapter_files(path: Path) -> None:
    missing = [n for n in ADAPTER_FILES if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} has no {' or '.join(missing)}: it is not a LoRA adapter saved by fullscale "
                              "or peft. Give a run directory, its best_model/, a checkpoint or an export")
    try:
        from safetensors import safe_open

        with safe_open(str(path / ADAPTER_FILES[0]), framework="pt") as fh:
            fh.keys()
        json.loads((path / ADAPTER_FILES[1]).read_text())
    except Exception as exc:  # noqa: BLE001 - a truncated or overwritten file has many failure types
        raise CheckpointError(f"the adapter in {path} is corrupted ({first_line(exc)}); export another checkpoint "
                              "or re-create it by resuming the run") from None


def source_from_dir(path: str | os.PathLike) -> Source:
    """An adapter directory outside a run layout: an export, a best_model/ or checkpoint copied elsewhere,
    or a plain peft save. Verified against its manifest when it has one."""
    path = Path(path)
    _check_adapter_files(path)
    manifest: dict[str, Any] = {}
    if (path / ckpt.MANIFEST).is_file():
        reason = ckpt.verify_directory(path)
        if reason is not None:
            raise CheckpointError(f"{path} is corrupted: {reason}; export it again from its run directory")
        manifest = ckpt.read_manifest(path)
    provenance = manifest.get("provenance") or {}
    state = _read_json(path / ckpt.STATE) or {}
    recorded = provenance.get("base_model") or json.loads((path / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    return Source(adapter_dir=path, label=f"{path}", step=manifest.get("step"),
                  eval_loss=manifest.get("eval_loss", state.get("last_eval_loss")),
                  fingerprints=provenance.get("fingerprints") or state.get("fingerprints") or {},
                  config=provenance.get("config") or state.get("config"), recorded_base=recorded)


# ----------------------------------------------------------------------------- the base model

def resolve_base(source: Source, override: str | None = None, *, allow_mismatch: bool = False) -> str:
    """Set and return `source.base`: `override`; else the first local directory among the base recorded
    with the adapter and the run's model_name_or_path (null: the demo base); else the first of those
    (a hub id). Checked to exist and, unless `allow_mismatch`, to be the base the run trained on
    (fingerprints of config.json + weights, and of the tokenizer when the adapter has none of its own)."""
    if override:
        candidates = [(os.path.expanduser(str(override)), "given explicitly")]
    else:
        candidates = []
        if source.recorded_base:
            candidates.append((source.recorded_base, "recorded with the adapter"))
        if source.config is not None and source.config.get("model_name_or_path"):
            candidates.append((os.path.expanduser(source.config["model_name_or_path"]),
                               "model_name_or_path of the run's config"))
        elif source.config is not None:
            from fullscale.demo import DEMO_BASE

            candidates.append((str(DEMO_BASE), "the embedded demo base (model_name_or_path: null)"))
        if not candidates:
            raise ModelError(f"cannot tell which base model the adapter in {source.adapter_dir} belongs to (no run "
                             "config, no provenance, no base_model_name_or_path); pass the base model explicitly "
                             "(--base DIR, or base_model_name in Python)")
    # The first one that is a local directory (a run moved to another machine, or the demo base of
    # another install, is found through the config); else the first one, as a hub id or to report.
    base, origin = next((c for c in candidates if Path(c[0]).is_dir()), candidates[0])
    source.base, source.base_origin = base, origin

    recorded = source.fingerprints.get("model")
    if not Path(base).is_dir():
        if recorded is None or recorded.startswith("hub:"):
            return base  # a hub id, as in training; loading it says whether it can be reached
        raise ModelError(
            f"the base model {base} ({origin}) is not found. The adapter only works on the base it was trained on; "
            "put the directory back, or pass --base DIR (base_model_name in Python) pointing at a copy of it "
            "(checked by fingerprint)")
    if recorded and not allow_mismatch:
        same, found = model_matches(base, recorded)
        if not same:
            raise ModelError(
                f"the base model at {base} ({origin}) is not the one this adapter was trained on: the fingerprint of "
                f"its config.json and weights is {found}, the run recorded {recorded}. An adapter merged into (or run "
                "on) other weights silently gives another model. Pass the run's base with --base DIR; if you know "
                "this base is right (e.g. the full-precision original of a quantized base), add "
                "--allow-base-mismatch")
        tok = source.fingerprints.get("tokenizer")
        if tok and not source.has_tokenizer and tokenizer_files_fingerprint(base) != tok:
            raise ModelError(
                f"the tokenizer files of {base} ({origin}) changed since the run (fingerprint "
                f"{tokenizer_files_fingerprint(base)}, recorded {tok}), and {source.label} has no tokenizer of its own. "
                "Restore them, export best_model/ (it keeps the run's tokenizer), or add --allow-base-mismatch")
    return base


def quantization_of(base: str) -> str | None:
    """The quantization method of a base model directory (config or weight names), or None."""
    p = Path(base)
    cfg = _read_json(p / "config.json") or {}
    qc = cfg.get("quantization_config")
    if qc:
        return str(qc.get("quant_method") or "quantized") if isinstance(qc, dict) else "quantized"
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        return None
    from safetensors import safe_open

    with safe_open(str(weights[0]), framework="pt") as fh:
        keys = list(fh.keys())
    if any(k.endswith((".qweight", ".qzeros", ".g_idx")) for k in keys):
        return "GPTQ/AWQ"
    if any(k.endswith((".SCB", ".weight_format", ".absmax", ".quant_map")) or ".quant_state." in k for k in keys):
        return "bitsandbytes"
    return None



def resolve_dtype(dtype: str | torch.dtype | None, source: Source) -> torch.dtype:
    """"auto": the dtype the run trained in (bf16 when its bf16 setting resolved to bf16, else fp32)."""
    if dtype not in ("auto", None):
        return _named_dtype(dtype)
    bf16 = (source.config or {}).get("bf16", "auto")
    if bf16 is True or bf16 is False:
        return torch.bfloat16 if bf16 else torch.float32
    # bf16: auto was resolved on the training machine; the run recorded the outcome.
    if source.run_dir is not None and (source.run_dir / "metrics.jsonl").is_file():
        with open(source.run_dir / "metrics.jsonl") as fh:
            for line in fh:   # train_start is near the top of a long file
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "train_start" and rec.get("dtype"):
                    return torch.bfloat16 if "bfloat16" in rec["dtype"] else torch.float32
    return torch.float32


def _named_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _device(device: str) -> torch.device:
    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)



def _is_merged_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
