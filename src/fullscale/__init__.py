"""fullscale: the full-scale stage of LoRA fine-tuning, run so that nothing is lost."""

from fullscale.version import __version__  # noqa: F401


def train(config):
    """Run (or resume) training for a Config; returns the training result dict."""
    from fullscale.train import train as _train

    result = _train(config)
    return {k: v for k, v in result.items() if not k.startswith("_")}


def resume(run_dir):
    """Continue the run in `run_dir` with its saved config."""
    from fullscale.config import load_config
    from pathlib import Path

    config = load_config(Path(run_dir) / "config.yaml", {"output_dir": str(run_dir)})
    return train(config)


def load_trained_model(base_model_name, adapter_path, device="cpu", merge_adapter=False, **kwargs):
    """(model, tokenizer) of a trained adapter, a merged export or a run's best model; see fullscale.export."""
    from fullscale.export import load_trained_model as _load

    return _load(base_model_name, adapter_path, device=device, merge_adapter=merge_adapter, **kwargs)


def export_best_model(run_dir, out_dir, *, force=False):
    """Export a run's best adapter with its tokenizer and model card to `out_dir`; returns the path."""
    from fullscale.export import export_best_model as _export

    return _export(run_dir, out_dir, force=force)


def __getattr__(name):
    if name == "CheckpointManager":
        from fullscale.checkpoint import CheckpointManager

        return CheckpointManager
    if name in ("Config", "load_config"):
        from fullscale import config

        return getattr(config, name)
    raise AttributeError(name)
