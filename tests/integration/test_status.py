"""`fullscale status` on real runs: a finished one, and a live training process followed from outside
through a SIGTERM stop, a resume and a SIGKILL."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fullscale.cli import main
from fullscale.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, reverse_data):
    """A finished short run (in-process), shared by the tests that only read it."""
    from fullscale.config import load_config
    from fullscale.train import train

    run = tmp_path_factory.mktemp("status") / "run"
    config = load_config(None, {
        "model_name_or_path": str(tiny_model_dir), "train_file": str(reverse_data), "output_dir": str(run),
        "max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "eval_steps": 3,
        "save_steps": 3, "logging_steps": 1, "learning_rate": 1e-3, "lora_dropout": 0.0,
        "gradient_checkpointing": False, "report_to": "none", "eval_split": 0.1})
    train(config)
    return run


def status_json(run_dir, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def status_text(run_dir, capsys) -> str:
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


def rewrite_status(run_dir, **values) -> None:
    path = Path(run_dir) / "status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_status_of_a_finished_run_in_text_and_json(finished_run, capsys):
    text = status_text(finished_run, capsys)
    assert text.startswith(f"{finished_run}: finished (max_steps; last update ")
    for expected in ("6/6 (100.0%)", "train loss", "best eval", "tokens/s", "peak memory", "latest checkpoint-6",
                     "health       no events", "stop reason  max_steps"):
        assert expected in text, (expected, text)

    s = status_json(finished_run, capsys)
    saved = json.loads((finished_run / "training_result.json").read_text())
    assert s["state"] == "finished" and s["running"] is False and s["phase"] == "finished"
    assert s["step"] == s["total_steps"] == 6 and s["progress"] == 1.0
    assert s["best_eval_loss"] == pytest.approx(saved["best_eval_loss"]) and s["best_step"] == saved["best_step"]
    assert s["stop_reason"] == "max_steps" and s["eta_seconds"] is None
    assert s["checkpoints"]["steps"] == [3, 6] and s["checkpoints"]["latest"] == 6
    assert s["checkpoints"]["run_dir_bytes"] > s["checkpoints"]["checkpoints_bytes"] > 0
    assert s["health"] == {"count": 0, "by_detector": {}, "recent": []}
    assert s["pid"] == os.getpid() and s["host"] == socket.gethostname()


def test_health_events_are_counted_and_the_last_few_shown(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    with open(run / "metrics.jsonl", "a") as fh:
        for step in range(1, 8):
            detector = "spike" if step % 2 else "grad"
            fh.write(json.dumps({"event": "health", "step": step, "time": time.time(), "detector": detector,
                                 "action": "warn", "message": f"{detector} at step {step}", "value": "inf"}) + "\n")
        fh.write('{"event": "train", "step": 7, "lo')  # a line the run is still writing
    s = status_json(run, capsys)
    assert s["health"]["count"] == 7 and s["health"]["by_detector"] == {"spike": 4, "grad": 3}
    assert [e["step"] for e in s["health"]["recent"]] == [3, 4, 5, 6, 7]
    assert s["health"]["recent"][-1]["value"] == "inf"   # non-finite stays visible in the JSON
    text = status_text(run, capsys)
    assert "7 events (grad 3, spike 4); last 5:" in text and "step 7: spike -> warn: spike at step 7" in text


def test_a_running_status_is_judged_by_its_process_and_heartbeat(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    now = time.time()
    # This very process is alive and started before the update: running, with the ETA counted down.
    # (The update is a moment ago: this process may have started less than a few seconds before.)
    rewrite_status(run, phase="running", pid=os.getpid(), updated=now - 1, eta_seconds=100.0)
    s = status_json(run, capsys)
    assert s["state"] == "running" and s["running"] is True
    assert 95 <= s["eta_seconds"] <= 99.5
    # A pid that no longer exists: the run died.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rewrite_status(run, pid=gone.pid, updated=now - 300)
    s = status_json(run, capsys)
    assert s["state"] == "not running" and s["running"] is False and s["eta_seconds"] is None
    assert s["detail"] == "not running (process gone; last update 5 min ago)"
    # Another host: only the heartbeat can tell.
    rewrite_status(run, host="elsewhere-" + socket.gethostname(), updated=now - 60)
    assert status_json(run, capsys)["state"] == "running"
    rewrite_status(run, updated=now - 3 * 3600)
    s = status_json(run, capsys)
    assert s["state"] == "not running" and "heartbeat stale" in s["detail"] and "3.0 h ago" in s["detail"]


def test_a_directory_that_is_not_a_run_is_one_clear_paragraph(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for argv in (["status", str(tmp_path)], ["status", str(tmp_path / "missing"), "--json"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fullscale: ") and "run directory" in err and "fullscale train" in err
        assert "Traceback" not in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- a live process

def start_cli(*args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("FULLSCALE_FAULT", None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "fullscale", *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)


def wait_for(predicate, proc, log: Path, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} while waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{log.read_text()[-3000:]}")


def saved_status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_status_follows_a_live_run_through_a_stop_a_resume_and_a_kill(tmp_path, tiny_model_dir, reverse_data,
                                                                     capsys):
    from fullscale.report import build_report

    run = tmp_path / "run"
    cfg = tmp_path / "live.yaml"
    # Far more steps than the test waits for (~60 steps/s here): the run is stopped from outside.
    cfg.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data), output_dir=str(run), max_steps=20000,
        logging_steps=5, eval_steps=10000, save_steps=5000, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, lora_dropout=0.0, gradient_checkpointing=False,
        report_to="none", eval_split=0.1)))
    log = tmp_path / "train.log"
    proc = start_cli("train", cfg, log=log)
    try:
        wait_for(lambda: saved_status(run).get("phase") == "running", proc, log, timeout=120, what="phase running")
        first = status_json(run, capsys)
        wait_for(lambda: saved_status(run).get("step", 0) > first["step"], proc, log, timeout=60, what="progress")
        second = status_json(run, capsys)
        for s in (first, second):
            assert s["state"] == "running" and s["running"] is True and s["pid"] == proc.pid
            assert s["total_steps"] == 20000 and s["eta_seconds"] > 0 and s["tokens_per_second"] > 0
        assert second["step"] > first["step"] > 0
        assert status_text(run, capsys).startswith(f"{run}: running (pid {proc.pid}, last update ")
        # The report of a run that is going: its state, and no result yet.
        html = build_report(run).read_text()
        assert "running (pid" in html and "No training_result.json yet" in html

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s = status_json(run, capsys)
    assert s["state"] == "stopped" and s["running"] is False and s["stop_reason"] == "preempted"
    assert s["checkpoints"]["latest"] == s["step"] >= second["step"]
    assert f"fullscale resume {run}" in s["detail"]

    # Resume it, then kill it hard: status.json still says running, but its process is gone.
    proc = start_cli("resume", run, log=log)
    try:
        wait_for(lambda: saved_status(run).get("pid") == proc.pid and saved_status(run).get("phase") == "running",
                 proc, log, timeout=120, what="the resumed run")
        s = status_json(run, capsys)
        assert s["running"] is True and s["num_resumes"] == 1 and s["resumes"][0]["reason"] == "preempted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert saved_status(run)["phase"] == "running"
    s = status_json(run, capsys)
    assert s["state"] == "not running" and s["running"] is False
    assert s["detail"].startswith("not running (process gone; last update ") and s["detail"].endswith(" s ago)")
    assert "not running (process gone" in status_text(run, capsys)


def test_status_shows_fractional_epochs_the_logged_mean_loss_and_an_evaluation_at_once(tmp_path, tiny_model_dir,
                                                                                     reverse_data, capsys):
    from conftest import read_metrics, run_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data), output_dir=str(tmp_path / "run"),
        max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=2, eval_steps=3,
        save_steps=100, learning_rate=1e-3, gradient_checkpointing=False, report_to="none", eval_split=0.1)))
    # Killed during step 4: the evaluation of step 3 came after the last log (step 2).
    assert run_cli("train", cfg, fault="step@4").returncode == -signal.SIGKILL
    records = read_metrics(tmp_path / "run")
    ev = [r for r in records if r["event"] == "eval"][-1]
    train = [r for r in records if r["event"] == "train"][-1]
    assert ev["step"] == 3 and train["step"] == 2
    s = status_json(tmp_path / "run", capsys)
    assert s["last_eval_loss"] == ev["eval_loss"]                 # shown at once, not at the next log
    assert s["train_loss"] == train["loss"] == sum(train["step_losses"]) / 2   # the mean the console shows
    assert s["epoch"] == train["epoch"] and 0 < s["epoch"] < 1 and s["epoch"] != round(s["epoch"])


def test_status_reads_files_only_without_importing_torch(finished_run):
    code = ("import sys; from fullscale.cli import main; code = main(['status', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, str(finished_run)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, proc.stderr
    assert "step" in proc.stdout
