"""Fingerprints: what makes a model, tokenizer or data set the same one. A leaf module (standard
library only; transformers and friends only inside versions()), shared by resume, export and the
tokenization cache.

- Files are hashed by every byte (SHA-256), cached by device, inode, size and mtime under the
  fullscale cache, so a 16 GB base is read once.
- A model is its config.json and weight files; a tokenizer directory its tokenizer files; a data
  set its contents (not its name or place); a tokenizer object its full definition.
- Version 1 fingerprints (runs made before FINGERPRINT_VERSION 2) are still recognised.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()



WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json")


FINGERPRINT_VERSION = 2   # 2: every byte of the weights, data by contents only (1: head and tail, names)


def legacy_hash_files(files: list[Path], root: Path) -> str:
    """Version 1 (runs made before FINGERPRINT_VERSION 2): names, sizes, and for files over
    4 MiB the first and last MiB. Kept to recognise those runs' fingerprints on resume and export."""
    h = hashlib.sha256()
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= 4 << 20:
                while block := fh.read(1 << 20):
                    h.update(block)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def cache_root() -> Path | None:
    """fullscale's cache: $FULLSCALE_CACHE, else $XDG_CACHE_HOME/fullscale (~/.cache/fullscale); None
    when FULLSCALE_CACHE is off (or 0, false, none, no). Tokenized data and file hashes live there."""
    root = os.environ.get("FULLSCALE_CACHE", "").strip()
    if root.lower() in ("off", "0", "false", "none", "no"):
        return None
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fullscale"


def _hash_cache_dir() -> Path | None:
    root = cache_root()
    return root / "hashes" if root is not None else None


def file_sha256(path: Path) -> str:
    """SHA-256 of every byte of `path`, cached by device, inode, size and mtime: a 16 GB model is read
    once, and a file edited in place (new mtime or size) is read again."""
    st = path.stat()
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    cache = _hash_cache_dir()
    entry = cache / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json") if cache else None
    if entry is not None:
        try:
            cached = json.loads(entry.read_text())
            if cached.get("key") == key:
                return cached["sha256"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    digest = sha256_file(path)
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "sha256": digest, "path": str(path.resolve())}))
            os.replace(tmp, entry)
        except OSError:
            pass   # an unwritable cache only costs the next read
    return digest


def hash_files(files: list[Path], root: Path | None) -> str:
    """Names relative to `root` (None: contents only) and every byte of each file."""
    h = hashlib.sha256()
    for f in sorted(files):
        name = str(f.relative_to(root)) if root is not None else ""
        h.update(f"{name}:{f.stat().st_size}:{file_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def model_files(p: Path) -> list[Path]:
    return [f for f in p.iterdir() if f.is_file() and (f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES)]


def model_fingerprint(path: str) -> str:
    """Base model identity: config.json and every byte of the weight files."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    return hash_files(model_files(p), p)


def model_matches(path: str, recorded: str) -> tuple[bool, str]:
    """(whether the base at `path` is the one fingerprinted as `recorded`, its fingerprint now);
    fingerprints of runs made before version 2 are recognised."""
    found = model_fingerprint(path)
    if found == recorded or found.startswith("hub:"):
        return found == recorded, found
    p = Path(path)
    return legacy_hash_files(model_files(p), p) == recorded, found


def tokenizer_files_fingerprint(path: str) -> str:
    """The tokenizer files of a model directory (hub: the id)."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    return legacy_hash_files([p / n for n in TOKENIZER_FILES if (p / n).is_file()], p)


def data_files(path: str) -> tuple[list[Path], Path]:
    p = Path(path)
    return ([f for f in p.rglob("*") if f.is_file()], p) if p.is_dir() else ([p], p.parent)


def data_fingerprint(path: str | list | None) -> str | None:
    """Dataset contents (every byte; not the file's name or place): a changed row makes a different
    run, the same rows under another name do not. A mix of sources: each source's contents with its
    weight and own settings, in order."""
    if not path:
        return None
    if isinstance(path, list):
        parts = [{**{k: v for k, v in source.items() if k != "path"}, "data": data_fingerprint(source["path"])}
                 for source in path]
        return "mix:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    if not Path(path).exists():
        return f"hub:{path}"   # a hub dataset: the token store's key holds datasets' fingerprint of it
    files, root = data_files(path)
    return hash_files(files, root if Path(path).is_dir() else None)


def legacy_data_fingerprint(path: str | list | None) -> str | None:
    if not path or isinstance(path, list):   # mixes came after version 1
        return data_fingerprint(path)
    if not Path(path).exists():
        return f"hub:{path}"
    files, root = data_files(path)
    return legacy_hash_files(files, root)


def digest_path(path, h) -> None:
    """Every byte of a data file, or of every file of a save_to_disk directory (with their names)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f"{f.relative_to(p) if p.is_dir() else ''}:{f.stat().st_size}:{file_sha256(f)}\n".encode())


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the tokens: the fast tokenizer's full definition (vocabulary, merges,
    normalizer, pre- and post-processing) or a slow one's vocabulary and files, its special
    tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        for name in getattr(tokenizer, "vocab_files_names", {}):
            file = getattr(tokenizer, name, None)
            if isinstance(file, str) and os.path.isfile(file):
                digest_path(file, h)
    settings = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "ids": [getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad", "unk")],
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "added_tokens": sorted((k, v) for k, v in tokenizer.get_added_vocab().items()),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def versions(*, short_torch: bool = False) -> dict[str, str]:
    """The versions that made a checkpoint or an export (torch without its +cuda/+cpu build tag
    when `short_torch`)."""
    import accelerate
    import peft
    import torch
    import transformers

    from fullscale.version import __version__

    return {"fullscale": __version__, "torch": torch.__version__.split("+")[0] if short_torch
            else torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}
