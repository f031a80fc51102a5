"""The command line: one registry of subcommands, each an add_parser() and a run(args) -> exit code.

Bad input (config, data, model files, checkpoints) is one short paragraph on stderr and exit
code 2, never a traceback (`--debug` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from fullscale.errors import UserError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

COMMANDS: dict[str, tuple] = {}   # name -> (help, run(args) -> exit code, add_arguments(parser))


def command(name: str, help: str, arguments):
    """Register a subcommand: its help line, its arguments (a function adding them to its parser)
    and the decorated run(args) -> exit code."""
    def register(fn):
        COMMANDS[name] = (help, fn, arguments)
        return fn
    return register


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


def _configs_parser(p):
    p.add_argument("names", nargs="*", help="configs to copy (e.g. llama-8b-lora.yaml accelerate/fsdp.yaml), or all")
    p.add_argument("--out", default=".", help="the directory to copy them into (default: here)")


@command("configs", "list the example configs shipped with fullscale, or copy them: fullscale configs [NAME ... | all] "
                    "[--out DIR]", _configs_parser)
def cmd_configs(args) -> int:
    import shutil

    from fullscale.errors import ConfigError

    root = Path(__file__).parent / "configs"
    shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    if not args.names:
        for name in shipped:
            first = (root / name).read_text().splitlines()[0] if name.endswith(".yaml") else ""
            print(f"{name:<40} {first.lstrip('# ').strip() if first.startswith('#') else ''}")
        print("copy with: fullscale configs NAME ... --out DIR (or all); relative paths in a config are relative to it")
        return EXIT_OK
    wanted = shipped if args.names == ["all"] else list(args.names)
    unknown = [n for n in wanted if n not in shipped]
    if unknown:
        raise ConfigError(f"no shipped config {unknown[0]!r}; `fullscale configs` lists them ({', '.join(shipped)})")
    if any("/" not in n and n.endswith(".yaml") for n in wanted):   # a training config's example data
        wanted += [n for n in shipped if n.startswith("data/") and n not in wanted]
    out = Path(args.out)
    taken = [str(out / n) for n in wanted if (out / n).exists()]
    if taken:
        raise ConfigError(f"{taken[0]} exists; fullscale never overwrites your files: choose another --out or move it")
    for name in wanted:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, out / name)
        print(f"wrote {out / name}")
    return EXIT_OK


@command("prepare", "tokenize a config's data ahead of time into the token store and print the data report: "
                    "fullscale prepare CONFIG.yaml [key=value ...]", _train_parser)
def cmd_prepare(args) -> int:
    """The data part of `fullscale train`, alone (e.g. on a CPU node before a GPU job): the run then
    opens the token store in seconds."""
    from fullscale.data import cache_dir, prepare_for
    from fullscale.model import load_tokenizer
    from fullscale.train import check_invalid_share

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


# ----------------------------------------------------------------------------- checkpoints

def _checkpoints_parser(p):
    p.add_argument("run_dir")
    p.add_argument("--verify", action="store_true", help="check every file against the manifest (sizes and hashes)")
    p.add_argument("--prune", action="store_true", help="set aside invalid checkpoints and apply save_total_limit")


@command("checkpoints", "list a run's checkpoints: step, eval loss, size, validity, best, latest",
         _checkpoints_parser)
def cmd_checkpoints(args) -> int:
    from fullscale.checkpoint import CheckpointManager
    from fullscale.errors import CheckpointError
    from fullscale.units import format_size

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory: {run_dir}")
    limit = None
    if (run_dir / "config.yaml").is_file():
        import yaml

        limit = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("save_total_limit")
    manager = CheckpointManager(run_dir, save_total_limit=limit)
    if args.prune:
        from fullscale import rundir

        holder = rundir.holder(run_dir)
        if holder is not None:
            raise CheckpointError(f"{run_dir} is in use by process {holder.get('pid')} on host {holder.get('host')}; "
                                  "--prune changes the run's checkpoints, so run it once that run has stopped")
    infos = manager.list(verify=args.verify)
    best = manager.best_step()
    latest = manager.latest()
    if args.prune:
        for info in infos:
            if info.valid is False:
                moved = manager.set_aside(info)
                print(f"set aside checkpoint-{info.step} ({info.reason}) as {moved.name}")
        removed = manager.rotate(best_step=best)
        if removed:
            print(f"removed checkpoints at steps {removed} (save_total_limit={limit}, best kept)")
        infos = manager.list(verify=args.verify)
    if not infos:
        print(f"{run_dir}: no checkpoints")
        return EXIT_OK
    print(f"{'step':>8}  {'eval_loss':>9}  {'size':>9}  {'valid':<8}  notes")
    for info in infos:
        valid = {True: "yes", False: "NO", None: "unverified"}[info.valid]
        notes = []
        if info.step == best:
            notes.append("best")
        if latest and info.step == latest.step:
            notes.append("latest")
        if info.reason:
            notes.append(info.reason)
        loss = f"{info.eval_loss:.4f}" if isinstance(info.eval_loss, float) else "-"
        print(f"{info.step:>8}  {loss:>9}  {format_size(info.size):>9}  {valid:<8}  {', '.join(notes)}")
    print(f"total disk use of {run_dir}: {format_size(manager.disk_usage())}")
    return EXIT_OK


# ----------------------------------------------------------------------------- status / report

def _status_parser(p):
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")


@command("status", "where a run stands (live or finished): progress, ETA, losses, checkpoints, health",
         _status_parser)
def cmd_status(args) -> int:
    from fullscale.status import collect_status, format_status, to_json

    status = collect_status(args.run_dir)
    print(to_json(status) if args.json else format_status(status))
    return EXIT_OK


def _report_parser(p):
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--log-loss", action="store_true", help="draw the loss on a log axis (late-run gaps show)")


@command("report", "write a self-contained HTML report with plots: fullscale report RUN_DIR [--out FILE]",
         _report_parser)
def cmd_report(args) -> int:
    from fullscale.report import build_report

    path = build_report(args.run_dir, out=args.out, log_loss=args.log_loss)
    print(f"wrote {path}")
    return EXIT_OK


# ----------------------------------------------------------------------------- export / generate

def _export_parser(p):
    p.add_argument("run_dir", help="the run directory (output_dir of fullscale train)")
    p.add_argument("--out", required=True, help="the directory to write (staged, then renamed into place)")
    p.add_argument("--checkpoint", default="best",
                   help="best (best_model/, else the best checkpoint), latest, or a step number (default best)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into the base and save a plain transformers model, verified against "
                        "the adapter model")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="dtype of the merge (auto: the dtype the run trained in)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--base", help="the base model directory, when it is no longer where the run recorded it "
                                  "(checked by fingerprint)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="accept a base whose files differ from the one the run trained on")
    p.add_argument("--allow-quantized-merge", action="store_true",
                   help="merge into a quantized base anyway (lossy; merge into the full-precision base instead)")
    p.add_argument("--device", default="auto", help="device for the merge and its verification (auto: cuda if "
                                                    "available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the base model's custom modelling code (only if you trust it; never read from the run)")
    p.add_argument("--base-id", metavar="ORG/NAME",
                   help="the base's hub id to record in adapter_config.json and the card, so the export loads on "
                        "other machines (default: the base's own _name_or_path when it is a hub id, else its path)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME",
                   help="upload the export to this Hugging Face repository (needs a token and network)")


@command("export", "export a run's adapter or merged model, verified: fullscale export RUN_DIR --out DIR [--merge]",
         _export_parser)
def cmd_export(args) -> int:
    from fullscale.export import check_push, export, push

    if args.push_to_hub:
        check_push(args.push_to_hub)   # refused before any work: offline, or no token
    result = export(args.run_dir, args.out, checkpoint=args.checkpoint, merge=args.merge, dtype=args.dtype,
                    force=args.force, base=args.base, allow_base_mismatch=args.allow_base_mismatch,
                    allow_quantized_merge=args.allow_quantized_merge, device=args.device,
                    trust_remote_code=args.trust_remote_code, base_id=args.base_id, say=print)
    s, what = result.source, result.source.describe()
    for note in result.notes:
        print(f"note: {note}")
    if result.merged:
        print(f"merged {what} into a copy of the base {s.base} in {result.dtype} (the base is unchanged)")
        print(f"verified: {result.verification.describe()}")
        print(f"wrote {result.path}: loads with transformers AutoModelForCausalLM.from_pretrained (no peft needed); "
              f"try: fullscale generate {result.path} --prompt \"...\"")
    else:
        print(f"exported the adapter of {what} (base {s.base})")
        print(f"wrote {result.path}: adapter, tokenizer and chat template, generation config, README.md; "
              f"try: fullscale generate {result.path} --prompt \"...\"")
    print(f"base recorded as {result.base_id}")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{push(result.path, args.push_to_hub)}")
    return EXIT_OK


def _generate_parser(p):
    p.add_argument("model", help="a merged model directory, an adapter export or best_model/, or a run directory")
    p.add_argument("--prompt", action="append", required=True,
                   help="the user message (through the chat template when the model has one); repeat for several")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's custom modelling code (only if you trust it; never read from the export)")
    p.add_argument("--base", help="the base model of an adapter (default: read from the run or the export)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")


@command("generate", "greedy generations from a model, an adapter or a run's best model: "
                     "fullscale generate MODEL_OR_RUN_DIR --prompt TEXT", _generate_parser)
def cmd_generate(args) -> int:
    from fullscale.generate import generate_from

    replies, used = generate_from(args.model, args.prompt, base=args.base, max_new_tokens=args.max_new_tokens,
                                  device=args.device, trust_remote_code=args.trust_remote_code)
    print(f"prompt format: {used}", file=sys.stderr)
    for prompt, reply in zip(args.prompt, replies):
        if len(args.prompt) > 1:
            print(f"> {prompt}")
        print(reply)
    return EXIT_OK


# ----------------------------------------------------------------------------- plan

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _plan_parser(p):
    p.add_argument("config", nargs="?", help="YAML config file (none: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="key=value settings applied after the file")
    p.add_argument("--probe", action="store_true",
                   help="load the model and time a few real steps of the longest batch on this device")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--target-batch", type=_positive_int,
                   help="effective batch to recommend settings for (default: per_device x processes x accumulation)")
    p.add_argument("--num-processes", type=_positive_int,
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


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fullscale", description="Full-scale LoRA fine-tuning that survives crashes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _, arguments) in COMMANDS.items():
        arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """End a process of a multi-process launch without the interpreter's teardown: with the process
    group's threads still around, that teardown can abort ("terminate called without an active
    exception", SIGABRT) after the run's work is done and saved, turning a finished run into a
    failed launch. Everything is flushed first; the group is left cleanly."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _quiet_libraries(load_models=args.command not in READS_FILES_ONLY)
    _, run, _ = COMMANDS[args.command]
    from fullscale.preemption import EXIT_PREEMPTED, StartupInterrupted

    try:
        return run(args)
    except StartupInterrupted as exc:
        print(f"fullscale: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fullscale: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fullscale: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# Commands that only read a run's files: they never import torch or transformers (status < 1 s).
READS_FILES_ONLY = ("status", "report", "checkpoints", "configs")


def _quiet_libraries(*, load_models: bool = True) -> None:
    import warnings

    # Deprecation notices of renamed library functions are for library authors, not users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not load_models:
        return
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate and peft when installed) would pick the CPU itself and
        # print a warning about it on every command; the same choice, without the warning.
        os.environ["DS_ACCELERATOR"] = "cpu"
