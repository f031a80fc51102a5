"""Export a run's adapter or merged model, verified; load a trained model back.

An export is only worth what a user can load elsewhere, so every export is complete and checked:

- Source: a run's ``best_model/``, its newest checkpoint or a given step, verified against its
  manifest (a corrupted adapter is an error, never exported).
- Base: read from the run (config.yaml, provenance) and compared by fingerprint with the base the
  run trained on, so an adapter is never merged into (or shipped for) other weights.
- Adapter export: adapter weights and config, the base's tokenizer files byte for byte (chat
  template included), its generation config, and a README.md model card with provenance.
- Merged export (``merge=True``): base in the chosen dtype + adapter, ``merge_and_unload``, saved
  with ``save_pretrained`` so plain transformers loads it. Then VERIFIED: the saved model is loaded
  back and its logits on held-out examples are compared with the unmerged adapter model's; a
  difference beyond MERGE_TOLERANCES fails the export.
- Writing: a staging directory renamed into place (``commit_directory``), so a failure leaves
  nothing half-written; an existing directory is replaced only with ``force``; the same export
  twice gives byte-identical files (no timestamps anywhere).

`load_trained_model()` is the Python entry point for using the result (adapter or merged, from a
run directory, best_model/, an export, a checkpoint or a merged directory).

The modules: source (the adapter and its base, checked), verify (the merge and its verification),
card (provenance, the model card), write (the export itself, what --force may replace, the push),
load (load_trained_model).
"""

from fullscale.export.source import (  # noqa: F401
    DTYPES,
    DTYPE_NAMES,
    ADAPTER_FILES,
    ExportError,
    Source,
    resolve_source,
    source_from_dir,
    resolve_base,
    quantization_of,
    resolve_dtype,
)
from fullscale.export.verify import (  # noqa: F401
    MERGE_TOLERANCES,
    VERIFY_MAX_EXAMPLES,
    VERIFY_MAX_TOKENS,
    VERIFY_BATCH_SIZE,
    FIXED_TEXTS,
    Verification,
    verification_batches,
)
from fullscale.export.card import (  # noqa: F401
    provenance,
    model_card,
)
from fullscale.export.write import (  # noqa: F401
    CARD,
    ExportResult,
    export,
    export_best_model,
    EXPORT_KIND,
    is_export,
    recover_export,
    check_push,
    push,
    hub_id_of,
)
from fullscale.export.load import (  # noqa: F401
    load_trained_model,
)
