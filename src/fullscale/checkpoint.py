"""Crash-safe checkpoints: stage, fsync, manifest last, rename, fsync the parent.

A directory `checkpoint-<step>` counts as a checkpoint only when its `manifest.json` exists and
every file it lists has the recorded size and SHA-256. A kill at any moment therefore leaves
either the previous set of checkpoints or the previous set plus one complete new one, never a
half-written directory that a resume would load. Rotation runs only after a commit, never
removes the best checkpoint, and never leaves fewer than one valid checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fullscale import faults
from fullscale.errors import CheckpointError, DiskSpaceError, first_line
from fullscale.fingerprint import sha256_file

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
MANIFEST_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"          # a directory moved aside by its replacement: put back if the new one never came
DELETE_PREFIX = ".deleting-"      # a directory being removed (rotation): never put back


# ----------------------------------------------------------------------------- file helpers

def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _remove_tree(path: Path) -> None:
    """Remove a directory in a way a kill cannot turn into a half-deleted checkpoint:
    rename it out of the checkpoint namespace first, then delete."""
    if not path.exists():
        return
    trash = path.with_name(f"{DELETE_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def commit_directory(staging: Path, final: Path, *, manifest: dict[str, Any] | None = None) -> None:
    """Finish a staged directory: fsync every file, write the manifest last, rename into place.

    If `final` exists it is replaced (the old one moved aside first, then deleted).
    """
    entries = {}
    mode = 0o666 & ~_umask()
    for f in _files(staging):
        os.chmod(f, mode)   # some writers (safetensors) create 0600 files: the umask decides, as for any file
        fsync_file(f)
        entries[str(f.relative_to(staging))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        faults.hit("save_file")
    faults.hit("before_manifest")
    # No timestamps: the same content gives the same manifest (exports are repeatable).
    body = {"version": MANIFEST_VERSION, **(manifest or {}), "files": entries}
    mpath = staging / MANIFEST
    with open(mpath, "w") as fh:
        json.dump(body, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(staging, 0o777 & ~_umask())
    fsync_dir(staging)
    faults.hit("before_rename")
    old = None
    if final.exists():
        # Move the old directory aside (atomic), put the new one in place, then delete the
        # old one: a kill at any point leaves one complete copy (cleanup() puts it back), and a
        # failed second rename puts it back at once.
        old = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, old)
        faults.hit("between_renames")
    try:
        faults.hit("rename_error")
        os.replace(staging, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(parent: Path, name: str) -> Path:
    path = parent / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)
# How torch.save (RuntimeError) and safetensors (SafetensorError) report the same failures.
_DISK_WORDS = ("no space", "storagefull", "quota", "file too large", "filetoolarge", "read-only", "readonly",
               "permission denied", "write failed", "unexpected pos", "code: 28", "code: 27", "code: 30", "code: 122")


def is_disk_error(exc: BaseException, *, where: Path | None = None, needed: int = 0) -> bool:
    """True when `exc` is a write that failed because of the disk (full, quota, size limit,
    read-only, permissions), whichever library raised it. torch.save and safetensors do not always
    say why a write failed, so for their errors the directory `where` is probed: too little free
    space for `needed` bytes, or a 1 MiB test write that fails, means the disk."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_ERRNOS
    if not (isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError"):
        return False
    text = str(exc).lower()
    if any(w in text for w in _DISK_WORDS):
        return True
    if where is None or not where.is_dir():
        return False
    if needed and shutil.disk_usage(where).free < needed:
        return True
    probe = where / f".fullscale-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return False


def disk_error(path: Path, exc: BaseException, *, what: str, needed: int = 0) -> DiskSpaceError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    free = shutil.disk_usage(path).free if path.exists() else None
    need = f"about {needed:,} bytes needed" if needed else "space for it needed"
    have = f", {free:,} bytes free" if free is not None else ""
    return DiskSpaceError(
        f"cannot write {what} in {path}: {reason} ({need}{have}). Every committed checkpoint is intact; fix the "
        "disk (free space, quota, ulimit -f, permissions) and run the same command again to resume")


def write_text(path: Path, text: str, *, raw: bool = False) -> None:
    """Write a file atomically (temp file + fsync + rename): a reader or a kill never sees half of
    it, and a write that fails (a full disk) leaves the old file as it was and no temp file behind.
    A disk failure is raised as DiskSpaceError with the path (`raw`: the OSError as it came)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not raw and isinstance(exc, OSError) and is_disk_error(exc):
            raise disk_error(path.parent, exc, what=path.name) from None
        raise


def write_staged(parent: Path, name: str, write: Callable[[Path], None], *, manifest: dict[str, Any],
                 needed: int = 0, what: str | None = None) -> Path:
    """`write(staging)`, then commit it as parent/name (commit_directory). A failure of the disk
    raises DiskSpaceError naming the path and the bytes needed; the staging directory is removed
    whatever happens, and an existing parent/name stays as it was."""
    final = parent / name
    staging = None
    try:
        staging = staging_dir(parent, name)
        write(staging)
        faults.hit("enospc")
        commit_directory(staging, final, manifest=manifest)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if is_disk_error(exc, where=parent, needed=needed):
            raise disk_error(parent, exc, what=what or name, needed=needed) from None
        raise
    return final


def verify_directory(path: Path, *, required: tuple[str, ...] = ()) -> str | None:
    """None when `path` matches its manifest (and the manifest lists every `required` file);
    otherwise the reason, in a few words."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (incomplete save)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        return "manifest.json is malformed (its files are not a mapping of name to size and sha256)"
    missing = [name for name in required if name not in files]
    if missing:
        return f"manifest.json does not list {', '.join(missing)}"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{rel} has {size} bytes, manifest says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{rel} content does not match its SHA-256 in manifest.json"
    return None


# The files a resume reads; a checkpoint without one of them, or one that does not load, is not usable.
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state_0.pt", STATE)


def unloadable(path: Path) -> str | None:
    """None when every file a resume reads loads (a manifest can describe garbage faithfully);
    otherwise the reason."""
    import torch
    from safetensors import safe_open

    try:
        state = json.loads((path / STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("train_state"), dict) \
                or not isinstance(state.get("config"), dict):
            return f"{STATE} does not hold a fullscale training state"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{STATE} cannot be read ({first_line(exc)})"
    try:
        json.loads((path / "adapter_config.json").read_text())
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways
        return f"the adapter does not load ({first_line(exc)})"
    for name in ("optimizer.pt", "scheduler.pt", *sorted(p.name for p in path.glob("rng_state_*.pt"))):
        try:
            torch.load(path / name, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            return f"{name} does not load ({first_line(exc)})"
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


# ----------------------------------------------------------------------------- manager

@dataclass
class CheckpointInfo:
    step: int
    path: Path
    valid: bool | None = None        # None: not verified (manifest present, hashes not checked)
    reason: str | None = None
    size: int = 0
    eval_loss: float | None = None
    state: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """The checkpoints of one run directory: list, latest, best, verify, rotate, export best."""

    def __init__(self, run_dir: str | os.PathLike, *, save_total_limit: int | None = None):
        self.run_dir = Path(run_dir)
        self.save_total_limit = save_total_limit

    # -- discovery
    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        if not self.run_dir.is_dir():
            return []
        out = []
        for p in self.run_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def list(self, *, verify: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint-<step> directory, oldest first. Without `verify`, a directory with a
        manifest is presumed valid (hashes unchecked); one without is invalid."""
        infos = []
        for step, path in self.checkpoint_dirs():
            info = CheckpointInfo(step=step, path=path, size=dir_size(path))
            if verify:
                info.reason = verify_directory(path)
                info.valid = info.reason is None
            elif not (path / MANIFEST).is_file():
                info.valid, info.reason = False, "no manifest.json (incomplete save)"
            if info.valid is not False:
                try:
                    info.state = json.loads((path / STATE).read_text())
                    if not isinstance(info.state, dict):
                        raise ValueError("not a mapping")
                    info.eval_loss = info.state.get("last_eval_loss")
                except (OSError, ValueError, UnicodeDecodeError):
                    info.valid, info.reason, info.state = False, f"{STATE} unreadable", {}
            infos.append(info)
        return infos

    def valid(self, *, verify: bool = False) -> list[CheckpointInfo]:
        return [i for i in self.list(verify=verify) if i.valid is not False]

    def latest(self, *, verify: bool = False) -> CheckpointInfo | None:
        v = self.valid(verify=verify)
        return v[-1] if v else None

    def best_step(self) -> int | None:
        """The best eval step recorded by the newest valid checkpoint."""
        latest = self.latest()
        if latest is None:
            return None
        return (latest.state.get("early_stopping") or {}).get("best_step")

    def best(self) -> CheckpointInfo | None:
        step = self.best_step()
        for info in self.valid():
            if info.step == step:
                return info
        return None

    def disk_usage(self) -> int:
        return dir_size(self.run_dir) if self.run_dir.is_dir() else 0

    # -- start-up cleanup and fallback
    def cleanup(self) -> list[str]:
        """Remove leftovers of interrupted saves and deletions (staging and deletion directories);
        put back a checkpoint-N/ or best_model/ that a kill left moved aside by its replacement
        (between the two renames of commit_directory) when the new one never came."""
        notes = []
        if not self.run_dir.is_dir():
            return notes
        aside: dict[str, list[Path]] = {}
        for p in self.run_dir.glob(f"{TRASH_PREFIX}*"):
            name = p.name[len(TRASH_PREFIX):].rsplit("-", 2)[0]
            if name == "best_model" or CHECKPOINT_RE.match(name):
                aside.setdefault(name, []).append(p)
        for name, paths in sorted(aside.items()):
            newest = max(paths, key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit()
                         else 0)
            if not (self.run_dir / name).exists() and verify_directory(newest) is None:
                os.replace(newest, self.run_dir / name)
                fsync_dir(self.run_dir)
                notes.append(f"restored {name}/ left aside by an interrupted replacement")
        for p in self.run_dir.iterdir():
            if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX, DELETE_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                notes.append(f"removed {p.name} left by an interrupted save")
        return notes

    def set_aside(self, info: CheckpointInfo) -> Path:
        """Rename an invalid checkpoint out of the way (never delete it)."""
        target = info.path.with_name(f"{info.path.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(info.path, target)
        fsync_dir(self.run_dir)
        return target

    def newest_verified(self, *, say: Callable[[str], None] = print) -> CheckpointInfo | None:
        """The newest checkpoint that verifies; each newer one that fails is set aside with a message."""
        for info in reversed(self.list()):
            reason = info.reason if info.valid is False else (
                verify_directory(info.path, required=CHECKPOINT_FILES) or unloadable(info.path))
            if reason is None:
                info.valid = True
                return info
            moved = self.set_aside(info)
            say(f"checkpoint-{info.step} is not usable ({reason}); set aside as {moved.name}, trying the previous one")
        return None

    # -- saving
    def check_free_space(self, *, estimate: int = 0) -> None:
        """Refuse to start a save that cannot fit: the next checkpoint is about as large as the last
        (or `estimate` bytes for the first one)."""
        last = self.latest()
        size = last.size if last is not None else estimate
        if not size:
            return
        needed = int(size * 1.1) + (1 << 20)
        free = shutil.disk_usage(self.run_dir).free
        if free < needed:
            what = (f"the last checkpoint took {last.size:,}" if last else
                    f"a first checkpoint of about {size:,}: the adapter and its two AdamW moments")
            raise DiskSpaceError(
                f"not enough disk space to save a checkpoint in {self.run_dir}: {free:,} bytes free, about "
                f"{needed:,} needed ({what}, plus 10% and 1 MiB of headroom). Every committed checkpoint is intact; "
                "free space (or lower save_total_limit) and run the same command again to resume")

    def save(self, step: int, write: Callable[[Path], None], *, manifest: dict[str, Any], estimate: int = 0) -> Path:
        """Write checkpoint-<step> crash-safely; `write(dir)` puts the files into the staging dir.

        A full or read-only disk (or a file-size limit) stops with DiskSpaceError; the staging
        directory is removed and every committed checkpoint stays as it was.
        """
        self.check_free_space(estimate=estimate)
        last = self.latest()
        need = last.size if last is not None else estimate
        return write_staged(self.run_dir, f"checkpoint-{step}", write, manifest={"step": step, **manifest},
                            needed=need, what=f"checkpoint-{step}")

    def rotate(self, *, best_step: int | None) -> list[int]:
        """Delete the oldest checkpoints beyond save_total_limit, keeping the best; returns removed steps."""
        if not self.save_total_limit:
            return []
        valid = self.valid()
        keep = {i.step for i in valid[-self.save_total_limit:]}
        if best_step is not None:
            keep.add(best_step)
        removed = []
        for info in valid:
            if info.step not in keep and len(valid) - len(removed) > 1:
                faults.hit("rotation")
                _remove_tree(info.path)
                removed.append(info.step)
        return removed


def load_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {Path(path) / STATE}: {exc}") from None
