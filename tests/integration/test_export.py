"""Export, merge and use the trained model: one real short run on a tiny Llama, exported every way."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fullscale.cli import main
from fullscale.export import MERGE_TOLERANCES, ExportError, export, load_trained_model

ROOT = Path(__file__).parents[2]
PROMPTS = ["rev abc:", "rev hgfedcba:", "rev a:"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, reverse_data):
    """One finished run (steps 3 and 6 checkpointed, best_model/) on its own copy of the tiny base.
    The learning rate is high so that the adapter moves the logits well away from the base's."""
    from fullscale.config import load_config
    from fullscale.train import train

    root = tmp_path_factory.mktemp("export")
    base = shutil.copytree(tiny_model_dir, root / "base")
    config = load_config(None, {
        "model_name_or_path": str(base), "train_file": str(reverse_data), "output_dir": str(root / "run"),
        "max_steps": 6, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "eval_steps": 3,
        "save_steps": 3, "learning_rate": 2e-2, "lora_dropout": 0.0, "gradient_checkpointing": False,
        "report_to": "none", "eval_split": 0.1, "early_stopping_patience": 0,
    })
    train(config)
    return root / "run", base


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "fullscale", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def logits(model, enc):
    with torch.no_grad():
        out = model(**enc).logits
    return out[enc["attention_mask"].bool()].float()


def files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def adapter_model(base, adapter, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).eval()


# ----------------------------------------------------------------------------- merged


def test_merged_model_loads_without_peft_and_computes_what_the_adapter_model_computes(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, base = run
    result = export(run_dir, tmp_path / "merged", merge=True)
    out = result.path
    assert result.dtype == "fp32" and result.verification.passed
    assert result.verification.max_abs_diff < 1e-5
    assert result.verification.data == "held-out eval examples of the run"
    assert result.verification.adapter_perplexity == pytest.approx(result.verification.merged_perplexity, rel=1e-5)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()          # plain transformers, no peft
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = batch(tokenizer)
    with_adapter = logits(adapter_model(base, run_dir / "best_model"), enc)
    assert (logits(merged, enc) - with_adapter).abs().max() < 1e-5
    # ...and the adapter matters: the merged model is not the base.
    assert (logits(AutoModelForCausalLM.from_pretrained(base).eval(), enc) - with_adapter).abs().max() > 1e-2
    generated = merged.generate(**tokenizer("rev abc:", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > len("rev abc:") + 1

    card = (out / "README.md").read_text()
    assert "max abs logit difference" in card and "library_name: transformers" in card


def test_bf16_merge_stays_within_the_stated_bound(run, tmp_path):
    from safetensors.torch import load_file

    run_dir, _ = run
    result = export(run_dir, tmp_path / "merged-bf16", merge=True, dtype="bf16")
    v = result.verification
    atol, rtol = MERGE_TOLERANCES[torch.bfloat16]
    assert v.dtype == "bf16" and v.tolerance == pytest.approx(atol + rtol * v.max_abs_logit)
    assert 0 < v.max_abs_diff <= v.tolerance
    weights = load_file(str(result.path / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_a_merge_that_fails_verification_writes_nothing(run, tmp_path, monkeypatch):
    import fullscale.export as export_module

    run_dir, _ = run
    monkeypatch.setitem(export_module.MERGE_TOLERANCES, torch.float32, (-1.0, 0.0))   # nothing can pass
    with pytest.raises(ExportError, match="merge verification failed"):
        export(run_dir, tmp_path / "merged", merge=True)
    assert list(tmp_path.iterdir()) == []                              # no output, no staging leftovers


def test_merging_into_a_quantized_base_is_refused_unless_asked(run, tmp_path, capsys):
    run_dir, base = run
    quantized = shutil.copytree(base, tmp_path / "base-4bit")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    code = main(["export", str(run_dir), "--merge", "--base", str(quantized), "--allow-base-mismatch",
                 "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "quantized" in err and "full-precision base" in err
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- adapter


def test_adapter_export_is_complete_and_gives_the_best_models_logits(run, tmp_path):
    from transformers import AutoTokenizer

    run_dir, base = run
    out = export(run_dir, tmp_path / "adapter").path
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "manifest.json"):
        assert (out / name).is_file(), name
    # The tokenizer and its chat template are the base's, byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).exists():
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.chat_template == AutoTokenizer.from_pretrained(base).chat_template

    enc = batch(tokenizer)
    assert torch.equal(logits(adapter_model(base, out), enc), logits(adapter_model(base, run_dir / "best_model"), enc))

    card = (out / "README.md").read_text()
    saved = json.loads((run_dir / "training_result.json").read_text())
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    for needle in (str(base), state["fingerprints"]["model"], state["fingerprints"]["train_data"],
                   f"best eval loss of the run | {saved['best_eval_loss']:.6g}", "steps trained in the run | 6",
                   "learning_rate: 0.02"):
        assert needle in card, needle
    assert json.loads((out / "manifest.json").read_text())["provenance"]["base_model"] == str(base)


def test_checkpoints_export_by_step_and_latest_with_the_bases_tokenizer(run, tmp_path):
    run_dir, base = run
    latest = export(run_dir, tmp_path / "latest", checkpoint="latest")
    step3 = export(run_dir, tmp_path / "step3", checkpoint=3)
    assert latest.source.step == 6 and step3.source.step == 3
    assert (step3.path / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    assert (step3.path / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert "step of this adapter | 3" in (step3.path / "README.md").read_text()


def test_export_is_byte_identical_when_repeated_and_refuses_to_overwrite_without_force(run, tmp_path, capsys):
    run_dir, _ = run
    for merge in (False, True):
        a = export(run_dir, tmp_path / f"a{merge}", merge=merge).path
        b = export(run_dir, tmp_path / f"b{merge}", merge=merge).path
        assert files(a) == files(b)
        code = main(["export", str(run_dir), "--out", str(a)] + (["--merge"] if merge else []))
        assert code == 2 and "--force" in capsys.readouterr().err
        export(run_dir, a, merge=merge, force=True)
        assert files(a) == files(b)
    # The API's export of the best model is the same export.
    import fullscale

    assert files(fullscale.export_best_model(run_dir, tmp_path / "c")) == files(tmp_path / "aFalse")


def test_an_export_never_replaces_the_run_itself(run, capsys):
    run_dir, _ = run
    code = main(["export", str(run_dir), "--out", str(run_dir / "best_model"), "--force"])
    assert code == 2 and "would overwrite the run" in capsys.readouterr().err


def test_a_base_with_other_weights_is_refused(run, tmp_path, capsys):
    from tiny import save_tiny_model

    run_dir, _ = run
    other = save_tiny_model(tmp_path / "other-base", seed=1)
    code = main(["export", str(run_dir), "--merge", "--base", str(other), "--out", str(tmp_path / "m")])
    assert code == 2 and "not the one this adapter was trained on" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors through the CLI


def test_a_run_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.yaml").write_text("max_steps: 6\n")
    proc = run_cli("export", empty, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "nothing to export" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_base_model_is_a_clear_error(run, tmp_path):
    run_dir, _ = run
    moved = shutil.copytree(run_dir, tmp_path / "run")
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["model_name_or_path"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = json.loads((moved / "best_model" / "manifest.json").read_text())
    manifest["provenance"]["base_model"] = str(tmp_path / "gone")
    (moved / "best_model" / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("export", moved, "--merge", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "gone" in proc.stderr and "is not found" in proc.stderr and "--base" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_corrupted_adapter_is_a_clear_error(run, tmp_path):
    run_dir, _ = run
    broken = shutil.copytree(run_dir, tmp_path / "run")
    for path in (broken / "best_model" / "adapter_model.safetensors",
                 broken / "checkpoint-3" / "adapter_model.safetensors"):
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF                                   # one flipped byte in the weights
        path.write_bytes(bytes(data))
    for extra in ([], ["--checkpoint", "3"]):
        proc = run_cli("export", broken, "--out", tmp_path / "out", *extra)
        assert proc.returncode == 2, proc.stderr
        assert "corrupted" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- use


def test_load_trained_model_from_a_run_with_or_without_merging(run):
    run_dir, base = run
    model, tokenizer = load_trained_model(None, run_dir)
    merged, _ = load_trained_model(None, run_dir, merge_adapter=True)
    assert type(merged).__name__ == "LlamaForCausalLM"
    enc = batch(tokenizer)
    reference = logits(adapter_model(base, run_dir / "best_model"), enc)
    assert torch.equal(logits(model, enc), reference)
    assert (logits(merged, enc) - reference).abs().max() < 1e-5
    explicit, _ = load_trained_model(str(base), run_dir / "best_model")
    assert torch.equal(logits(explicit, enc), reference)


def test_generate_from_a_merged_export_an_adapter_export_and_a_run(run, tmp_path, capsys):
    run_dir, _ = run
    merged = export(run_dir, tmp_path / "merged", merge=True).path
    adapter = export(run_dir, tmp_path / "adapter").path
    replies = []
    for target in (merged, adapter, run_dir):
        assert main(["generate", str(target), "--prompt", "rev abc:", "--max-new-tokens", "8"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] == replies[2]


# ----------------------------------------------------------------------------- portable exports


def test_an_export_with_a_base_id_loads_through_peft_where_the_base_lives_elsewhere(run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    run_dir, base = run
    out = export(run_dir, tmp_path / "portable", base_id="my-org/tiny-base").path
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/tiny-base"
    card = (out / "README.md").read_text()
    assert 'base_model: "my-org/tiny-base"' in card and 'from_pretrained("my-org/tiny-base")' in card
    assert f"base model used for the export | `{base}`" in card
    assert "--max-lora-rank 32" in card   # the default rank 32 is above vLLM's default limit of 16
    # Another machine: the base under its id in another layout (what a hub download resolves to).
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(base, elsewhere / "my-org" / "tiny-base")
    shutil.copytree(out, elsewhere / "adapter")
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained("adapter").eval()
    enc = batch(AutoTokenizer.from_pretrained("adapter"))
    assert torch.equal(logits(model, enc), logits(adapter_model(base, run_dir / "best_model"), enc))
    # Without --base-id the local path is recorded, and the export says so.
    result = export(run_dir, tmp_path / "local")
    assert result.base_id == str(base) and any("--base-id" in note for note in result.notes)


def test_push_to_hub_is_refused_before_any_work_without_network_or_token(run, tmp_path):
    run_dir, _ = run
    proc = run_cli("export", run_dir, "--out", tmp_path / "pushed", "--push-to-hub", "my-org/my-adapter")
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "pushed").exists()
    env_home = tmp_path / "hf-home"
    proc = subprocess.run([sys.executable, "-m", "fullscale", "export", str(run_dir), "--out", str(tmp_path / "pushed"),
                           "--push-to-hub", "my-org/my-adapter"], capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")},
                               "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "0", "HF_HOME": str(env_home)})
    assert proc.returncode == 2 and "no Hugging Face token" in proc.stderr
    assert not (tmp_path / "pushed").exists()


def test_an_fp16_merge_that_overflows_is_never_verified(tmp_path, tiny_model_dir, reverse_data):
    """A base whose logits pass fp16's 65504: the fp16 merge gives inf logits, which fail the check
    (the reference is the trained model in its fp32 training precision, never an inf tolerance);
    the same run merged in fp32 verifies."""
    from safetensors.torch import load_file, save_file

    from fullscale.config import load_config
    from fullscale.train import train

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    weights = load_file(str(base / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2e5    # logits of order 1e5
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = load_config(None, {
        "model_name_or_path": str(base), "train_file": str(reverse_data), "output_dir": str(tmp_path / "run"),
        "max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "eval_steps": 2,
        "save_steps": 2, "learning_rate": 1e-4, "report_to": "none", "eval_split": 0.1, "eval_samples": 0,
        "health_spike_action": "warn"})
    train(config)
    with pytest.raises(ExportError) as info:
        export(tmp_path / "run", tmp_path / "merged-fp16", merge=True, dtype="fp16")
    text = str(info.value)
    assert "not finite" in text and "65504" in text and "against the trained model in fp32" in text
    assert not (tmp_path / "merged-fp16").exists()
    result = export(tmp_path / "run", tmp_path / "merged-fp32", merge=True, dtype="fp32")
    assert result.verification.passed and result.verification.finite
