"""Full-scale data: the token store (memory-mapped views, reused, once per node), `fullscale prepare`,
ShareGPT rows and column mapping, the plan's data row."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli as cli
from conftest import torchrun, write_reverse_task

ROOT = Path(__file__).parents[2]


@pytest.fixture
def tokenizer():
    from tiny import make_tokenizer

    return make_tokenizer()


def prepare(path, tokenizer, **kw):
    from fullscale.data import prepare_data

    values = dict(train_file=str(path), eval_file=None, eval_split=0.1, dataset_format="auto", max_seq_length=64,
                  seed=0, tokenizer=tokenizer)
    values.update(kw)
    return prepare_data(**values)


def test_prepared_examples_are_views_into_one_memory_mapped_store(tmp_path, tokenizer, monkeypatch):
    from fullscale.data.store import Examples

    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))
    path = write_reverse_task(tmp_path / "train.jsonl", n=200)
    fresh = prepare(path, tokenizer)
    again = prepare(path, tokenizer)
    uncached = prepare(path, tokenizer, cache=False)
    for data in (fresh, again):
        assert isinstance(data.train, Examples) and isinstance(data.train.input_ids, np.memmap)
        assert data.train.input_ids.dtype == np.int32 and data.train.offsets.dtype == np.int64
    assert not fresh.from_store and again.from_store
    assert fresh.train == again.train == uncached.train and fresh.eval == again.eval == uncached.eval
    ex = again.train[3]
    assert isinstance(ex["input_ids"], list) and len(ex["input_ids"]) == len(ex["labels"]) == again.train.lengths()[3]
    stores = list((tmp_path / "cache" / "tokenized").iterdir())
    assert [p.suffix for p in stores] == [".store"]   # one file, written atomically, no temporary left


def test_packing_reads_rows_from_the_store_as_bins_of_indices(tmp_path, tokenizer, monkeypatch):
    from fullscale.packing import PackedRows, pack_examples

    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))
    data = prepare(write_reverse_task(tmp_path / "train.jsonl", n=120), tokenizer)
    lazy, stats = pack_examples(data.train, max_seq_length=64, seed=3, lazy=True)
    eager, _ = pack_examples(data.train, max_seq_length=64, seed=3)
    assert isinstance(lazy, PackedRows) and lazy == eager and stats.num_examples == len(data.train)


def test_sharegpt_rows_and_mapped_columns_train_like_their_standard_form(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))
    share = tmp_path / "share.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"rev {w}:"}, {"from": "gpt", "value": w[::-1]}]}
            for w in ("abc", "hello", "xyz")]
    rows.insert(1, {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]})
    share.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = tmp_path / "messages.jsonl"
    messages.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"rev {w}:"},
                                                         {"role": "assistant", "content": w[::-1]}]}) + "\n"
                                for w in ("abc", "hello", "xyz")))
    a = prepare(share, tokenizer, eval_split=0.0)
    b = prepare(messages, tokenizer, eval_split=0.0)
    assert a.format == "sharegpt" and [x["input_ids"] for x in a.train] == [x["input_ids"] for x in b.train]
    assert a.train_stats.skipped == [(2, "turn 1 of 2 is from 'robot' (expected one of: " +
                                      "human, user, gpt, assistant, chatgpt, system, tool, observation, function_call)")]

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"rev {w}:", "answer": w[::-1]}) + "\n" for w in ("ab", "cde")))
    mapped = prepare(qa, tokenizer, eval_split=0.0, columns={"prompt": "question", "completion": "answer"})
    assert mapped.format == "prompt_completion" and len(mapped.train) == 2


def test_prepare_ahead_then_train_opens_the_store(tmp_path, tiny_model_dir, reverse_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                                       output_dir=str(tmp_path / "run"), max_steps=2, report_to="none",
                                       gradient_checkpointing=False, max_seq_length=64)))
    env = {"FULLSCALE_CACHE": str(tmp_path / "cache")}
    proc = cli("prepare", cfg, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "prepared:" in proc.stdout and "cached in" in proc.stdout
    proc = cli("train", cfg, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "tokenized data: read from the cache" in proc.stdout
    plan = cli("plan", cfg, env_extra=env)
    assert "data     host RAM" in plan.stdout and "token store" in plan.stdout


@pytest.mark.slow
def test_under_torchrun_the_data_is_tokenized_once_per_node(tmp_path, tiny_model_dir, reverse_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                                       output_dir=str(tmp_path / "run"), max_steps=2, report_to="none",
                                       gradient_checkpointing=False, max_seq_length=64,
                                       per_device_train_batch_size=2)))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", FULLSCALE_CACHE=str(tmp_path / "c"))
    proc = subprocess.run(torchrun("-m", "fullscale", "train", cfg), capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: tokenized by 1 of 2 processes" in proc.stdout
    assert len(list((tmp_path / "c" / "tokenized").glob("*.store"))) == 1


def test_a_directory_of_data_files_loads_with_datasets_and_reports_rows_by_number(tmp_path, tokenizer, monkeypatch):
    # What datasets.load_dataset reads offline: a local dataset directory (a hub id is loaded the
    # same way, from the local cache when there is no network).
    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    rows = [{"prompt": f"rev {w}:", "completion": w[::-1]} for w in ("ab", "cde", "fgh", "ijk")]
    rows.insert(2, {"prompt": "", "completion": None})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare(folder, tokenizer, eval_split=0.0)
    assert data.format == "prompt_completion" and len(data.train) == 4
    assert [n for n, _ in data.train_stats.skipped] == [3]
    assert any("row 3" in m for m in data.messages)


def test_a_hub_dataset_that_cannot_be_loaded_is_a_clear_error(tmp_path, tiny_model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(tiny_model_dir), train_file="no-such-org/no-such-set",
                                       output_dir=str(tmp_path / "run"), report_to="none")))
    proc = cli("train", cfg, env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                        "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert proc.returncode == 2, proc.stderr
    assert "cannot load the dataset 'no-such-org/no-such-set'" in proc.stderr and "Traceback" not in proc.stderr


def test_sources_are_mixed_by_weight_each_in_its_own_format_and_store(tmp_path, tokenizer, monkeypatch):
    from fullscale.config import load_config
    from fullscale.data import mixed_count, prepare_for

    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))
    pc = write_reverse_task(tmp_path / "pc.jsonl", n=40)
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(30)]
    rows[7] = {"messages": "not a list"}   # a bad row: reported by its source and line
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, dict(model_name_or_path="x", train_file=[{"path": str(pc), "weight": 2},
                                                                        {"path": str(chat), "weight": 0.5}],
                                    eval_split=0.1, max_seq_length=64))
    data = prepare_for(config, tokenizer)
    # Each source holds out its own eval split (4 and 3 rows), then counts at its weight.
    assert len(data.train) == mixed_count(36, 2) + mixed_count(26, 0.5) == 72 + 13
    assert len(data.eval) == 4 + 3 and data.format == "prompt_completion+messages"
    texts = [tokenizer.decode(ex["input_ids"]) for ex in data.train]
    pc_texts = [t for t in texts if "rev " in t]
    assert len(pc_texts) == 72 and all(pc_texts.count(t) % 2 == 0 for t in pc_texts)   # every example twice
    assert len(set(t for t in texts if "say " in t)) == 13                             # a sample, no repeats
    assert data.train_stats.num_rows == 36 + 26 + 0 or data.train_stats.num_rows == 40 - 4 + 30 - 3
    assert [(n, why.split(":")[0]) for n, why in data.train_stats.skipped] == [(8, str(chat))]
    assert [name for name, _ in data.sources] == [str(pc), str(chat)]
    assert data.train_stats.num_tokens == sum(len(ex["input_ids"]) for ex in data.train)
    assert data.train_stats.num_label_tokens == sum(sum(1 for x in ex["labels"] if x != -100) for ex in data.train)
    assert any(m.startswith("mix: 85 train examples an epoch from 2 sources") for m in data.messages)
    # Deterministic, and read back from the two stores the second time.
    again = prepare_for(config, tokenizer)
    assert again.from_store and again.train == data.train and again.eval == data.eval
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.store"))) == 2
    # Packing and length grouping see the mix through its lengths.
    from fullscale.packing import pack_examples
    from fullscale.data.store import example_lengths

    assert example_lengths(data.train) == [len(ex["input_ids"]) for ex in data.train]
    _, stats = pack_examples(data.train, max_seq_length=64, seed=0, lazy=True)
    assert stats.num_examples == len(data.train)


def test_a_mixed_run_trains_resumes_and_refuses_a_changed_weight(tmp_path, tiny_model_dir, reverse_data):
    from fullscale.config import load_config
    from fullscale.plan import count_steps

    other = write_reverse_task(tmp_path / "other.jsonl", n=50, seed=5)
    sources = [{"path": str(reverse_data)}, {"path": str(other), "weight": 0.5}]
    values = dict(model_name_or_path=str(tiny_model_dir), train_file=sources, output_dir=str(tmp_path / "run"),
                  num_train_epochs=1, report_to="none", gradient_checkpointing=False, max_seq_length=64,
                  per_device_train_batch_size=4, gradient_accumulation_steps=1, save_steps=5, eval_steps=0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(values))
    steps, _, _ = count_steps(load_config(cfg), num_processes=1)
    assert steps == -(-(96 - 5 + 25 - 3) // 4)   # 91 + mixed_count(47, 0.5) = 115 examples, batches of 4
    proc = cli("train", cfg, fault="step@7")   # killed (SIGKILL) at step 7, after the checkpoint of step 5
    assert proc.returncode == -9 and "mix: " in proc.stdout
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "resum" in proc.stdout and f"step {steps}/{steps}" in proc.stdout.replace(",", "")
    values["train_file"] = [{"path": str(reverse_data)}, {"path": str(other), "weight": 0.75}]
    cfg.write_text(yaml.safe_dump(values))
    proc = cli("train", cfg, "num_train_epochs=2")
    assert proc.returncode == 2 and "train data contents changed" in proc.stderr


def test_a_bad_source_entry_is_a_config_error_naming_it(tmp_path, tiny_model_dir, reverse_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "run"),
                                       train_file=[{"path": str(reverse_data), "wieght": 2},
                                                   {"path": str(tmp_path / "missing.jsonl")},
                                                   {"path": str(reverse_data), "weight": 0}])))
    proc = cli("train", cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "source 1: unknown key 'wieght' (did you mean 'weight'?)" in proc.stderr
    assert "source 3: weight: 0 must be a number > 0" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_fractional_weight_draws_a_new_sample_each_epoch(tmp_path, tokenizer, monkeypatch):
    from fullscale.config import load_config
    from fullscale.data import prepare_for

    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))
    small = write_reverse_task(tmp_path / "small.jsonl", n=10, seed=3)
    big = write_reverse_task(tmp_path / "big.jsonl", n=20, seed=4)
    config = load_config(None, dict(model_name_or_path="x", train_file=[{"path": str(big)},
                                                                        {"path": str(small), "weight": 0.5}],
                                    eval_split=0, max_seq_length=64))
    train = prepare_for(config, tokenizer).train
    first = [train[i]["row"] for i in range(len(train))]
    seen, sizes = set(), set()
    for epoch in range(6):
        train.set_epoch(epoch)
        rows = [train[i]["row"] for i in range(20, len(train))]   # the small source's block
        sizes.add(len(rows))
        assert len(set(rows)) == len(rows) == 5   # half of it, no repeats, every epoch
        seen |= set(rows)
    assert sizes == {5} and len(seen) > 5          # over the epochs, more than one half is seen
    train.set_epoch(0)
    assert [train[i]["row"] for i in range(len(train))] == first   # epoch 0 as before; seeded, repeatable
    train.set_epoch(3)
    again = [train[i]["row"] for i in range(len(train))]
    train.set_epoch(0), train.set_epoch(3)
    assert [train[i]["row"] for i in range(len(train))] == again


@pytest.mark.slow
def test_a_run_with_a_fractional_weight_killed_in_a_later_epoch_resumes_bitwise(tmp_path, tiny_model_dir,
                                                                                reverse_data):
    import signal

    import torch
    from safetensors.torch import load_file

    other = write_reverse_task(tmp_path / "other.jsonl", n=20, seed=5)
    base = dict(model_name_or_path=str(tiny_model_dir), train_file=[{"path": str(reverse_data)},
                                                                    {"path": str(other), "weight": 0.5}],
                num_train_epochs=2, report_to="none", gradient_checkpointing=False, max_seq_length=64,
                per_device_train_batch_size=8, gradient_accumulation_steps=1, save_steps=4, eval_steps=0,
                eval_split=0, lora_dropout=0.1, logging_steps=1, warmup_ratio=0.0)
    cfgs = {}
    for name in ("ref", "killed"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(dict(base, output_dir=str(tmp_path / name))))
    assert cli("train", cfgs["ref"]).returncode == 0
    proc = cli("train", cfgs["killed"], fault="step@20")     # epoch 2 (14 steps an epoch)
    assert proc.returncode == -signal.SIGKILL
    assert cli("train", cfgs["killed"]).returncode == 0
    last = max(int(p.name.split("-")[1]) for p in (tmp_path / "ref").glob("checkpoint-*"))
    a = load_file(str(tmp_path / "ref" / f"checkpoint-{last}" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / f"checkpoint-{last}" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_token_store_cut_short_under_a_live_run_is_a_message_then_rebuilt(tmp_path, tiny_model_dir,
                                                                          reverse_data):
    """The store truncated by something else while the run reads it: not a SIGBUS with no word, but
    exit 2 saying what happened; running again rebuilds the store and resumes."""
    import re
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                                       output_dir=str(tmp_path / "run"), max_steps=80, save_steps=5,
                                       eval_steps=0, logging_steps=1, report_to="none", eval_split=0,
                                       per_device_train_batch_size=2, gradient_accumulation_steps=1,
                                       gradient_checkpointing=False, max_seq_length=64)))
    env = {"FULLSCALE_CACHE": str(tmp_path / "cache")}
    live = cli("train", cfg, env_extra=env, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and live.poll() is None:
        if metrics.exists() and metrics.read_text().count('"event": "checkpoint"') >= 1:
            break
        time.sleep(0.1)
    [store] = list((tmp_path / "cache" / "tokenized").glob("*.store"))
    os.truncate(store, store.stat().st_size // 2)
    out, err = live.communicate(timeout=120)
    assert live.returncode == 2, (live.returncode, err[-2000:])
    assert "was cut short while this run read it" in err and "Traceback" not in err
    proc = cli("train", cfg, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"resuming from checkpoint-\d+", proc.stdout)
