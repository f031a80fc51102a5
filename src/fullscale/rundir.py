"""The run directory belongs to the user: fullscale writes only into directories it created (or a
run it recognises), one run at a time, and never deletes or replaces a previous run's results.

- **Ownership.** `.fullscale-run` (a small JSON marker) is written when fullscale first takes a
  directory. A directory without it that holds a file or folder of a name fullscale writes
  (config.yaml, metrics.jsonl, best_model/, checkpoint-N/ ...) is somebody else's: refused.
  Run directories made before the marker existed are recognised by their manifests.
- **One run at a time.** `.fullscale-lock` is locked with flock(2) by the main process for the
  whole run; a second `fullscale train` on the same directory is refused with the holder's pid and
  host. The kernel drops a flock when its holder dies, so a kill never blocks the resume. Where
  the file system does not support flock (some network file systems), the lock falls back to the
  file's contents: pid, host and a heartbeat rewritten at each log; a holder whose pid is gone
  (same host) or whose heartbeat is older than STALE_SECONDS (another host) no longer counts.
- **Results are kept.** A directory whose results (best_model/, training_result.json, checkpoint
  records) have no checkpoint left to resume from is refused; `resume: restart` moves the old run
  into `previous-<time>/` inside it and starts from step 0.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from fullscale.errors import ConfigError, DiskSpaceError, UserError

MARKER = ".fullscale-run"
LOCK = ".fullscale-lock"
STALE_SECONDS = 600.0
HEARTBEAT_SECONDS = 60.0   # how often a fallback lock's holder rewrites its heartbeat
CLAIM_SECONDS = 30.0       # a claim file older than this was left by a process that died while claiming
_WRITES = threading.RLock()
# Every name fullscale writes at the top of a run directory.
OWN_FILES = ("config.yaml", "metrics.jsonl", "metrics.jsonl.tmp", "status.json", "training_result.json",
             "report.html", "prompt_format.json", "trackers.json")
OWN_DIRS = ("runs", "best_model", "wandb")
_OWN_RE = re.compile(r"^(checkpoint-\d+(\.invalid-.*)?|\.staging-.*|\.trash-.*|status\.json\.tmp\d+|"
                     r"report\.html\.tmp\d+)$")
PREVIOUS_PREFIX = "previous-"


class RunLockedError(UserError):
    """Another process is running in this run directory (exit 2)."""


def is_own_name(name: str) -> bool:
    return name in OWN_FILES or name in OWN_DIRS or bool(_OWN_RE.match(name))


def pid_alive(pid: Any, *, since: float | None = None) -> bool:
    """True when a process with this pid exists on this host (and, given `since`, started before it:
    a reused pid is not the holder)."""
    from fullscale.status import process_alive

    return process_alive(pid, updated=since)


def _is_legacy_run(path: Path) -> bool:
    """A run directory written before the marker existed: a manifest fullscale wrote."""
    candidates = [p / "manifest.json" for p in path.glob("checkpoint-*")] + [path / "best_model" / "manifest.json"]
    for manifest in candidates:
        try:
            body = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(body, dict) and isinstance(body.get("files"), dict) and (
                "config_fingerprint" in body or "provenance" in body):
            return True
    return False


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() or (path.is_dir() and _is_legacy_run(path))


def inside_run(path: str | os.PathLike) -> Path | None:
    """The run directory that `path` is or lies inside, or None."""
    path = Path(path).resolve()
    for p in (path, *path.parents):
        if is_run_dir(p):
            return p
    return None


def unwritable(path: Path, exc: OSError, what: str) -> DiskSpaceError:
    return DiskSpaceError(
        f"cannot write {what} in {path}: {exc.strerror or exc}. Make output_dir writable (permissions, a "
        "read-only or full file system), or choose another output_dir")


def claim(run_dir: Path) -> None:
    """Make `run_dir` a fullscale run directory, or refuse one that holds files fullscale did not write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is an existing file, not a directory; choose another output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(run_dir, exc, "the run directory") from None
    if is_run_dir(run_dir):
        if not (run_dir / MARKER).is_file():
            _write_marker(run_dir)
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if is_own_name(p.name))
    if foreign:
        raise ConfigError(
            f"output_dir {run_dir} holds {', '.join(foreign)}, which fullscale did not write (no {MARKER} marker). "
            "fullscale never writes over files it did not create: choose another output_dir (a new directory, or "
            "one without these names)")
    _write_marker(run_dir)


def _write_marker(run_dir: Path) -> None:
    from fullscale.version import __version__

    body = {"created": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "fullscale": __version__}
    try:
        from fullscale.checkpoint import write_text

        write_text(run_dir / MARKER, json.dumps(body) + "\n", raw=True)
    except OSError as exc:
        raise unwritable(run_dir, exc, "the run marker") from None


# ----------------------------------------------------------------------------- the lock

class RunLock:
    """An exclusive lock on a run directory for the lifetime of one training process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.mode = "flock"

    def acquire(self) -> RunLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise unwritable(self.path.parent, exc, "the run lock") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            raise self._refusal(holder) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self.mode = "heartbeat"   # no flock on this file system: the contents are the lock
            self._take_over()
            return self
        self._write_holder()
        return self

    def _take_over(self) -> None:
        """The fallback lock, taken without a window: the reading of the holder and the writing of
        ours happen under a claim file created with O_EXCL (atomic on local and NFS file systems),
        and what was written is read back, so of two processes that race, one holds it and the other
        is refused. A heartbeat thread keeps it fresh for as long as it is held (start-up included:
        a long tokenization never makes a live run look stale to another host)."""
        claim = self.path.with_name(self.path.name + ".claim")
        try:
            cfd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                fresh = time.time() - claim.stat().st_mtime < CLAIM_SECONDS
            except OSError:
                fresh = False
            if fresh:
                os.close(self.fd)
                self.fd = None
                raise self._refusal(self._read_holder_file()) from None
            claim.unlink(missing_ok=True)   # left by a process that died while claiming
            cfd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        try:
            holder = self._holder()
            if holder and _holder_alive(holder):
                os.close(self.fd)
                self.fd = None
                raise self._refusal(holder) from None
            self.token = f"{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}"
            self._write_holder()
            if (self._holder() or {}).get("token") != self.token:   # another writer came in between
                holder = self._holder()
                os.close(self.fd)
                self.fd = None
                raise self._refusal(holder) from None
        finally:
            os.close(cfd)
            claim.unlink(missing_ok=True)
        self._beating = threading.Event()
        thread = threading.Thread(target=self._beat, name="fullscale-lock-heartbeat", daemon=True)
        thread.start()

    def _beat(self) -> None:
        while not self._beating.wait(HEARTBEAT_SECONDS):
            with _WRITES:
                if self.fd is None:
                    return
                try:
                    body = self._body()
                    os.ftruncate(self.fd, 0)
                    os.pwrite(self.fd, body + b"\n", 0)
                    os.fsync(self.fd)
                except OSError:
                    pass   # retried at the next beat; the run's own writes report a failing disk

    def _read_holder_file(self) -> dict[str, Any] | None:
        try:
            body = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def heartbeat(self) -> None:
        """Rewrite the holder's heartbeat (what the fallback lock lives on)."""
        if self.fd is not None and self.mode == "heartbeat":
            self._write_holder()

    def release(self) -> None:
        if getattr(self, "_beating", None) is not None:
            self._beating.set()
        with _WRITES:
            self._release()

    def _release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.mode == "heartbeat":
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def _write_holder(self) -> None:
        with _WRITES:   # the heartbeat thread and the run's own heartbeat() never interleave a write
            self._write_holder_now()

    def _body(self) -> bytes:
        self.since = getattr(self, "since", None) or time.time()
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": self.since,
                           "heartbeat": time.time(), "mode": self.mode,
                           "token": getattr(self, "token", None)}).encode()

    def _write_holder_now(self) -> None:
        body = self._body()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, body + b"\n", 0)
            os.fsync(self.fd)
        except OSError as exc:
            self.release()
            raise unwritable(self.path.parent, exc, "the run lock") from None

    def _holder(self) -> dict[str, Any] | None:
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace")
            body = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def _refusal(self, holder: dict[str, Any] | None) -> RunLockedError:
        who = "another process"
        if holder:
            since = holder.get("since")
            when = f", running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
            who = f"process {holder.get('pid')} on host {holder.get('host')}{when}"
        return RunLockedError(
            f"{self.path.parent} is in use by {who}: one run per directory at a time. Wait for it to finish (or "
            f"stop it), watch it with `fullscale status {self.path.parent}`, or use another output_dir")


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname():
        return pid_alive(holder.get("pid"), since=holder.get("since"))
    beat = holder.get("heartbeat")
    return isinstance(beat, (int, float)) and time.time() - beat < STALE_SECONDS


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the run lock now (None when nobody does); for read-only commands."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            locked = True
        except OSError:
            locked = False   # no flock here: the contents tell
        try:
            body = json.loads(os.pread(fd, 4096, 0).decode(errors="replace"))
        except (OSError, ValueError):
            body = {}
        body = body if isinstance(body, dict) else {}
        return body if locked or (body and _holder_alive(body)) else None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- previous results

def previous_results(run_dir: Path) -> list[str]:
    """What a previous run left that a fresh start would replace: best_model/, training_result.json,
    and records of a run that saved checkpoints or finished."""
    found = []
    if (run_dir / "best_model").exists():
        found.append("best_model/")
    if (run_dir / "training_result.json").exists():
        found.append("training_result.json")
    if _records_results(run_dir / "metrics.jsonl"):
        found.append("metrics.jsonl")
    found += sorted(p.name + "/" for p in run_dir.glob("checkpoint-*.invalid-*"))
    return found


def _records_results(metrics: Path) -> bool:
    """Whether metrics.jsonl records a committed checkpoint or the end of a run. Read as bytes in
    blocks (a long run's file has millions of lines); Monitor writes `{"event": "<kind>", ...`."""
    needles = (b'{"event": "checkpoint"', b'{"event": "train_end"')
    try:
        with open(metrics, "rb") as fh:
            tail = b""
            while block := fh.read(1 << 22):
                chunk = tail + block
                if any(n in chunk for n in needles):
                    return True
                tail = chunk[-32:]
    except OSError:
        return False
    return False


def interrupted_start(run_dir: Path, same_run: Callable[[dict[str, Any]], bool]) -> bool:
    """True when the directory holds only the beginning of the same run (killed before its first
    checkpoint; `same_run(saved config)` says whether the settings match): starting it again from
    step 0 redoes exactly that and loses nothing."""
    import yaml

    if (run_dir / "training_result.json").exists() or list(run_dir.glob("checkpoint-*")):
        return False
    if "metrics.jsonl" in previous_results(run_dir):
        return False
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except FileNotFoundError:
        return True
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and same_run(saved)


def move_aside(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """Move the previous run's files into run_dir/previous-<time>/ (nothing is deleted)."""
    entries = [p for p in run_dir.iterdir() if is_own_name(p.name)]
    if not entries:
        return None
    target = run_dir / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    target.mkdir()
    for p in entries:
        if p.name.startswith((".staging-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)
            continue
        os.replace(p, target / p.name)
    say(f"resume: restart: the previous run moved to {target} ({', '.join(sorted(p.name for p in target.iterdir()))}); "
        "starting from step 0")
    return target
