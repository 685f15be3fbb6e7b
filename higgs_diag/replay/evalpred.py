"""Will this run produce ``eval_loss``? transformers' decision (4.45-4.46, FACTS §2) reproduced from the logged
``args``, the model class the checkpoint implies and the keys of the batch. No torch, no transformers.

``Trainer.__init__``: ``label_names = args.label_names or find_labels(model.__class__)`` (every forward parameter
whose name contains "label"; for QuestionAnswering classes also start/end_positions) and ``can_return_loss``
(a ``return_loss=True`` forward parameter: none of the classes here has one).
``prediction_step``: ``has_labels = bool(label_names) and all(inputs.get(k) is not None for k in label_names)``;
``loss_without_labels = not label_names and return_loss``; only then is ``compute_loss`` called, otherwise the
loss is ``None`` and the model is called as ``model(**inputs)`` for logits. ``evaluation_loop`` writes
``eval_loss`` only when some loss was collected.
"""
from __future__ import annotations

from typing import Any

from ..hf_args import best_metric_name
from ..evidence import EvalPrediction

HIGGS_LABELS = ["label_ids", "label_audio_ids"]
# transformers.utils.find_labels(cls) for the classes a Higgs checkpoint implies (checked against the real
# classes in tests/test_replay_eval.py).
DEFAULT_LABEL_NAMES: dict[str, list[str]] = {
    "HiggsAudioModel": list(HIGGS_LABELS),
    "PeftModel": [],
    "PeftModelForCausalLM": ["labels"],
    "PeftModelForSeq2SeqLM": ["labels"],
    "PeftModelForSequenceClassification": ["labels"],
    "PeftModelForTokenClassification": ["labels"],
    "PeftModelForQuestionAnswering": ["start_positions", "end_positions"],
    "PeftModelForFeatureExtraction": [],
    "wrapper": [],  # a wrapper nn.Module with forward(**kwargs), as community trainers write it
}
# PEFT classes whose forward passes `labels=` on to the base model: HiggsAudioModel.forward has no such parameter
PASSES_LABELS = {"PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
                 "PeftModelForTokenClassification"}
LABEL_FIX = 'label_names=["label_ids", "label_audio_ids"]'


def predict_eval_loss(args: dict[str, Any] | None, model_class: str, batch_keys: list[str],
                      base_model_class: str = "HiggsAudioModel") -> EvalPrediction:
    """Reproduce the Trainer's decision. ``args``: the logged TrainingArguments (None when unknown)."""
    arg_names = (args or {}).get("label_names")
    default = DEFAULT_LABEL_NAMES.get(model_class)
    assumptions: list[str] = []
    if model_class == "wrapper":
        assumptions.append("the checkpoint was written by a wrapper nn.Module; assumed its forward is "
                           "forward(**kwargs), as community wrappers write it (label arguments named in its forward "
                           "would become the default label_names)")
    if default is None:
        default = []
        assumptions.append(f"find_labels of {model_class} not known; assumed []")
    if args is None:
        assumptions.append("no logged TrainingArguments (no run found): label_names assumed unset")
    label_names = list(arg_names) if arg_names else list(default)  # `args.label_names or find_labels(...)`
    source = "args" if arg_names else f"default of {model_class}"
    keys = sorted(batch_keys)
    missing = [k for k in label_names if k not in keys]
    has_labels = bool(label_names) and not missing
    return_loss = False  # can_return_loss: no `return_loss=True` forward parameter in any of these classes
    loss_without_labels = not label_names and return_loss
    computes = has_labels or loss_without_labels
    raises = None
    if model_class in PASSES_LABELS and base_model_class == "HiggsAudioModel" and not computes:
        raises = (f"TypeError: HiggsAudioModel.forward() got an unexpected keyword argument 'labels' (prediction_step "
                  f"calls model(**inputs), and {model_class}.forward passes labels= to the base model)")
    strategy = (args or {}).get("eval_strategy", (args or {}).get("evaluation_strategy"))
    configured = None if args is None else str(strategy).lower() not in ("no", "intervalstrategy.no", "none")
    best = best_metric_name(args)
    pred = EvalPrediction(produced=None if raises else computes, model_class=model_class, label_names=label_names,
                          label_names_from=source, batch_keys=keys, has_labels=has_labels,
                          loss_without_labels=loss_without_labels, missing_keys=missing, raises=raises,
                          evaluation_configured=configured, best_metric=best, assumptions=assumptions)
    if computes:
        pred.reason = (f"label_names={label_names} ({source}) are all in the batch, so prediction_step calls "
                       f"compute_loss and evaluation logs eval_loss")
        if model_class in PASSES_LABELS:
            pred.assumptions.append(f"the trainer's compute_loss does not call {model_class}.forward (which would "
                                    f"pass labels= to HiggsAudioModel.forward); training logged a loss, so it bypasses it")
        return pred
    if not label_names:
        pred.reason = (f"label_names is [] ({source}: no forward parameter of {model_class} contains 'label') and "
                       f"the model cannot return a loss without labels (can_return_loss=False), so prediction_step "
                       f"never calls compute_loss: no eval_loss")
    else:
        pred.reason = (f"label_names={label_names} ({source}) but the batch has no {', '.join(missing)} "
                       f"(it has {', '.join(keys)}), so has_labels is False and prediction_step computes no loss: "
                       f"no eval_loss")
    if raises:
        pred.reason += f"; worse, evaluation raises {raises}"
    if model_class in PASSES_LABELS:
        pred.fix = (f"Create the LoRA adapter with task_type=None (a PeftModel: HiggsAudioModel.forward takes no "
                    f"`labels`) and pass {LABEL_FIX} to TrainingArguments")
    elif missing and all(k in HIGGS_LABELS for k in label_names):
        pred.fix = (f"Keep {', '.join(missing)} in the evaluation batches (no input filter or remove_unused_columns "
                    f"that drops it), so that has_labels holds")
    else:
        pred.fix = (f"Pass {LABEL_FIX} to TrainingArguments (the batch carries both), or override prediction_step "
                    f"to always compute the loss (higgs_diag.trainer.HiggsAudioTrainer does)")
    return pred
