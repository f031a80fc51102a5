"""Writing an export: the adapter (or the verified merge), the tokenizer byte for byte, the
generation config, the prompt format and the card, staged and renamed into place; what --force may
replace; a killed export recovered; the hub id recorded and the push."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from fullscale import checkpoint as ckpt
from fullscale.errors import ModelError, first_line
from fullscale.fingerprint import TOKENIZER_FILES, tokenizer_files_fingerprint
from fullscale.model import load_tokenizer_from
from fullscale.prompts import read_prompt_format, write_prompt_format
from fullscale.export.card import ExportResult, model_card, provenance
from fullscale.export.source import (ADAPTER_FILES, DTYPE_NAMES, ExportError, Source, _device, _read_json,
                                     quantization_of, resolve_base, resolve_dtype, resolve_source)
from fullscale.export.verify import _write_merged

log = logging.getLogger("fullscale")

CARD = "README.md"



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
        result.prompt_format = read_prompt_format(source.origin_dir or source.adapter_dir)
        write_prompt_format(staging, result.prompt_format)
        (staging / CARD).write_text(model_card(result))
        ckpt.commit_directory(staging, out, manifest={"kind": EXPORT_KIND, "provenance": provenance(result)})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result



def export_best_model(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Export the run's best adapter (+ tokenizer, chat template, generation config, model card) to
    `out_dir`, staged and renamed into place: the same as `fullscale export RUN_DIR --out DIR`."""
    return export(run_dir, out_dir, checkpoint="best", force=force).path

def _check_output(out: Path, source: Source, *, force: bool) -> None:
    """Refuse an --out that would replace the source or the run (even with --force), or an existing one."""
    target = out.resolve()
    adapter = (source.origin_dir or source.adapter_dir).resolve()
    clash = target == adapter or target.is_relative_to(adapter) or adapter.is_relative_to(target)
    if source.run_dir is not None:
        run_dir = source.run_dir.resolve()
        if run_dir.is_relative_to(target):
            clash = True
        elif target.is_relative_to(run_dir):
            first = target.relative_to(run_dir).parts[0]
            clash = clash or first in ("best_model", "runs") or bool(ckpt.CHECKPOINT_RE.match(first)) or \
                first.startswith((ckpt.STAGING_PREFIX, ckpt.TRASH_PREFIX, ckpt.DELETE_PREFIX)) or (run_dir / first).is_file()
    if clash:
        raise ExportError(f"--out {out} would overwrite the run or its checkpoints; choose a directory outside "
                          f"{source.run_dir or source.origin_dir or source.adapter_dir}, or a new subdirectory of it such as exports/")
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
