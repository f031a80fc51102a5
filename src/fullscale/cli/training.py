"""The commands that train: train, resume, prepare (the data alone), plan (before launch)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fullscale.cli.registry import EXIT_FAILURE, EXIT_OK, command, positive_int


# ----------------------------------------------------------------------------- train / resume

def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (none: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="key=value settings applied after the file")
    p.add_argument("--help-keys", action="store_true", help="list every config key with its default and exit")


def _split_config_arg(args) -> tuple[str | None, list[str]]:
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return config, overrides


@command("train", "train (or resume) a LoRA adapter: fullscale train [CONFIG.yaml] [key=value ...]", _train_parser)
def cmd_train(args) -> int:
    from fullscale.config import describe_keys

    if args.help_keys:
        print(describe_keys())
        return EXIT_OK
    config, is_demo = _load_train_config(args)
    if is_demo:
        print("fullscale demo: a tiny Llama base (pretrained by scripts/build_demo_base.py on a generated corpus, "
              "shipped with the package) learns the demo task with LoRA; no network needed.")
    return _run_training(config, demo=is_demo)


def _load_train_config(args):
    """(config, is_demo). The demo's settings apply only when the user names neither a model nor
    data (no CONFIG file, no model_name_or_path or train_file override); otherwise the documented
    defaults, and both a model and a train_file must be given."""
    from fullscale.config import load_config, parse_overrides
    from fullscale.errors import ConfigError

    path, overrides = _split_config_arg(args)
    given = parse_overrides(overrides)
    if path is None and "model_name_or_path" not in given and "train_file" not in given:
        from fullscale.demo import demo_settings

        return load_config(None, overrides, base=demo_settings()), True
    config = load_config(path, overrides)
    missing = [k for k in ("model_name_or_path", "train_file") if not getattr(config, k)]
    if missing:
        where = {k: ("empty on the command line (an unset shell variable?)" if k in given else
                     f"not set in {path}" if path else "not given") for k in missing}
        raise ConfigError([f"{k}: {where[k]}; a run of your own needs both model_name_or_path and train_file "
                           "(the embedded demo runs only with no config file and neither key)" for k in missing],
                          source=str(path) if path else None)
    return config, False


def _resume_parser(p):
    p.add_argument("run_dir")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the base model's custom modelling code (never read from the run's config.yaml)")


@command("resume", "continue a run with its saved config: fullscale resume RUN_DIR", _resume_parser)
def cmd_resume(args) -> int:
    from fullscale.config import load_config
    from fullscale.errors import CheckpointError

    run_dir = Path(args.run_dir)
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        raise CheckpointError(f"{run_dir} is not a fullscale run directory (no config.yaml); "
                              "give the output_dir of a run started with fullscale train")
    # trust_remote_code comes from this command line, never from a file in the run directory.
    config = load_config(cfg, {"output_dir": str(run_dir), "resume": "auto",
                               "trust_remote_code": bool(args.trust_remote_code)})
    return _run_training(config, demo=False)


class _SurvivingStream:
    """stdout/stderr that outlive their reader: when a pipe's reader is gone (`| tee` killed by the
    same Ctrl-C), output is dropped instead of raising BrokenPipeError into the save that follows."""

    def __init__(self, stream):
        self._stream = stream
        self._broken = False

    def write(self, text):
        if not self._broken:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, OSError):
                self._break()
        return len(text)

    def flush(self):
        if not self._broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, OSError):
                self._break()

    def _break(self):
        self._broken = True
        try:   # interpreter shutdown flushes the real stream too: point it at /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run_training(config, *, demo: bool) -> int:
    from fullscale.train import train

    from fullscale.preemption import EXIT_PREEMPTED

    if not isinstance(sys.stdout, _SurvivingStream):
        sys.stdout, sys.stderr = _SurvivingStream(sys.stdout), _SurvivingStream(sys.stderr)
    result = train(config)
    if result["stop_reason"] == "preempted":
        return EXIT_PREEMPTED
    if result["stop_reason"] == "health_abort":
        print(f"fullscale: stopped by a health check at step {result['total_steps']}; the diagnostic is above and "
              f"in {Path(result['config']['output_dir']) / 'metrics.jsonl'} (event health_abort). The last checkpoint "
              "holds the state before the bad update", file=sys.stderr)
        return EXIT_FAILURE
    if demo:
        _show_demo_generations(result)
    return EXIT_OK


def _show_demo_generations(result) -> None:
    """Greedy generations of the best model on a few held-out demo rows, next to the answers."""
    import json

    import peft
    import safetensors.torch

    from fullscale.demo import DEMO_TRAIN
    from fullscale.generate import generate_reply

    if int(os.environ.get("RANK", "0")) != 0:
        return
    data, model, tokenizer = result["_data"], result["_model"], result["_tokenizer"]
    model = getattr(model, "module", model)  # unwrapped from DDP
    from fullscale.sharding import is_sharded
    from fullscale.zero import is_partitioned

    if is_sharded(model) or is_partitioned(model):
        return   # generation needs the whole model on one process
    run_dir = Path(result["config"]["output_dir"])
    best = run_dir / "best_model" / "adapter_model.safetensors"
    if not data.eval or not best.exists():
        return
    if int(os.environ.get("RANK", "0")) != 0:
        return
    peft.set_peft_model_state_dict(model, safetensors.torch.load_file(str(best)))
    rows = DEMO_TRAIN.read_text().splitlines()
    print("\ngenerations from best_model/ on held-out rows:")
    for ex in data.eval[:4]:
        messages = json.loads(rows[ex["row"] - 1])["messages"]
        prompt = [m for m in messages if m["role"] != "assistant"][:1]
        expected = next(m["content"] for m in messages if m["role"] == "assistant")
        got = generate_reply(model, tokenizer, prompt, max_new_tokens=48)
        mark = "ok " if got == expected else "   "
        print(f"  {mark}{prompt[0]['content']!r}\n      model:    {got!r}\n      expected: {expected!r}")


@command("prepare", "tokenize a config's data ahead of time into the token store and print the data report: "
                    "fullscale prepare CONFIG.yaml [key=value ...]", _train_parser)
def cmd_prepare(args) -> int:
    """The data part of `fullscale train`, alone (e.g. on a CPU node before a GPU job): the run then
    opens the token store in seconds."""
    from fullscale.data import cache_dir, prepare_for
    from fullscale.data.prepare import check_invalid_share
    from fullscale.model import load_tokenizer

    config, _ = _load_train_config(args)
    data = prepare_for(config, load_tokenizer(config))
    for line in data.messages:
        print(line)
    check_invalid_share(data, config)
    tokens = data.train_stats.num_tokens + (data.eval_stats.num_tokens if data.eval_stats else 0)
    print(f"prepared: {len(data.train):,} train / {len(data.eval or []):,} eval examples, {tokens:,} tokens; "
          f"`fullscale train` with the same data, tokenizer and data settings opens the store "
          f"({cache_dir() or 'FULLSCALE_CACHE is off: nothing stored'})")
    return EXIT_OK


# ----------------------------------------------------------------------------- plan

def _plan_parser(p):
    p.add_argument("config", nargs="?", help="YAML config file (none: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="key=value settings applied after the file")
    p.add_argument("--probe", action="store_true",
                   help="load the model and time a few real steps of the longest batch on this device")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--target-batch", type=positive_int,
                   help="effective batch to recommend settings for (default: per_device x processes x accumulation)")
    p.add_argument("--num-processes", type=positive_int,
                   help="processes (one per GPU) the run will use (default: the accelerate config's, WORLD_SIZE, "
                        "else 1)")
    p.add_argument("--accelerate-config", metavar="FILE",
                   help="the accelerate launch --config_file of the run (configs/accelerate/*.yaml): its FSDP or "
                        "DeepSpeed sharding and offload, and its process count")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="device to plan for (auto: cuda when available, else cpu; cuda without a GPU needs "
                        "memory_budget_gb)")


@command("plan", "memory per device, time and disk before launch, and settings that fit: "
                 "fullscale plan CONFIG.yaml [key=value ...] [--probe] [--json]", _plan_parser)
def cmd_plan(args) -> int:
    import json

    from fullscale.errors import ConfigError
    from fullscale.plan import build_plan, format_plan, probe

    path, _ = _split_config_arg(args)
    config, _ = _load_train_config(args)
    sharding, launch_processes = None, None
    if args.accelerate_config:
        from fullscale.plan import Sharding

        sharding, launch_processes = Sharding.from_accelerate_config(args.accelerate_config)
    num_processes = args.num_processes or launch_processes or int(os.environ.get("WORLD_SIZE", "1"))
    plan = build_plan(config, num_processes=num_processes, device=None if args.device == "auto" else args.device,
                      target_batch=args.target_batch, config_source=path or "demo", sharding=sharding)
    if args.probe:
        if plan.fits:
            plan.timing = probe(config, plan, device=plan.device)
        else:
            plan.notes.append("no probe: the current settings do not fit (probe the recommended ones)")
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else format_plan(plan))
    if not plan.fits:
        raise ConfigError(plan.refusal())
    return EXIT_OK


