"""Export a run's adapter or merged model, verified; load a trained model back.

An export is only worth what a user can load elsewhere, so every export is complete and checked:

- Source: a run's ``best_model/``, its newest checkpoint or a given step, verified against its
  manifest (a corrupted adapter is an error, never exported).
- Base: read from the run (config.yaml, provenance) and compared by fingerprint with the base the
  run trained on, so an adapter is never merged into (or shipped for) other weights.
- Adapter export: adapter weights and config, the base's tokenizer files byte for byte (chat
  template included), its generation config, and a README.md model card with provenance.
- Merged export (``merge=True``): base in the chosen dtype + adapter, ``merge_and_unload``, saved
  with ``save_pretrained`` so plain transformers loads it. Then VERIFIED: the saved model is loaded
  back and its logits on held-out examples are compared with the unmerged adapter model's; a
  difference beyond MERGE_TOLERANCES fails the export.
- Writing: a staging directory renamed into place (``commit_directory``), so a failure leaves
  nothing half-written; an existing directory is replaced only with ``force``; the same export
  twice gives byte-identical files (no timestamps anywhere).

`load_trained_model()` is the Python entry point for using the result (adapter or merged, from a
run directory, best_model/, an export, a checkpoint or a merged directory).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from fullscale import checkpoint as ckpt
from fullscale.checkpoint import first_line
from fullscale.errors import CheckpointError, ModelError, UserError
from fullscale.fingerprint import TOKENIZER_FILES, model_matches, tokenizer_files_fingerprint, versions
from fullscale.loss import perplexity
from fullscale.model import load_tokenizer_from
from fullscale.prompts import read_prompt_format, write_prompt_format

log = logging.getLogger("fullscale")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# How far the merged model's logits may be from the adapter model's (base + unmerged adapter, same
# dtype) on the verification examples: max |merged - adapter| <= atol + rtol * max |adapter logit|.
#
#   dtype  atol  rtol  bound at max |logit| 21.5  measured (demo run, 60 eval examples, CPU)
#   fp32   1e-4  1e-5  3.2e-4                     2.9e-5  (only the summation order differs)
#   fp16   0.02  0.01  0.24                       0.063   (W + BA rounded to fp16, 10-bit mantissa)
#   bf16   0.10  0.05  1.18                       0.38    (W + BA rounded to bf16, 7-bit mantissa: a few
#                                                          bf16 ulps of logits around 16-32, where one ulp is 0.125)
#
# A wrong merge (wrong scaling, a missing module, another base) differs by whole logits, far beyond.
MERGE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (0.02, 0.01),
    torch.bfloat16: (0.10, 0.05),
}

VERIFY_MAX_EXAMPLES = 8        # held-out examples the merge is checked on
VERIFY_MAX_TOKENS = 2048       # and at most this many tokens (the reference logits are kept)
VERIFY_BATCH_SIZE = 4

# Used to verify a merge when the run's eval data cannot be rebuilt (moved files, no config).
FIXED_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "1, 2, 3, 5, 8, 13, 21, 34",
)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# The files a tokenizer is saved as, chat template included: the ones the run fingerprinted,
# copied byte for byte.
CARD = "README.md"


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

    def describe(self) -> str:
        """E.g. "best_model/ of runs/demo (step 400, eval loss 0.0198)"."""
        details = [f"step {self.step}"] if self.step is not None else []
        details += [f"eval loss {self.eval_loss:.4f}"] if self.eval_loss is not None else []
        where = f" of {self.run_dir}" if self.run_dir else ""
        return f"{self.label}{where}" + (f" ({', '.join(details)})" if details else "")

    @property
    def has_tokenizer(self) -> bool:
        return (self.adapter_dir / "tokenizer_config.json").is_file()


def resolve_source(run_dir: str | os.PathLike, checkpoint: str | int = "best") -> Source:
    """The adapter of `run_dir` to export: "best" (best_model/, else the best checkpoint),
    "latest" (the newest checkpoint with a manifest) or a step number; verified against its manifest."""
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
            f"{run_dir} has nothing to export: {what}. A run saves its first checkpoint at save_steps and "
            f"best_model/ at its first evaluation; continue it with `fullscale resume {run_dir}` or give the "
            "output_dir of a finished run")

    checkpoint = str(checkpoint)
    if checkpoint == "best" and best_model.is_dir():
        reason = ckpt.verify_directory(best_model)
        if reason is not None:
            best = manager.best()
            alt = f"--checkpoint {best.step} (the best checkpoint)" if best else "--checkpoint latest"
            raise CheckpointError(
                f"{best_model} is corrupted: {reason}. It is not exported; export a checkpoint instead with {alt}, "
                "or re-create best_model/ by resuming the run")
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


# ----------------------------------------------------------------------------- export

@dataclass
class Verification:
    """Merged vs adapter model on held-out examples."""

    dtype: str
    data: str                     # what the examples were
    num_examples: int
    num_tokens: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    adapter_perplexity: float
    merged_perplexity: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        return (f"max |logit difference| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g} for {self.dtype}); "
                f"perplexity adapter {self.adapter_perplexity:.6g}, merged {self.merged_perplexity:.6g}; on "
                f"{self.num_examples} {self.data} ({self.num_tokens:,} tokens)")


@dataclass
class ExportResult:
    path: Path
    source: Source
    merged: bool
    dtype: str | None = None
    verification: Verification | None = None
    notes: list[str] = field(default_factory=list)
    prompt_format: dict | None = None   # how the run's prompts looked (prompt_format.json)
    base_id: str | None = None          # the base as recorded for others: a hub id (portable) or the local path


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoint: str | int = "best",
           merge: bool = False, dtype: str = "auto", force: bool = False, base: str | None = None,
           allow_base_mismatch: bool = False, allow_quantized_merge: bool = False, device: str = "cpu",
           trust_remote_code: bool = False, base_id: str | None = None,
           say: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Export the adapter (or, with `merge`, the verified merged model) of `run_dir` to `out_dir`.

    `checkpoint`: "best", "latest" or a step. `dtype` (merge only): auto (the run's training dtype),
    bf16, fp16 or fp32. `force`: replace an existing `out_dir`. `base`: the base model when it moved
    (checked by fingerprint unless `allow_base_mismatch`). A quantized base is refused for a merge
    unless `allow_quantized_merge`. `device`: where the merge is computed and verified ("auto": cuda
    when available). `trust_remote_code`: run the base's custom code (only when the caller asks).
    `base_id`: the hub id recorded as the base (adapter_config.json, the card), so the export loads
    on other machines (default: the base's own `_name_or_path` when that is a hub id, else its path).
    `say`: progress lines. Raises UserError subclasses (CheckpointError, ModelError,
    ExportError) with a one-paragraph message; on any failure `out_dir` is left as it was.
    """
    source = resolve_source(run_dir, checkpoint)
    source.trust_remote_code = trust_remote_code
    out = Path(out_dir)
    for note in recover_export(out):
        say(note)
    resolve_base(source, base, allow_mismatch=allow_base_mismatch)
    _check_output(out, source, force=force)
    if merge:
        torch_dtype = resolve_dtype(dtype, source)
        method = quantization_of(source.base) if Path(source.base).is_dir() else None
        if method and not allow_quantized_merge:
            raise ModelError(
                f"refusing to merge into {source.base}: it is a quantized model ({method}). Merging a LoRA adapter "
                "into quantized weights rounds the merge to the quantization grid, or merges into dequantized weights "
                "that are not the ones anyone will load: the merged model quietly differs from the adapter model. "
                "Merge into the full-precision base instead (--base DIR with the original weights, plus "
                "--allow-base-mismatch if the run trained on the quantized copy), export the adapter without --merge, "
                "or add --allow-quantized-merge to merge anyway")
    elif dtype not in ("auto", None):
        raise ExportError(f"--dtype {dtype} only applies with --merge (an adapter is exported as it was saved)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = ckpt.staging_dir(out.parent, out.name)
    try:
        result = ExportResult(path=out, source=source, merged=merge, base_id=base_id or hub_id_of(source.base))
        if result.base_id == source.base and Path(source.base).is_dir():
            result.notes.append(f"the base is recorded as the local path {source.base}: the export loads only where "
                                "that path exists; pass --base-id ORG/NAME to record the base's hub id instead")
        result.notes += _write_tokenizer(staging, source)
        if merge:
            result.dtype = DTYPE_NAMES[torch_dtype]
            result.verification = _write_merged(staging, source, torch_dtype, device=_device(device), say=say)
        else:
            _write_adapter(staging, source, result.base_id)
        _write_generation_config(staging, source.base, merged=merge)
        result.prompt_format = read_prompt_format(source.adapter_dir)
        write_prompt_format(staging, result.prompt_format)
        (staging / CARD).write_text(model_card(result))
        ckpt.commit_directory(staging, out, manifest={"kind": EXPORT_KIND, "provenance": provenance(result)})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _check_output(out: Path, source: Source, *, force: bool) -> None:
    """Refuse an --out that would replace the source or the run (even with --force), or an existing one."""
    target = out.resolve()
    adapter = source.adapter_dir.resolve()
    clash = target == adapter or target.is_relative_to(adapter) or adapter.is_relative_to(target)
    if source.run_dir is not None:
        run_dir = source.run_dir.resolve()
        if run_dir.is_relative_to(target):
            clash = True
        elif target.is_relative_to(run_dir):
            first = target.relative_to(run_dir).parts[0]
            clash = clash or first in ("best_model", "runs") or bool(ckpt.CHECKPOINT_RE.match(first)) or \
                first.startswith((ckpt.STAGING_PREFIX, ckpt.TRASH_PREFIX)) or (run_dir / first).is_file()
    if clash:
        raise ExportError(f"--out {out} would overwrite the run or its checkpoints; choose a directory outside "
                          f"{source.run_dir or source.adapter_dir}, or a new subdirectory of it such as exports/")
    if source.base and Path(source.base).is_dir():
        base = Path(source.base).resolve()
        if target == base or target.is_relative_to(base) or base.is_relative_to(target):
            raise ExportError(f"--out {out} would write over the base model {source.base} (or the directory holding "
                              "it); choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose another --out directory, or add --force to replace it "
                          "(the old one is replaced only once the new export is complete and verified)")
    if out.exists():
        why = _not_an_export(out)
        if why:
            raise ExportError(f"--force replaces only a previous fullscale export, and {out} {why}; nothing was "
                              "changed. Choose another --out")


EXPORT_KIND = "fullscale-export"


def is_export(path: Path) -> bool:
    return _not_an_export(path) is None


def _not_an_export(path: Path) -> str | None:
    """None when `path` is an export fullscale wrote and nothing else (its manifest lists every file);
    otherwise why it is not."""
    from fullscale import rundir

    if rundir.is_run_dir(path):
        return "is a run directory"
    try:
        manifest = ckpt.read_manifest(path)
    except (OSError, ValueError):
        return "is not one (it has no fullscale manifest.json)"
    provenance = manifest.get("provenance") if isinstance(manifest, dict) else None
    if not (manifest.get("kind") == EXPORT_KIND or (isinstance(provenance, dict) and "merged" in provenance)):
        return "is not one (its manifest.json is not an export's: a checkpoint or best_model/?)"
    listed = set(manifest.get("files") or {}) | {ckpt.MANIFEST}
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()
                   and str(p.relative_to(path)) not in listed)
    if extra:
        return f"holds files the export did not write ({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''})"
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file() and \
            not manifest.get("kind") and not (provenance or {}).get("merged"):
        return "looks like a model directory"
    return None


def recover_export(out: Path) -> list[str]:
    """Undo what a killed export of `out` left: its staging directories (of processes that are gone)
    are removed, and an old export that a kill left moved aside is put back when `out` is missing."""
    from fullscale import rundir

    notes: list[str] = []
    parent = out.parent
    if not parent.is_dir():
        return notes
    staged = f"{ckpt.STAGING_PREFIX}{out.name}-"
    trashed = f"{ckpt.TRASH_PREFIX}{out.name}-"
    for p in sorted(parent.iterdir()):
        name = p.name
        if name.startswith(staged) and name[len(staged):].isdigit():
            if not rundir.pid_alive(int(name[len(staged):])):
                shutil.rmtree(p, ignore_errors=True)
                notes.append(f"removed {p}, left by an export that was interrupted")
    aside = []
    for p in parent.iterdir():
        rest = p.name[len(trashed):].split("-") if p.name.startswith(trashed) else []
        if len(rest) == 2 and all(x.isdigit() for x in rest) and not rundir.pid_alive(int(rest[0])):
            aside.append((int(rest[1]), p))
    for _, p in sorted(aside, reverse=True):
        if not out.exists() and ckpt.verify_directory(p) is None:
            os.replace(p, out)
            notes.append(f"restored {out}: an interrupted export had moved it aside")
        else:
            shutil.rmtree(p, ignore_errors=True)
    return notes


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


def check_push(repo: str) -> None:
    """Refuse a --push-to-hub that cannot work, before any export work: offline, no token, a bad name."""
    from fullscale.config import is_hub_name

    if not (is_hub_name(repo) and repo.count("/") == 1):
        raise ExportError(f"--push-to-hub {repo!r}: give a repository as ORG/NAME (or USER/NAME)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ExportError(f"cannot push to {repo}: HF_HUB_OFFLINE is set (no network). Export without "
                          "--push-to-hub, then upload from a machine with network: "
                          f"huggingface-cli upload {repo} EXPORT_DIR")
    from huggingface_hub import get_token

    if not get_token():
        raise ExportError(f"cannot push to {repo}: no Hugging Face token. Run `huggingface-cli login` or set HF_TOKEN, "
                          "or export without --push-to-hub")


def push(out: Path, repo: str) -> str:
    """Upload the export to `repo` (created private if missing); the export stays on disk whatever happens."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="fullscale export")
    except Exception as exc:  # noqa: BLE001 - network, permissions: the export is written, say how to retry
        error = ExportError(f"the export is written to {out}, but pushing it to {repo} failed: {first_line(exc)}. "
                            f"Retry with: huggingface-cli upload {repo} {out}")
        error.exit_code = 1
        raise error from None
    return repo


def hub_id_of(base: str) -> str:
    """The base as others can find it: a hub id as given, or the `_name_or_path` a local base's
    config.json records when that is a hub id (not a path); else the local path itself."""
    from fullscale.config import is_hub_name

    if not Path(base).exists():
        return base
    recorded = (_read_json(Path(base) / "config.json") or {}).get("_name_or_path")
    if isinstance(recorded, str) and "/" in recorded and is_hub_name(recorded) and not Path(recorded).exists():
        return recorded
    return base


def _write_adapter(staging: Path, source: Source, base_id: str) -> None:
    shutil.copyfile(source.adapter_dir / ADAPTER_FILES[0], staging / ADAPTER_FILES[0])
    config = json.loads((source.adapter_dir / ADAPTER_FILES[1]).read_text())
    if config.get("base_model_name_or_path") != base_id:
        config["base_model_name_or_path"] = base_id  # where from_pretrained will look for the base
        (staging / ADAPTER_FILES[1]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        shutil.copyfile(source.adapter_dir / ADAPTER_FILES[1], staging / ADAPTER_FILES[1])


def _write_tokenizer(staging: Path, source: Source) -> list[str]:
    """The tokenizer files byte for byte: the base's (what the run fingerprinted), or the adapter directory's
    own copy when the base's changed; a hub base is saved with save_pretrained. Checked to load."""
    from transformers import AutoTokenizer

    notes = []
    base = Path(source.base)
    recorded = source.fingerprints.get("tokenizer")
    if base.is_dir() and (not recorded or not source.has_tokenizer or tokenizer_files_fingerprint(str(base)) == recorded):
        origin = base
    elif source.has_tokenizer:
        origin = source.adapter_dir
        if base.is_dir():
            notes.append(f"the tokenizer files of {base} changed since the run; exported the run's copy "
                         f"from {source.label}")
    else:
        origin = None
    if origin is not None:
        for name in TOKENIZER_FILES:
            if (origin / name).is_file():
                shutil.copyfile(origin / name, staging / name)
    else:
        load_tokenizer_from(source.base, trust_remote_code=source.trust_remote_code).save_pretrained(staging)
    try:
        AutoTokenizer.from_pretrained(str(staging), trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"the tokenizer of {origin or source.base} does not load once exported "
                         f"({first_line(exc)}); check that its tokenizer files are complete") from None
    return notes


def _write_generation_config(staging: Path, base: str, *, merged: bool) -> None:
    """The base's generation config (stop tokens, defaults) travels with the export."""
    from transformers import GenerationConfig

    if (Path(base) / "generation_config.json").is_file():
        shutil.copyfile(Path(base) / "generation_config.json", staging / "generation_config.json")
    elif not merged and not Path(base).is_dir():  # a hub base (a merged model saved its own)
        try:
            GenerationConfig.from_pretrained(base).save_pretrained(staging)
        except Exception:  # noqa: BLE001 - a base without one is fine
            pass


def _write_merged(staging: Path, source: Source, dtype: torch.dtype, *, device: torch.device,
                  say: Callable[[str], None]) -> Verification:
    """Merge the adapter into the base, save it, load the saved model back and compare it with the
    unmerged adapter model on held-out examples. Raises ExportError when they differ."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer_from(str(staging), trust_remote_code=source.trust_remote_code)
    batches, data = verification_batches(source, tokenizer)
    model = _load_adapter_model(source, dtype=dtype, device=device)
    say(f"computing reference logits of the adapter model ({DTYPE_NAMES[dtype]}, {device}) on {data}")
    reference, adapter_loss = _logits_on(model, batches, device)
    merged = model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(staging)
    del model, merged
    gc.collect()

    say("loading the saved merged model back (plain transformers) to verify it")
    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype,
                                                    trust_remote_code=source.trust_remote_code).to(device).eval()
    max_diff, max_logit = 0.0, 0.0
    loss_sum, num_tokens = 0.0, 0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
            got = logits[batch["attention_mask"].bool()].float().cpu()          # (real tokens, V)
            diff = float((got - ref).abs().max())
            max_diff = max(max_diff, diff if math.isfinite(diff) else math.inf)  # a NaN never passes
            max_logit = max(max_logit, float(ref.abs().max()))
            total, count = _loss(logits, batch["labels"])
            loss_sum, num_tokens = loss_sum + total, num_tokens + count
    del reloaded
    atol, rtol = MERGE_TOLERANCES[dtype]
    n_examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    verification = Verification(
        dtype=DTYPE_NAMES[dtype], data=data, num_examples=n_examples,
        num_tokens=sum(int(b["attention_mask"].sum()) for b in batches), max_abs_diff=max_diff,
        max_abs_logit=max_logit, tolerance=atol + rtol * max_logit,
        adapter_perplexity=perplexity(*adapter_loss), merged_perplexity=perplexity(loss_sum, num_tokens))
    if not verification.passed:
        raise ExportError(
            f"merge verification failed: the merged model does not compute what the adapter model computes "
            f"({verification.describe()}). Nothing was written. Merge in fp32 (--dtype fp32), check that the base is "
            "the full-precision model the adapter was trained on, or ship the adapter (export without --merge)")
    return verification


def verification_batches(source: Source, tokenizer) -> tuple[list[dict[str, torch.Tensor]], str]:
    """A few held-out examples as padded batches: the run's eval examples (rebuilt with its config),
    else FIXED_TEXTS. Returns (batches, a description of the examples)."""
    from fullscale.data import collate

    examples, data = None, None
    try:
        examples = _run_eval_examples(source, tokenizer)
        data = "held-out eval examples of the run"
    except (UserError, OSError) as exc:
        log.warning("cannot rebuild the run's eval examples (%s); verifying on fixed texts", first_line(exc))
    if not examples:
        examples, data = _fixed_examples(tokenizer), "fixed texts"
    chosen, tokens = [], 0
    for ex in examples[:VERIFY_MAX_EXAMPLES]:
        ids = ex["input_ids"][: VERIFY_MAX_TOKENS]
        if chosen and tokens + len(ids) > VERIFY_MAX_TOKENS:
            break
        chosen.append({"input_ids": ids, "labels": ex["labels"][: len(ids)]})
        tokens += len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate(chosen[i:i + VERIFY_BATCH_SIZE], pad_token_id=pad)
               for i in range(0, len(chosen), VERIFY_BATCH_SIZE)]
    return batches, data


def _run_eval_examples(source: Source, tokenizer) -> list[dict] | None:
    if source.config is None:
        return None
    from fullscale.config import build_config
    from fullscale.data import prepare_for

    data = prepare_for(build_config(dict(source.config)), tokenizer)
    return data.eval


def _fixed_examples(tokenizer) -> list[dict]:
    texts = list(FIXED_TEXTS)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}], tokenize=False))
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0")).input_ids
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _logits_on(model, batches, device) -> tuple[list[torch.Tensor], tuple[float, int]]:
    """Logits at the real (non-padding) tokens of each batch, as fp32 on the CPU; and the loss sum/count."""
    out, loss_sum, num_tokens = [], 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits                                  # (B, T, V)
            out.append(logits[batch["attention_mask"].bool()].float().cpu())        # (real tokens, V)
            total, count = _loss(logits, batch["labels"])
            loss_sum, num_tokens = loss_sum + total, num_tokens + count
    return out, (loss_sum, num_tokens)


def _loss(logits, labels) -> tuple[float, int]:
    from fullscale.loss import token_loss_sum

    total, count = token_loss_sum(logits, labels)
    return float(total), int(count)


# ----------------------------------------------------------------------------- provenance and model card

def provenance(result: ExportResult) -> dict[str, Any]:
    """What the export is and where it came from (manifest.json "provenance"; the model card shows it)."""
    s = result.source
    best = (s.result or {}).get("best_eval_loss")
    return {
        "base_model": s.base,
        "base_model_id": result.base_id,
        "fingerprints": s.fingerprints,
        "source": {"run_dir": str(s.run_dir.resolve()) if s.run_dir else None, "adapter": s.label.rstrip("/"),
                   "step": s.step, "eval_loss": s.eval_loss},
        "run": {"total_steps": (s.result or {}).get("total_steps"), "best_eval_loss": best,
                "best_step": (s.result or {}).get("best_step"), "stop_reason": (s.result or {}).get("stop_reason")},
        "merged": result.merged,
        "dtype": result.dtype,
        "verification": asdict(result.verification) if result.verification else None,
        "config": s.config,
        "versions": versions(short_torch=True),
    }


def model_card(result: ExportResult) -> str:
    """README.md: what the export is, how to load it, and its provenance. No timestamps (repeatable)."""
    s, p = result.source, provenance(result)
    fp = s.fingerprints or {}
    lines = [
        "---",
        f"base_model: {json.dumps(result.base_id or s.base)}",
        f"library_name: {'transformers' if result.merged else 'peft'}",
        "pipeline_tag: text-generation",
        "tags:",
        "- fullscale",
        "- lora",
        *(["- merged"] if result.merged else []),
        "---",
        "",
        f"# {'Merged model (base + LoRA adapter)' if result.merged else 'LoRA adapter'} trained with fullscale",
        "",
    ]
    if result.merged:
        lines += [
            f"The LoRA adapter merged into a copy of `{result.base_id or s.base}` ({result.dtype}). Loads with plain "
            "transformers, no peft:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "```",
            "",
            "## Merge verification",
            "",
            f"The saved merged model was loaded back and compared with the adapter model (base + unmerged adapter, "
            f"{result.dtype}) on {result.verification.num_examples} {result.verification.data} "
            f"({result.verification.num_tokens} tokens):",
            "",
            "| | |",
            "|---|---|",
            f"| max abs logit difference | {result.verification.max_abs_diff:.3g} |",
            f"| tolerance ({result.dtype}) | {result.verification.tolerance:.3g} |",
            f"| perplexity, adapter model | {result.verification.adapter_perplexity:.6g} |",
            f"| perplexity, merged model | {result.verification.merged_perplexity:.6g} |",
            "",
        ]
    else:
        lines += [
            f"A LoRA adapter for `{result.base_id or s.base}`, with the base's tokenizer (and chat template) and "
            "generation config.",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(result.base_id or s.base)})",
            'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "```",
            "",
            "or `fullscale.load_trained_model(None, \"path/to/this/directory\")`.",
            "",
        ]
        rank = (s.config or {}).get("lora_rank")
        if isinstance(rank, int) and rank > 16:
            lines += [f"Serving with vLLM: `--enable-lora --max-lora-rank {rank}` (vLLM's default rank limit is 16, "
                      f"below this adapter's rank {rank}).", ""]
    run = p["run"]
    rows = [
        ("base model", f"`{result.base_id or s.base}`"),
        ("base model used for the export", f"`{s.base}`" if result.base_id not in (None, s.base) else None),
        ("base model fingerprint (config.json + weights)", fp.get("model")),
        ("tokenizer fingerprint", fp.get("tokenizer")),
        ("train data fingerprint", fp.get("train_data")),
        ("eval data fingerprint", fp.get("eval_data")),
        ("config fingerprint", fp.get("config")),
        ("run directory", f"`{p['source']['run_dir']}`" if p["source"]["run_dir"] else None),
        ("exported from", f"`{s.label}`"),
        ("step of this adapter", s.step),
        ("eval loss of this adapter", _num(s.eval_loss)),
        ("steps trained in the run", run["total_steps"]),
        ("best eval loss of the run", f"{_num(run['best_eval_loss'])} at step {run['best_step']}"
         if run["best_eval_loss"] is not None else None),
        ("stop reason", run["stop_reason"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items())),
    ]
    lines += ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", "## Prompt format", "", _prompt_format_text(result.prompt_format)]
    for note in result.notes:
        lines += ["", f"Note: {note}."]
    if s.config is not None:
        lines += ["", "## fullscale config", "", "```yaml", yaml.safe_dump(s.config, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _prompt_format_text(record: dict | None) -> str:
    """How to prompt the model as it was trained (prompt_format.json holds the same)."""
    if record is None:
        return "Not recorded (a run made before fullscale wrote prompt_format.json)."
    fmt = record["format"]
    if fmt.split("+")[0] == "alpaca":
        return (f"Trained on alpaca rows: prompt with the template below (`{{instruction}}` replaced), then read the "
                f"completion.\n\n```\n{record['alpaca_template']}\n```")
    if any(f in ("messages", "sharegpt") for f in fmt.split("+")):
        return (f"Trained on chat data ({fmt}): prompt through the tokenizer's chat template with "
                "`add_generation_prompt=True`.")
    return (f"Trained on {fmt} rows: the prompt as plain text, tokenized with the tokenizer's special tokens "
            "(`tokenizer(prompt)`), no chat template.")


def _num(x: float | None) -> str | None:
    return None if x is None else f"{x:.6g}"


# ----------------------------------------------------------------------------- loading

def _load_adapter_model(source: Source, *, dtype: torch.dtype, device: torch.device):
    """Base (in `dtype`) + the unmerged adapter, in eval mode on `device`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype, trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the base model {source.base} ({source.base_origin}): {first_line(exc)}. "
                         "Give a local directory saved with save_pretrained (--base DIR)") from None
    try:
        model = PeftModel.from_pretrained(base, str(source.adapter_dir), is_trainable=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"the adapter in {source.adapter_dir} does not fit the base {source.base}: "
                              f"{first_line(exc)}. Check that it was trained on this base") from None
    return model.to(device).eval()


def load_trained_model(base_model_name: str | None, adapter_path: str | os.PathLike, device: str = "cpu",
                       merge_adapter: bool = False, *, dtype: str | torch.dtype = "auto",
                       trust_remote_code: bool = False):
    """Load a trained model and its tokenizer, ready for generation: returns (model, tokenizer).

    `adapter_path`: a run directory (its best model), a best_model/ or checkpoint directory, an
    adapter export, or a merged export (then `base_model_name` is not used). `base_model_name`:
    the base model (directory or hub id), or None to read it from the run or the export's
    provenance; a local base is checked against the fingerprint the run recorded. `merge_adapter`:
    merge the adapter into the base (a plain transformers model). `dtype`: auto (the run's training
    dtype; a merged directory's saved dtype), bf16, fp16 or fp32. `trust_remote_code`: run the
    model's custom code; off unless the caller turns it on (never taken from the files loaded).
    """
    path = Path(adapter_path)
    if not path.exists():
        raise CheckpointError(f"no such model or run directory: {path}")
    target = _device(device)
    if _is_merged_dir(path):
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer_from(str(path), trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype="auto" if dtype in ("auto", None) else _named_dtype(dtype),
                trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot load the model in {path}: {first_line(exc)}") from None
        return model.to(target).eval(), tokenizer
    in_run = (path.parent / "config.yaml").is_file()
    if in_run and path.name == "best_model":
        source = resolve_source(path.parent, "best")
    elif in_run and ckpt.CHECKPOINT_RE.match(path.name):
        source = resolve_source(path.parent, ckpt.CHECKPOINT_RE.match(path.name).group(1))
    elif (path / "adapter_config.json").is_file():
        source = source_from_dir(path)
    elif path.is_dir():
        source = resolve_source(path, "best")
    else:
        raise CheckpointError(f"{path} is not a model directory, an adapter or a run directory")
    source.trust_remote_code = trust_remote_code
    resolve_base(source, base_model_name)
    torch_dtype = resolve_dtype(dtype, source)
    tokenizer = load_tokenizer_from(str(source.adapter_dir) if source.has_tokenizer else source.base,
                                trust_remote_code=source.trust_remote_code)
    model = _load_adapter_model(source, dtype=torch_dtype, device=target)
    if merge_adapter:
        model = model.merge_and_unload(safe_merge=True)
    return model, tokenizer


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
