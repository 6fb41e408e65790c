"""eval.retention: what the fine-tune cost the base, as the loss on general-domain data and its drift from step 0.

The step-0 losses (the base model, before any update) are measured once per run and stored in every checkpoint's
trainer_state.json (`Progress.retention_baseline`): a resumed run reports drift from the same baseline and its
curves continue where they stopped. A set added to the config after the run started has no baseline (the base is
gone by then): its loss is logged, its drift is not.
"""

from __future__ import annotations


def retention_scalars(losses: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """`<name>/loss` for every set, `<name>/drift` (loss - step-0 loss) for those with a baseline."""
    scalars = {}
    for name, loss in losses.items():
        scalars[f"{name}/loss"] = loss
        if name in baseline:
            scalars[f"{name}/drift"] = loss - baseline[name]
    return scalars


def summary_lines(
    step: int, eval_loss: float | None, losses: dict[str, float], baseline: dict[str, float]
) -> list[str]:
    """The end-of-run lines: the task eval loss and each retention set's drift since step 0."""
    lines = [f"eval loss {eval_loss:.4f} at step {step}"] if eval_loss is not None else []
    for name, loss in losses.items():
        if name in baseline:
            drift = loss - baseline[name]
            lines.append(
                f"retention {name}: loss {loss:.4f} at step {step}, {baseline[name]:.4f} at step 0 (drift {drift:+.4f})"
            )
        else:
            lines.append(f"retention {name}: loss {loss:.4f} at step {step} (no step-0 baseline)")
    return lines
