"""What the HF TrainingArguments mean, said once for the rules and the replay (stdlib only)."""
from __future__ import annotations


def best_metric_name(args: dict | None) -> str | None:
    """The metric the Trainer compares for the best checkpoint, named as in the eval metrics (HF's rule:
    ``load_best_model_at_end`` without ``metric_for_best_model`` means ``loss``; an ``eval_`` prefix is added).
    The one resolution of ``metric_for_best_model``: pass ``run.args`` for a run."""
    if not args:
        return None
    m = args.get("metric_for_best_model")
    if m is None and args.get("load_best_model_at_end"):
        m = "loss"
    if not m:
        return None
    return str(m) if str(m).startswith("eval_") else f"eval_{m}"
