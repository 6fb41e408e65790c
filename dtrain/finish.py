"""export.on_finish: when a run finishes (reaches its last step; not when it stops for a preemption), rank 0 turns
the final checkpoint into `<output_dir>/<kind>` with the same code as `dtrain export`:

- adapter: lora/qlora, a PEFT adapter folder (with the tokenizer and the chat template the data was built with);
- merged:  lora/qlora, base + adapter merged into a standard model folder;
- hf:      full, the ZeRO shards consolidated into a standard model folder.

Rank 0 can: checkpoints are on storage every node sees, and export needs no process group, so it runs after the
process group is gone (dtrain.train), while the other ranks exit. The export is staged
and renamed (dtrain.export.export_checkpoint), so `<output_dir>/<kind>` is absent or complete; a finished run
started again writes it anew.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def export_on_finish(cfg, kind: str) -> Path:
    """Export the newest complete checkpoint (the final one) as `kind`; returns the folder written."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dtrain.checkpoint import complete_checkpoints
    from dtrain.export import export_checkpoint
    from dtrain.strategies.protocol import ExportOptions

    # The training model's ZeRO-3 registration would make transformers partition the models export builds, with
    # collectives this lone rank cannot run: export is a plain single-process job.
    unset_hf_deepspeed_config()
    out = Path(cfg.output_dir) / kind
    shutil.rmtree(out, ignore_errors=True)  # ours, from an earlier finish of this run
    (result,) = export_checkpoint(complete_checkpoints(cfg.checkpoint_dir)[-1], {kind: out}, ExportOptions())
    return result.out
