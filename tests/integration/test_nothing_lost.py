"""Nothing lost, nothing run by mistake: the run directory is the user's, one run at a time,
results never replaced, exports and reports stay inside what they own, faults end in a clear
message and an exit code with nothing damaged. Real processes, real signals, real files (a real
full disk on a small tmpfs where this machine allows mounting one)."""

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import read_metrics, write_reverse_task
from conftest import run_cli as cli

ROOT = Path(__file__).parents[2]
EXIT_PREEMPTED = 75

SETTINGS = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=3,
                save_steps=3, save_total_limit=3, logging_steps=1, learning_rate=3e-3, lora_dropout=0.0,
                report_to="none", eval_split=0.1, gradient_checkpointing=False, max_seq_length=128)


def write_config(tmp_path, name, model_dir, data, **over):
    values = dict(SETTINGS, model_name_or_path=str(model_dir), train_file=str(data),
                  output_dir=str(tmp_path / name))
    values.update(over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` and its SHA-256 (what must stay untouched), but fullscale's own lock
    and marker (a refused run may take and release the lock)."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".fullscale-")}


def no_debris(path: Path) -> list[str]:
    return [p.name for p in Path(path).rglob("*") if p.name.startswith((".staging-", ".trash-")) or ".tmp" in p.name]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, reverse_data):
    """A finished run (checkpoints 3 and 6, best_model/, result), copied by the tests that alter it."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp, "run", tiny_model_dir, reverse_data)
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def copy_run(finished, tmp_path, tiny_model_dir, reverse_data, name="run", **over):
    shutil.copytree(finished, tmp_path / name)
    return write_config(tmp_path, name, tiny_model_dir, reverse_data, **over), tmp_path / name


# ----------------------------------------------------------------------------- 1. results are kept

def test_a_fresh_start_refuses_to_replace_a_previous_runs_results_and_restart_moves_them_aside(
        tmp_path, finished, tiny_model_dir, reverse_data):
    cfg, run = copy_run(finished, tmp_path, tiny_model_dir, reverse_data)
    for ckpt in run.glob("checkpoint-*"):
        shutil.rmtree(ckpt)   # deleted to save space
    before = tree_digest(run)
    for extra in ([], ["resume=never"]):
        proc = cli("train", cfg, *extra)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "best_model/" in proc.stderr and "training_result.json" in proc.stderr
        assert tree_digest(run) == before, "a refused start changed the run directory"
    assert "resume: restart" in proc.stderr or "resume=restart" in proc.stderr

    proc = cli("train", cfg, "resume=restart")
    assert proc.returncode == 0, proc.stderr
    previous = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    moved = tree_digest(previous[0])
    assert moved == before
    assert json.loads((run / "training_result.json").read_text())["total_steps"] == 6


def test_every_checkpoint_failing_verification_is_refused_rather_than_restarted(
        tmp_path, finished, tiny_model_dir, reverse_data):
    cfg, run = copy_run(finished, tmp_path, tiny_model_dir, reverse_data)
    for ckpt in run.glob("checkpoint-*"):
        (ckpt / "adapter_model.safetensors").write_bytes(b"garbage")
    best = tree_digest(run / "best_model")
    proc = cli("train", cfg)
    assert proc.returncode == 2, proc.stderr
    assert "no checkpoint verifies" in proc.stderr and "Traceback" not in proc.stderr
    assert len(list(run.glob("checkpoint-*.invalid-*"))) == 2   # set aside, never deleted
    assert tree_digest(run / "best_model") == best
    assert json.loads((run / "training_result.json").read_text())["total_steps"] == 6


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_a_word(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "early", tiny_model_dir, reverse_data, save_steps=100)
    assert cli("train", cfg, fault="step@2").returncode == -signal.SIGKILL
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- 2. other people's files

def test_files_fullscale_did_not_write_are_never_overwritten(tmp_path, tiny_model_dir, reverse_data):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own settings\n")
    (mine / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    before = tree_digest(mine)
    cfg = write_config(tmp_path, "mine", tiny_model_dir, reverse_data)
    proc = cli("train", cfg)
    assert proc.returncode == 2, proc.stderr
    assert "config.yaml" in proc.stderr and "did not write" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_digest(mine) == before
    proc = cli("resume", mine)
    assert proc.returncode == 2 and tree_digest(mine) == before

    # A directory with unrelated files of the user's is fine: they are left alone.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    proc = cli("train", write_config(tmp_path, "notes", tiny_model_dir, reverse_data, max_steps=3))
    assert proc.returncode == 0, proc.stderr
    assert (notes / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- 3. one run at a time

@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_is_refused_and_a_dead_holder_does_not_block_the_resume(
        tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "busy", tiny_model_dir, reverse_data, max_steps=100000, save_steps=50,
                       eval_steps=100000, logging_steps=5)
    run = tmp_path / "busy"
    first = cli("train", cfg, wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            status = run / "status.json"
            if status.is_file() and json.loads(status.read_text()).get("phase") == "running":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the first run did not start")
        second = cli("train", cfg)
        assert second.returncode == 2, second.stderr
        assert f"process {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        # Read-only commands keep working during the run.
        assert cli("status", run).returncode == 0
        assert cli("report", run, "--out", tmp_path / "live.html").returncode == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead holder's lock: the same command resumes (stopped again once it does).
    proc = cli("train", cfg, wait=False)
    for line in proc.stdout:
        if "resuming from checkpoint-" in line:
            proc.send_signal(signal.SIGTERM)
            break
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, proc.stderr.read()


def test_the_fallback_lock_without_flock_refuses_a_live_holder_and_takes_over_from_a_dead_one(tmp_path, monkeypatch):
    import errno
    import fcntl

    from fullscale import rundir

    real_flock = fcntl.flock

    def no_flock(fd, op):
        if op & (fcntl.LOCK_EX | fcntl.LOCK_SH):
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    lock = rundir.RunLock(run).acquire()
    assert lock.mode == "heartbeat"
    with pytest.raises(rundir.RunLockedError, match=f"process {os.getpid()}"):
        rundir.RunLock(run).acquire()
    assert rundir.holder(run)["pid"] == os.getpid()
    lock.release()
    assert rundir.holder(run) is None
    # A holder that died without releasing (same host, pid gone) does not count.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / rundir.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                               "heartbeat": time.time()}))
    rundir.RunLock(run).acquire().release()


# ----------------------------------------------------------------------------- 4/5. exports and reports

def test_export_force_replaces_only_a_previous_export(tmp_path, finished, tiny_model_dir, reverse_data):
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    (tmp_path / "models" / "notes.txt").write_text("my notes")
    cfg, run = copy_run(finished, tmp_path, base, reverse_data)
    text = (run / "config.yaml").read_text().replace(str(tiny_model_dir), str(base))
    (run / "config.yaml").write_text(text)
    models = tree_digest(tmp_path / "models")
    for out in (base, base.parent):
        proc = cli("export", run, "--merge", "--force", "--base", base, "--out", out)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
    assert tree_digest(tmp_path / "models") == models, "the base model or the user's notes changed"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = cli("export", run, "--force", "--base", base, "--out", other)
    assert proc.returncode == 2 and "replaces only a previous fullscale export" in proc.stderr
    assert (other / "notes.txt").read_text() == "mine"
    proc = cli("export", run, "--force", "--base", base, "--out", finished)
    assert proc.returncode == 2 and tree_digest(finished)

    out = tmp_path / "exports" / "adapter"
    assert cli("export", run, "--base", base, "--out", out).returncode == 0
    (out / "my-notes.txt").write_text("added by hand")
    proc = cli("export", run, "--force", "--base", base, "--out", out)
    assert proc.returncode == 2 and "holds files the export did not write (my-notes.txt)" in proc.stderr
    (out / "my-notes.txt").unlink()
    proc = cli("export", run, "--force", "--base", base, "--checkpoint", "latest", "--out", out)
    assert proc.returncode == 0, proc.stderr


def test_report_out_never_writes_over_a_users_file_or_a_runs_records(tmp_path, finished, tiny_model_dir,
                                                                      reverse_data):
    _, run = copy_run(finished, tmp_path, tiny_model_dir, reverse_data)
    mine = tmp_path / "mine.html"
    mine.write_text("<p>my page</p>")
    state = run / "checkpoint-3" / "trainer_state.json"
    before = state.read_bytes()
    for out in (mine, state, tmp_path):
        proc = cli("report", run, "--out", out)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
    assert mine.read_text() == "<p>my page</p>" and state.read_bytes() == before
    assert cli("checkpoints", run, "--verify").returncode == 0
    report = tmp_path / "report.html"
    assert cli("report", run, "--out", report).returncode == 0
    assert cli("report", run, "--out", report).returncode == 0   # a previous report is replaced


@pytest.mark.slow
def test_a_killed_export_leaves_no_debris_and_never_loses_the_old_export(tmp_path, finished, tiny_model_dir,
                                                                          reverse_data):
    _, run = copy_run(finished, tmp_path, tiny_model_dir, reverse_data)
    out = tmp_path / "exports" / "merged"
    assert cli("export", run, "--merge", "--out", out).returncode == 0
    old = tree_digest(out)
    # Killed while writing the new export, then between moving the old one aside and renaming the new in.
    for fault in ("save_file@0", "before_manifest@0", "between_renames@0"):
        proc = cli("export", run, "--merge", "--force", "--checkpoint", "3", "--out", out, fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr)
    assert not out.exists()   # the kill came between the two renames
    proc = cli("export", run, "--merge", "--force", "--checkpoint", "3", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "restored" in proc.stdout
    assert no_debris(out.parent) == []
    assert tree_digest(out) != old and (out / "manifest.json").is_file()


@pytest.mark.slow
def test_export_and_generate_find_a_best_model_a_kill_left_aside(tmp_path, tiny_model_dir, reverse_data):
    # best_model/ is replaced at the step-3 evaluation; the kill comes between the two renames.
    cfg = write_config(tmp_path, "aside", tiny_model_dir, reverse_data)
    proc = cli("train", cfg, fault="between_renames@3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "aside"
    assert not (run / "best_model").exists()
    assert cli("export", run, "--out", tmp_path / "exported").returncode == 0
    proc = cli("generate", run, "--prompt", "rev abc:", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert cli("train", cfg).returncode == 0   # the next start puts it back, and the run goes on
    assert (run / "best_model" / "manifest.json").is_file()


# ----------------------------------------------------------------------------- 6/7. security, modes

def test_trust_remote_code_is_never_read_from_an_export_or_a_run(tmp_path, tiny_model_dir, reverse_data):
    # A base with custom modelling code that leaves a trace when it runs; the run trusted it.
    base = tmp_path / "custom-base"
    shutil.copytree(tiny_model_dir, base)
    sentinel = tmp_path / "remote-code-ran"
    (base / "custom_model.py").write_text(
        f"open({str(sentinel)!r}, 'a').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"}
    (base / "config.json").write_text(json.dumps(config))
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    cfg = write_config(tmp_path, "trusted", base, reverse_data, max_steps=3, trust_remote_code=True)
    assert cli("train", cfg, env_extra=env).returncode == 0
    assert sentinel.exists()   # the user asked for it in this run's config
    out = tmp_path / "adapter"
    assert cli("export", tmp_path / "trusted", "--out", out, env_extra=env).returncode == 0
    sentinel.unlink(missing_ok=True)
    for target in (out, tmp_path / "trusted"):   # an export whose provenance, a run whose config say true
        proc = cli("generate", target, "--prompt", "rev abc:", "--max-new-tokens", "2", env_extra=env)
        assert not sentinel.exists(), f"remote code ran for generate {target} without the user asking"
        assert "Traceback" not in proc.stderr
    proc = cli("generate", out, "--prompt", "rev abc:", "--max-new-tokens", "2", "--trust-remote-code", env_extra=env)
    assert proc.returncode == 0 and sentinel.exists()   # asked for on the command line


def test_weights_are_written_with_the_umask_mode(tmp_path, finished, tiny_model_dir, reverse_data):
    _, run = copy_run(finished, tmp_path, tiny_model_dir, reverse_data)
    proc = subprocess.run(["bash", "-c", f"umask 022; {sys.executable} -m fullscale export {run} --out {tmp_path / 'e'}"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, proc.stderr
    for path in (finished / "checkpoint-6" / "adapter_model.safetensors",
                 finished / "best_model" / "adapter_model.safetensors", tmp_path / "e" / "adapter_model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, f"{path}: {oct(path.stat().st_mode)}"


# ----------------------------------------------------------------------------- 8. disks that fail

def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    opts = ",".join((f"size={size}", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(name: str, size: str, *options: str) -> Path:
        path = tmp_path / name
        if not _mount_tmpfs(path, size, *options):
            pytest.skip("mounting a tmpfs needs root (a real full or read-only disk)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_disk_stops_with_the_path_and_bytes_needed_and_leaves_no_debris(
        tmp_path, small_disk, tiny_model_dir, reverse_data):
    disk = small_disk("full", "48k")
    cfg = write_config(tmp_path, "full", tiny_model_dir, reverse_data, output_dir=str(disk / "run"))
    proc = cli("train", cfg)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot write" in proc.stderr and str(disk / "run") in proc.stderr and "bytes" in proc.stderr
    assert no_debris(disk) == []


def test_after_a_full_disk_a_lower_save_total_limit_frees_the_space_at_the_resume(
        tmp_path, small_disk, tiny_model_dir, reverse_data):
    # What the disk-full message advises: lower save_total_limit and run again. The extra
    # checkpoints go at the resume (newest and best kept), not after a save that has no room.
    disk = small_disk("full", "2560k")
    cfg = write_config(tmp_path, "limit", tiny_model_dir, reverse_data, output_dir=str(disk / "run"), max_steps=12,
                       save_steps=1, save_total_limit=100)
    proc = cli("train", cfg)
    assert proc.returncode == 1 and "lower save_total_limit" in proc.stderr, proc.stderr[-2000:]
    saved = sorted(int(p.name.split("-")[1]) for p in (disk / "run").glob("checkpoint-*"))
    assert len(saved) >= 3
    proc = cli("train", cfg, "save_total_limit=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from checkpoint-{saved[-1]}" in proc.stdout
    assert "save_total_limit=2: removed checkpoint-" in proc.stdout
    assert json.loads((disk / "run" / "training_result.json").read_text())["total_steps"] == 12
    assert no_debris(disk) == []


def _fill(disk: Path) -> None:
    """Take every byte left on the tmpfs (another writer on the same disk)."""
    with open(disk / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


def test_the_advice_after_a_full_disk_works_with_no_byte_free(tmp_path, small_disk, tiny_model_dir, reverse_data):
    """With less free space than metrics.jsonl (none at all here), the resume frees the space of the
    extra checkpoints before it writes anything: config.yaml is replaced atomically (never
    truncated), metrics.jsonl is cut in place, no temporary file is left."""
    disk = small_disk("nofree", "3584k")
    cfg = write_config(tmp_path, "limit", tiny_model_dir, reverse_data, output_dir=str(disk / "run"), max_steps=16,
                       save_steps=1, save_total_limit=100)
    proc = cli("train", cfg)
    assert proc.returncode == 1 and "lower save_total_limit" in proc.stderr, proc.stderr[-2000:]
    _fill(disk)
    os.truncate(disk / "filler", (disk / "filler").stat().st_size - 4096)   # 4 KB free: less than metrics.jsonl
    assert shutil.disk_usage(disk).free < (disk / "run" / "metrics.jsonl").stat().st_size
    config_before = (disk / "run" / "config.yaml").read_text()
    from fullscale.checkpoint import write_text
    from fullscale.errors import DiskSpaceError

    with pytest.raises(DiskSpaceError, match="config.yaml"):   # the writer every record file goes through
        write_text(disk / "run" / "config.yaml", "x" * 65536)
    assert (disk / "run" / "config.yaml").read_text() == config_before and no_debris(disk) == []
    # A resume that is refused (a changed setting) frees nothing and leaves config.yaml as it was.
    proc = cli("train", cfg, "save_total_limit=2", "learning_rate=1e-3")
    assert proc.returncode == 2 and "learning_rate" in proc.stderr, proc.stderr[-2000:]
    assert (disk / "run" / "config.yaml").read_text() == config_before
    assert len(list((disk / "run").glob("checkpoint-*"))) >= 3
    proc = cli("train", cfg, "save_total_limit=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "save_total_limit=2: removed checkpoint-" in proc.stdout
    assert json.loads((disk / "run" / "training_result.json").read_text())["total_steps"] == 16
    assert "save_total_limit: 2" in (disk / "run" / "config.yaml").read_text()
    assert no_debris(disk) == []


def test_metrics_are_cut_in_place_when_the_redone_records_are_the_tail(tmp_path):
    from fullscale.resumption import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "train", "step": s} for s in (1, 2, 3, 4)] + [{"event": "train_end", "step": 4}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"event": "train", "st')
    inode = path.stat().st_ino
    assert truncate_metrics(tmp_path, 2) == 4
    assert path.stat().st_ino == inode   # cut in place, not rewritten
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    # A dropped record in the middle (the eval at the resume step) needs the rewrite.
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"event": "eval", "step": 2}, {"event": "x", "step": 2},
                                                           {"event": "train", "step": 3}]))
    truncate_metrics(tmp_path, 2, eval_redone=True)
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["x"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_cache_disk_that_fills_up_while_tokenizing_never_stops_preparation(tmp_path, small_disk, monkeypatch):
    """The tokens spill to temporary files beside the token store; when that disk fills midway they
    move to the system's temporary directory and the data comes out the same (uncached)."""
    from tiny import make_tokenizer

    from fullscale.data import prepare_data

    cache = small_disk("cache", "64k")
    (cache / "tokenized").mkdir()
    (cache / "fill").write_bytes(b"\0" * (52 << 10))   # ~12 KiB left: the ~30 KiB of ids do not fit
    data_file = write_reverse_task(tmp_path / "big.jsonl", n=1500)
    kw = dict(train_file=str(data_file), eval_file=None, eval_split=0.0, dataset_format="auto", max_seq_length=64,
              seed=0, tokenizer=make_tokenizer())
    monkeypatch.setenv("FULLSCALE_CACHE", str(cache))
    spilled = prepare_data(**kw)
    assert any("not cached" in m for m in spilled.messages)
    monkeypatch.setenv("FULLSCALE_CACHE", "off")
    assert spilled.train == prepare_data(**kw).train


def test_a_file_size_limit_during_a_checkpoint_keeps_the_committed_ones(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "limit", tiny_model_dir, reverse_data)
    run = tmp_path / "limit"
    assert cli("train", cfg, fault="step@4").returncode == -signal.SIGKILL   # checkpoint-3 committed
    size = (run / "checkpoint-3" / "optimizer.pt").stat().st_size
    limit = size // 2   # the next optimizer.pt cannot be written; best_model/ still can

    def ulimit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli("train", cfg, preexec_fn=ulimit)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write checkpoint-6" in proc.stderr and "Traceback" not in proc.stderr
    assert no_debris(run) == []
    assert cli("checkpoints", run, "--verify").returncode == 0
    assert "checkpoint-3" in [p.name for p in run.iterdir()]
    proc = cli("train", cfg)   # space back: the run resumes
    assert proc.returncode == 0 and "resuming from checkpoint-3" in proc.stdout


def test_a_read_only_output_dir_is_exit_1_and_an_existing_file_is_exit_2(tmp_path, small_disk, tiny_model_dir,
                                                                         reverse_data):
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    proc = cli("train", write_config(tmp_path, "file", tiny_model_dir, reverse_data, output_dir=str(target)))
    assert proc.returncode == 2 and "is an existing file" in proc.stderr
    assert target.read_text() == "not a directory"
    disk = small_disk("ro", "1m", "ro")
    proc = cli("train", write_config(tmp_path, "ro", tiny_model_dir, reverse_data, output_dir=str(disk / "run")))
    assert proc.returncode == 1, proc.stderr
    assert "cannot write" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- 9. checkpoints that do not load

def _rewrite_manifest(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for rel in manifest["files"]:
        data = (ckpt / rel).read_bytes()
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["garbage_optimizer", "unparsable_state", "files_as_list", "omits_required"])
def test_a_checkpoint_whose_manifest_verifies_but_does_not_load_is_set_aside(tmp_path, tiny_model_dir, reverse_data,
                                                                              damage):
    cfg = write_config(tmp_path, "bad", tiny_model_dir, reverse_data, max_steps=9)
    run = tmp_path / "bad"
    assert cli("train", cfg, fault="step@7").returncode == -signal.SIGKILL
    newest = run / "checkpoint-6"
    if damage == "garbage_optimizer":
        (newest / "optimizer.pt").write_bytes(os.urandom(4000))
        _rewrite_manifest(newest)
    elif damage == "unparsable_state":
        (newest / "trainer_state.json").write_text("{not json")
        _rewrite_manifest(newest)
    elif damage == "files_as_list":
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest["files"] = list(manifest["files"])
        (newest / "manifest.json").write_text(json.dumps(manifest))
    else:
        (newest / "scheduler.pt").unlink()
        manifest = json.loads((newest / "manifest.json").read_text())
        del manifest["files"]["scheduler.pt"]
        (newest / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint-6 is not usable" in proc.stdout and "resuming from checkpoint-3" in proc.stdout
    assert list(run.glob("checkpoint-6.invalid-*"))


# ----------------------------------------------------------------------------- 10/11. signals and pipes

def test_a_signal_during_start_up_exits_75_with_a_message(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "startup", tiny_model_dir, reverse_data)
    proc = cli("train", cfg, fault="sigterm_startup@0")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "during start-up" in proc.stderr and "Traceback" not in proc.stderr
    assert cli("train", cfg).returncode == 0


@pytest.mark.slow
def test_ctrl_c_with_a_dead_tee_still_writes_the_checkpoint(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "tee", tiny_model_dir, reverse_data, max_steps=3000, save_steps=1000,
                       eval_steps=1000)
    run = tmp_path / "tee"
    proc = cli("train", cfg, wait=False)
    for line in proc.stdout:
        if line.split("/")[0].split() == ["step", "20"]:   # "step   20/3000 | ..."
            break
    proc.stdout.close()                   # tee is gone: every later write to stdout is EPIPE
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, proc.stderr.read()
    assert "Traceback" not in proc.stderr.read()
    from fullscale.checkpoint import CheckpointManager

    latest = CheckpointManager(run).latest(verify=True)
    assert latest is not None and latest.step >= 20


# ----------------------------------------------------------------------------- 12. the loop's own stops

def test_a_signal_in_the_step_that_decided_early_stopping_keeps_that_stop(tmp_path, tiny_model_dir, reverse_data):
    # Patience 1 and an impossible min_delta: the step-3 evaluation stops the run; the SIGTERM comes inside it.
    cfg = write_config(tmp_path, "es", tiny_model_dir, reverse_data, max_steps=12, early_stopping_patience=1,
                       early_stopping_min_delta=100.0)
    proc = cli("train", cfg, fault="sigterm_eval@3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "es" / "training_result.json").read_text())
    assert result["stop_reason"] == "early_stopping" and result["total_steps"] == 3
    proc = cli("train", cfg)
    assert proc.returncode == 0 and "already finished (early_stopping at step 3)" in proc.stdout


def test_a_health_abort_with_packing_names_the_rows_and_force_resume_continues_it(tmp_path, tiny_model_dir,
                                                                                  reverse_data):
    cfg = write_config(tmp_path, "abort", tiny_model_dir, reverse_data, packing=True, health_nonfinite_action="abort",
                       health_max_nonfinite=1)
    proc = cli("train", cfg, fault="nan@4")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    aborts = [r for r in read_metrics(tmp_path / "abort") if r["event"] == "health_abort"]
    assert aborts and aborts[0]["rows"]
    proc = cli("train", cfg)
    assert "already finished (health_abort" in proc.stdout and "force_resume" in proc.stdout
    proc = cli("train", cfg, "learning_rate=1e-3", "force_resume=true")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "abort" / "training_result.json").read_text())
    assert result["stop_reason"] == "max_steps" and result["total_steps"] == 6
    lrs = [r["learning_rate"] for r in read_metrics(tmp_path / "abort") if r["event"] == "train" and r["step"] > 3]
    assert lrs and max(lrs) <= 1e-3


@pytest.mark.slow
def test_an_error_on_the_main_process_before_a_broadcast_stops_every_rank(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "rank0", tiny_model_dir, reverse_data)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", FULLSCALE_FAULT="main_error@0")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fullscale",
                           "train", str(cfg)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    assert "the main process failed" in proc.stderr
    assert time.time() - t0 < 200   # not the collective timeout


# ----------------------------------------------------------------------------- 13-17. inputs

def test_overrides_without_a_config_file_use_the_documented_defaults_not_the_demos(tmp_path, tiny_model_dir,
                                                                                   reverse_data):
    out = tmp_path / "own"
    proc = cli("train", f"model_name_or_path={tiny_model_dir}", f"train_file={reverse_data}", f"output_dir={out}",
               "max_steps=2", "report_to=none", "gradient_checkpointing=false")
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-4 and saved["gradient_accumulation_steps"] == 4
    assert saved["per_device_train_batch_size"] == 8 and saved["eval_steps"] == 500
    assert "fullscale demo" not in proc.stdout


def test_a_config_or_overrides_without_a_model_or_data_are_refused(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for args in ([empty], [f"model_name_or_path={tiny_model_dir}", "train_file="], ["train_file="]):
        proc = cli("train", *args, f"output_dir={tmp_path / 'never'}")
        assert proc.returncode == 2, (args, proc.stderr)
        assert "train_file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


def test_a_base_with_missing_tensors_is_refused_with_their_names(tmp_path, tiny_model_dir, reverse_data):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in weights if "layers.1.self_attn.q_proj" in k)
    del weights[name]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    proc = cli("train", write_config(tmp_path, "broken", broken, reverse_data))
    assert proc.returncode == 2, proc.stderr
    assert name in proc.stderr and "Traceback" not in proc.stderr


def test_the_model_fingerprint_covers_every_byte_and_is_hashed_once(tmp_path, monkeypatch):
    from fullscale import fingerprint, resumption

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    blob = bytearray(os.urandom(12 << 20))
    (model / "model.safetensors").write_bytes(blob)
    first = resumption.model_fingerprint(str(model))
    calls = []
    real = fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert resumption.model_fingerprint(str(model)) == first and calls == []   # cached by size+mtime+inode
    with open(model / "model.safetensors", "r+b") as fh:   # edited in place, in the middle
        fh.seek(6 << 20)
        fh.write(b"\x00\x01\x02\x03")
    assert resumption.model_fingerprint(str(model)) != first


def test_mostly_invalid_data_stops_and_the_same_rows_under_another_name_resume(tmp_path, tiny_model_dir,
                                                                              reverse_data):
    bad = tmp_path / "bad.jsonl"
    lines = reverse_data.read_text().splitlines()
    bad.write_text("\n".join(line if i % 10 == 0 else "{broken" for i, line in enumerate(lines)) + "\n")
    proc = cli("train", write_config(tmp_path, "bad", tiny_model_dir, bad))
    assert proc.returncode == 2, proc.stderr
    assert "max_invalid_share" in proc.stderr and "invalid JSON" in proc.stderr

    cfg = write_config(tmp_path, "renamed", tiny_model_dir, reverse_data)
    assert cli("train", cfg, fault="step@4").returncode == -signal.SIGKILL
    copy = tmp_path / "same-rows.jsonl"
    shutil.copyfile(reverse_data, copy)
    proc = cli("train", cfg, f"train_file={copy}")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-3" in proc.stdout


@pytest.mark.parametrize("override, words", [
    ("seed=-1", "seed"), ("num_train_epochs=.inf", "finite"), ("learning_rate=.inf", "finite"),
    ("max_seq_length=4096", "positions"),
])
def test_bad_values_are_clear_errors_before_anything_loads(tmp_path, tiny_model_dir, reverse_data, override, words):
    cfg = write_config(tmp_path, "vals", tiny_model_dir, reverse_data)
    proc = cli("train", cfg, override, "max_steps=-1" if "epochs" in override else "max_steps=6")
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_config_files_with_duplicate_keys_or_not_utf8_are_clear_errors(tmp_path):
    from fullscale.config import load_config
    from fullscale.errors import ConfigError

    dup = tmp_path / "dup.yaml"
    dup.write_text("learning_rate: 1e-4\nseed: 3\nlearning_rate: 2e-4\n")
    with pytest.raises(ConfigError, match=r"learning_rate is set twice .*dup.yaml:1 and .*dup.yaml:3"):
        load_config(dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("output_dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)


def test_tilde_paths_adapter_dirs_tokenizers_and_eval_formats(tmp_path, tiny_model_dir, reverse_data, finished,
                                                               monkeypatch):
    from fullscale.config import load_config

    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(reverse_data, home / "data.jsonl")
    env = {"HOME": str(home)}
    cfg = write_config(tmp_path, "tilde", tiny_model_dir, "~/data.jsonl", output_dir="~/run", max_steps=2)
    proc = cli("train", cfg, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert (home / "run" / "training_result.json").is_file()
    monkeypatch.setenv("HOME", str(home))
    assert load_config(None, {"train_file": "~/data.jsonl"}).train_file == str(home / "data.jsonl")

    # A LoRA adapter given as the model: say so, and name its base.
    proc = cli("train", write_config(tmp_path, "adapter", finished / "best_model", reverse_data))
    assert proc.returncode == 2 and "is a LoRA adapter" in proc.stderr

    # A tokenizer with neither eos nor pad.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    tok = json.loads((bare / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token"):
        tok[key] = None
    (bare / "tokenizer_config.json").write_text(json.dumps(tok))
    proc = cli("train", write_config(tmp_path, "bare", bare, reverse_data))
    assert proc.returncode == 2 and "neither a pad token nor an eos token" in proc.stderr, proc.stderr

    # An eval_file in another format: the fix named is converting eval_file, not changing dataset_format.
    other = tmp_path / "eval.jsonl"
    other.write_text(json.dumps({"text": "rev ab: ba"}) + "\n")
    proc = cli("train", write_config(tmp_path, "evalfmt", tiny_model_dir, reverse_data, eval_file=str(other),
                                     eval_split=0.0))
    assert proc.returncode == 2 and "Convert eval_file" in proc.stderr, proc.stderr

    proc = cli("generate", finished, "--prompt", "x", "--max-new-tokens", "-5")
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr


# ----------------------------------------------------------------------------- replacing a checkpoint

def _abort_at_5(tmp_path, name, model_dir, data, **over):
    # checkpoint-4 is the only one; a NaN at step 5 aborts, and the abort re-saves checkpoint-4.
    return write_config(tmp_path, name, model_dir, data, max_steps=10, save_steps=4, eval_steps=0,
                        logging_steps=2, lora_dropout=0.1, health_nonfinite_action="abort", **over)


@pytest.mark.slow
def test_a_kill_between_the_renames_of_a_checkpoints_replacement_never_loses_it(tmp_path, tiny_model_dir,
                                                                                reverse_data):
    from safetensors.torch import load_file

    ref = _abort_at_5(tmp_path, "ref", tiny_model_dir, reverse_data)
    assert cli("train", ref).returncode == 0
    cfg = _abort_at_5(tmp_path, "killed", tiny_model_dir, reverse_data)
    proc = cli("train", cfg, fault="nan@5,between_renames@5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "killed"
    assert not (run / "checkpoint-4").exists() and list(run.glob(".trash-checkpoint-4-*"))
    proc = cli("train", cfg)   # the next start puts checkpoint-4 back and resumes from it
    assert proc.returncode == 0, proc.stderr
    assert "restored checkpoint-4/" in proc.stdout and "checkpoint-4" in proc.stdout
    a = load_file(str(tmp_path / "ref" / "checkpoint-10" / "adapter_model.safetensors"))
    b = load_file(str(run / "checkpoint-10" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert no_debris(run) == []


@pytest.mark.slow
def test_a_failed_second_rename_puts_the_old_checkpoint_back_at_once(tmp_path, tiny_model_dir, reverse_data):
    cfg = _abort_at_5(tmp_path, "failed", tiny_model_dir, reverse_data)
    run = tmp_path / "failed"
    proc = cli("train", cfg, fault="nan@5,rename_error@5")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Input/output error" in proc.stderr
    assert (run / "checkpoint-4" / "manifest.json").is_file() and not list(run.glob(".trash-*"))
    assert cli("checkpoints", run, "--verify").returncode == 0


def test_a_health_abort_re_saves_the_state_before_the_discarded_step(tmp_path, tiny_model_dir, reverse_data):
    """The re-saved checkpoint holds the random state and log window of the step before the bad
    update, exactly as the uninterrupted run saved them at that step."""
    import torch

    from fullscale import faults
    from fullscale.config import load_config
    from fullscale.train import train

    states = {}
    for name, fault in (("clean", ""), ("aborted", "nan@5")):
        values = yaml.safe_load(_abort_at_5(tmp_path, name, tiny_model_dir, reverse_data).read_text())
        faults.arm(fault)
        result = train(load_config(None, values))
        assert result["stop_reason"] == ("health_abort" if fault else "max_steps")
        ck = tmp_path / name / "checkpoint-4"
        states[name] = (torch.load(ck / "rng_state_0.pt", weights_only=True),
                        json.loads((ck / "trainer_state.json").read_text())["train_state"])
    (rng_a, ts_a), (rng_b, ts_b) = states["clean"], states["aborted"]
    assert torch.equal(rng_a["torch"], rng_b["torch"]) and rng_a["python"] == rng_b["python"]
    assert ts_a["pending_tokens"] == ts_b["pending_tokens"]
    ts_a.pop("train_seconds"), ts_b.pop("train_seconds")   # wall time, not state
    assert ts_a == ts_b


@pytest.mark.slow
def test_a_run_started_with_relative_paths_resumes_and_exports_from_any_directory(tmp_path, tiny_model_dir,
                                                                                   reverse_data):
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    (project / "data").mkdir()
    shutil.copy(reverse_data, project / "data" / "train.jsonl")
    values = dict(SETTINGS, model_name_or_path="models/tiny", train_file="data/train.jsonl", output_dir="runs/rel")
    (project / "my.yaml").write_text(yaml.safe_dump(values))
    proc = cli("train", "my.yaml", fault="step@4", cwd=project)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = project / "runs" / "rel"
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["model_name_or_path"] == str(project / "models" / "tiny")
    assert recorded["train_file"] == str(project / "data" / "train.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("resume", run, cwd=elsewhere)                 # a requeued job started from another directory
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-3" in proc.stdout
    proc = cli("export", run, "--out", elsewhere / "adapter", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    card = (elsewhere / "adapter" / "README.md").read_text()
    assert "models/tiny" not in card.replace(str(project / "models" / "tiny"), "")
    proc = cli("generate", run, "--prompt", "rev abc:", "--max-new-tokens", "3", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_exports_during_a_live_run_pair_each_steps_manifest_with_its_own_weights(tmp_path, tiny_model_dir,
                                                                                   reverse_data):
    """A run that saves and rotates at every step, and replaces best_model/ at every other one;
    exports run beside it (in this process, the run in its own). Each one ends in an export whose
    weights are those of the step its manifest names (compared with an uninterrupted run's
    checkpoint of that step: constant learning rate, so a step's weights do not depend on the run's
    length), or in a clear message; never one step's manifest with another's weights."""
    import torch
    from safetensors.torch import load_file

    from fullscale.errors import UserError
    from fullscale.export import export

    over = dict(save_steps=1, eval_steps=2, save_total_limit=1, early_stopping_patience=0, eval_samples=0,
                learning_rate=1e-2, logging_steps=10, lr_scheduler_type="constant", warmup_ratio=0.0)
    ref = write_config(tmp_path, "ref", tiny_model_dir, reverse_data, **dict(over, max_steps=100,
                                                                             save_total_limit=1000))
    assert cli("train", ref).returncode == 0
    cfg = write_config(tmp_path, "live", tiny_model_dir, reverse_data, **dict(over, max_steps=100000))
    run = tmp_path / "live"
    live = cli("train", cfg, wait=False)
    exported, refused = [], 0
    try:
        deadline = time.time() + 240
        while live.poll() is None and len(exported) < 6 and time.time() < deadline:
            if not (run / "best_model").exists() or not list(run.glob("checkpoint-*")):
                time.sleep(0.05)
                continue
            out = tmp_path / f"export-{len(exported)}-{refused}"
            try:
                export(run, out, checkpoint="latest" if len(exported) % 2 else "best")
                exported.append(out)
            except UserError:
                refused += 1       # a clear message (e.g. it kept changing): allowed, never a wrong pairing
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=300)
    assert live.returncode == EXIT_PREEMPTED
    compared = 0
    for out in exported:
        step = json.loads((out / "manifest.json").read_text())["provenance"]["source"]["step"]
        if not 0 < step <= 100:   # step 0: the untrained adapter, no checkpoint of it to compare with
            continue
        mine = load_file(str(out / "adapter_model.safetensors"))
        theirs = load_file(str(tmp_path / "ref" / f"checkpoint-{step}" / "adapter_model.safetensors"))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), (out, step)
        compared += 1
    assert compared >= 3, (len(exported), refused)


_NO_FLOCK = """
import errno, fcntl, sys, time
real = fcntl.flock
def no_flock(fd, op):
    if op & (fcntl.LOCK_EX | fcntl.LOCK_SH):
        raise OSError(errno.ENOLCK, "No locks available")
    return real(fd, op)
fcntl.flock = no_flock
from fullscale import rundir
rundir.HEARTBEAT_SECONDS = 0.2
t0 = float(sys.argv[2])
while time.time() < t0:
    pass
try:
    lock = rundir.RunLock(sys.argv[1]).acquire()
except rundir.RunLockedError:
    print("refused")
    sys.exit(0)
print("got", flush=True)
first = rundir.holder(sys.argv[1]) or {}
time.sleep(1.0)
later = rundir.holder(sys.argv[1]) or {}
print("beats", later.get("heartbeat", 0) > first.get("heartbeat", 0), flush=True)
lock.release()
"""


@pytest.mark.slow
def test_the_fallback_lock_has_no_window_between_reading_and_writing_and_beats_on_its_own(tmp_path):
    """Four processes on a file system without flock reach for the same run directory at the same
    instant: exactly one holds it. Its heartbeat is rewritten by a thread of its own, whatever the
    process is doing (a long tokenization), so another host never takes a live run for stale."""
    run = tmp_path / "run"
    run.mkdir()
    start = time.time() + 3.0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", _NO_FLOCK, str(run), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    got = [o for o, _ in outs if o.startswith("got")]
    assert len(got) == 1, outs
    assert "beats True" in got[0]
    assert not (run / ".fullscale-lock.claim").exists()
