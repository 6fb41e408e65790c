"""export.on_finish: when a run finishes (reaches its last step; not when it stops for a preemption), rank 0 turns
the final checkpoint into `<output_dir>/<kind>` with the same code as `dtrain export`:

- adapter: lora/qlora, a PEFT adapter folder (with the tokenizer and the chat template the data was built with);
- merged:  lora/qlora, base + adapter merged into a standard model folder;
- hf:      full, the ZeRO shards consolidated into a standard model folder.

Rank 0 can: checkpoints are on storage every node sees, and export needs no process group. It writes a temporary
folder and renames it, so `<output_dir>/<kind>` is either absent or complete, and a finished run that is started
again replaces it instead of failing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ON_FINISH = ("none", "adapter", "merged", "hf")


def on_finish_kind(cfg) -> str:
    # Until the config has export.on_finish (issue 14, after the config restructure lands).
    return getattr(getattr(cfg, "export", None), "on_finish", "none")


def export_on_finish(cfg, kind: str) -> Path:
    """Export the newest complete checkpoint (the final one) as `kind`; returns the folder written."""
    from dtrain import export
    from dtrain.checkpoint import complete_checkpoints

    checkpoint = complete_checkpoints(cfg.checkpoint_dir)[-1]

    out = Path(cfg.output_dir) / kind
    tmp = out.with_name(f".tmp-{kind}")
    shutil.rmtree(tmp, ignore_errors=True)
    write = {"adapter": export.export_adapter, "merged": export.export_merged, "hf": export.export_hf}[kind]
    write(checkpoint, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
