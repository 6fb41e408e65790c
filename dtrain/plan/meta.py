"""Parameter counts of any AutoModelForCausalLM family, from the model built on the meta device (no weights, no
memory). The memory formulas of dtrain.plan.shape stay limited to the families they were validated on; for any other
family these counts are what plan can say, and check / submit report the memory as not estimated."""

from __future__ import annotations

from dtrain import strategies


def meta_counts(cfg) -> tuple[int, int]:
    """(parameters, trainable parameters) of the run's model; a tied lm_head is counted once."""
    from dtrain.strategies.loading import meta_model

    base = meta_model(cfg.model.local_dir(), cfg.model.trust_remote_code)
    total = sum(p.numel() for p in base.parameters())
    if "adapter" not in strategies.get(cfg.strategy).export_kinds:
        return total, total
    from dtrain.strategies.peft_adapters import meta_peft_model

    return total, sum(p.numel() for p in meta_peft_model(cfg).parameters() if p.requires_grad)


def not_estimated(cfg) -> str | None:
    """Why plan has no memory formulas for this model (None when it has), with what it could count."""
    from dtrain.plan.shape import load_model_shape

    try:
        load_model_shape(cfg.model.local_dir())
    except ValueError as e:
        total, trainable = meta_counts(cfg)
        return f"{e}; counted on the meta device: {total:,} parameters, {trainable:,} trainable with {cfg.strategy}"
    return None
