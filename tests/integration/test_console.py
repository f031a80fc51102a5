"""The console of `fullscale train`: on a terminal a live bar that fits its width and moves every
step (driven through a real pseudo-terminal of 80 columns); through a pipe one plain line per log
step."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def config(tmp_path, tiny_model_dir, reverse_data, name):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data), output_dir=str(tmp_path / name),
        max_steps=9, per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=3, eval_steps=0,
        save_steps=100, gradient_checkpointing=False, report_to="none", eval_split=0.1)))
    return cfg


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TERM="xterm")


def test_on_an_80_column_terminal_the_bar_never_wraps_and_moves_every_step(tmp_path, tiny_model_dir, reverse_data):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fullscale", "train", str(config(tmp_path, tiny_model_dir,
                                                                                    reverse_data, "tty"))],
                            stdin=slave, stdout=slave, stderr=slave, env=env(), close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    text = out.decode()
    redrawn = [seg for seg in re.split(r"[\r\n]", text.replace("\r\x1b[2K", "\r")) if seg]
    bars = [seg for seg in text.split("\r\x1b[2K")[1:]]
    # Everything written in place fits 79 columns (the cursor never reaches the last one).
    for seg in bars:
        first = seg.split("\n")[0].split("\r")[0]
        assert len(first) <= 79, repr(first)
    # A bar for every one of the 9 steps, and the log steps' lines (3, 6, 9) kept above it.
    for step in range(1, 10):
        assert any(re.search(rf"\] {step}/9 \| loss", seg) for seg in redrawn), step
    assert [int(m) for m in re.findall(r"^step (\d)/9 \|", text.replace("\r\x1b[2K", "\n"), re.M)] == [3, 6, 9]


def test_through_a_pipe_there_is_one_plain_line_per_log_step(tmp_path, tiny_model_dir, reverse_data):
    proc = subprocess.run([sys.executable, "-m", "fullscale", "train", str(config(tmp_path, tiny_model_dir,
                                                                                  reverse_data, "pipe"))],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split("/")[0] for line in lines] == ["step 3", "step 6", "step 9"]
    assert all(" | epoch " in line and " tok/s | ETA " in line for line in lines)
