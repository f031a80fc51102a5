"""The commands about a run and its results: configs, checkpoints, status, report, export, generate."""

from __future__ import annotations

import sys
from pathlib import Path

from fullscale.cli.registry import EXIT_OK, command, hub_id, positive_int


def _configs_parser(p):
    p.add_argument("names", nargs="*", help="configs to copy (e.g. llama-8b-lora.yaml accelerate/fsdp.yaml), or all")
    p.add_argument("--out", default=".", help="the directory to copy them into (default: here)")


@command("configs", "list the example configs shipped with fullscale, or copy them: fullscale configs [NAME ... | all] "
                    "[--out DIR]", _configs_parser)
def cmd_configs(args) -> int:
    import shutil

    from fullscale.errors import ConfigError

    root = Path(__file__).parent.parent / "configs"
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

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory: {run_dir}")
    limit = None
    if (run_dir / "config.yaml").is_file():
        import yaml

        limit = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("save_total_limit")
    manager = CheckpointManager(run_dir, save_total_limit=limit)
    lock = None
    if args.prune:
        # The run's own lock, held for the whole prune: no run can start (or be running) while the
        # checkpoints change; one that holds it refuses the prune.
        from fullscale import rundir

        if not rundir.is_run_dir(run_dir):
            raise CheckpointError(f"{run_dir} is not a fullscale run directory; --prune only changes a run's own "
                                  "checkpoints")
        try:
            lock = rundir.RunLock(run_dir).acquire()
        except rundir.RunLockedError as exc:
            raise CheckpointError(f"{exc}. --prune changes the run's checkpoints, so run it once that run has "
                                  "stopped") from None
    try:
        return _list_checkpoints(args, run_dir, manager, limit)
    finally:
        if lock is not None:
            lock.release()


def _list_checkpoints(args, run_dir: Path, manager, limit) -> int:
    from fullscale.units import format_size

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
    p.add_argument("--base-id", metavar="ORG/NAME", type=hub_id,
                   help="the base's hub id to record in adapter_config.json and the card, so the export loads on "
                        "other machines (default: the base's own _name_or_path when it is a hub id, else its path)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", type=hub_id,
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
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
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


