"""`fullscale generate` prompts the way the run's rows were built (prompt_format.json): a
prompt/completion run and an Alpaca run answer as they do through plain transformers + peft with
the same prompt text."""

import json
from pathlib import Path

import pytest
import torch

from fullscale.cli import main


def train_run(tmp_path, tiny_model_dir, train_file, **extra):
    from fullscale.config import load_config
    from fullscale.train import train

    values = {"model_name_or_path": str(tiny_model_dir), "train_file": str(train_file),
              "output_dir": str(tmp_path / "run"), "max_steps": 8, "per_device_train_batch_size": 8,
              "gradient_accumulation_steps": 1, "eval_steps": 4, "save_steps": 4, "learning_rate": 3e-3,
              "lora_dropout": 0.0, "gradient_checkpointing": False, "report_to": "none", "eval_split": 0.1,
              "max_seq_length": 128, **extra}
    train(load_config(None, values))
    return tmp_path / "run"


def plain_reply(tiny_model_dir, adapter_dir, text: str) -> str:
    """Greedy generation through transformers + peft alone, prompt tokenized with special tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter_dir))
    ids = tok(text, return_tensors="pt").input_ids
    stop = [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in ("<|end|>",) if t in tok.get_vocab()]
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate(run_or_model, prompt, capsys) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", str(run_or_model), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    return out.out.strip(), out.err


def test_a_prompt_completion_run_answers_through_its_own_prompt_format(tmp_path, tiny_model_dir, reverse_data,
                                                                      capsys):
    from fullscale.prompts import encode_prompt, read_prompt_format
    from fullscale.model import load_tokenizer

    run = train_run(tmp_path, tiny_model_dir, reverse_data)
    assert json.loads((run / "prompt_format.json").read_text()) == {"format": "prompt_completion"}
    reply, err = generate(run, "rev abc:", capsys)
    assert "prompt format: prompt_completion" in err
    assert reply == plain_reply(tiny_model_dir, run / "best_model", "rev abc:")
    # The ids are the prompt's own (with BOS), not the chat template's.
    tok = load_tokenizer(type("C", (), {"model_name_or_path": str(tiny_model_dir), "trust_remote_code": False})())
    ids, _ = encode_prompt(tok, "rev abc:", read_prompt_format(run))
    assert ids[0].tolist() == tok("rev abc:")["input_ids"] and tok.chat_template
    # The export carries the format, and its card says how to prompt.
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "prompt_format.json").read_text())["format"] == "prompt_completion"
    assert "no chat template" in (tmp_path / "export" / "README.md").read_text()
    assert generate(tmp_path / "export", "rev abc:", capsys)[0] == reply


def test_an_alpaca_run_answers_through_its_template(tmp_path, tiny_model_dir, capsys):
    rows = [{"instruction": f"rev {w}", "output": w[::-1]} for w in ("abc", "hello", "xyz", "dog", "cat") * 8]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train_run(tmp_path, tiny_model_dir, data, alpaca_template="Q: {instruction}\nA: ")
    record = json.loads((run / "prompt_format.json").read_text())
    assert record["format"] == "alpaca" and record["alpaca_template"] == "Q: {instruction}\nA: "
    reply, err = generate(run, "rev abc", capsys)
    assert "prompt format: alpaca" in err
    assert reply == plain_reply(tiny_model_dir, run / "best_model", "Q: rev abc\nA: ")


def test_max_new_tokens_is_capped_at_the_models_positions():
    from fullscale.generate import generate_reply
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok)
    positions = model.config.max_position_embeddings
    asked = []
    real = model.generate

    def generate(**kw):
        asked.append(kw["max_new_tokens"])
        return real(**{**kw, "max_new_tokens": 2})

    model.generate = generate
    generate_reply(model, tok, "rev abc:", max_new_tokens=1_000_000_000, record={"format": "text"})
    prompt = len(tok("rev abc:").input_ids)
    assert asked and prompt < positions and asked[0] <= positions - prompt + 2
    assert asked[0] >= positions - prompt - 16   # the prompt as encoded may carry a few special tokens


def test_generate_on_a_run_without_a_usable_best_model_gives_advice_generate_can_follow(tmp_path, tiny_model_dir,
                                                                                        reverse_data):
    import shutil

    from conftest import run_cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model_name_or_path: {tiny_model_dir}\n")
    proc = run_cli("generate", run, "--prompt", "rev abc:")
    assert proc.returncode == 2 and "nothing to generate" in proc.stderr and "--checkpoint" not in proc.stderr
    shutil.rmtree(run)
    proc = run_cli("train", f"model_name_or_path={tiny_model_dir}", f"train_file={reverse_data}",
                   f"output_dir={run}", "max_steps=2", "save_steps=2", "eval_steps=2", "report_to=none",
                   "eval_samples=0")
    assert proc.returncode == 0, proc.stderr
    (run / "best_model" / "adapter_config.json").write_text("{}")   # damaged
    proc = run_cli("generate", run, "--prompt", "rev abc:")
    assert proc.returncode == 2 and f"fullscale generate {run / 'checkpoint-2'}" in proc.stderr, proc.stderr
    assert "--checkpoint" not in proc.stderr
