"""Seed 000's hyperparameter table as ``TrainingArguments`` overrides, with the reasons.

Reported for Higgs Audio v2 zero-shot voice cloning on 800 h of Arabic speech on 8 H200 GPUs (initial loss
~7.27, grad_norm 0.29-0.47). The table gives ranges; each preset picks a value inside them and says why.

    args = TrainingArguments(output_dir="out", max_steps=20_000, **presets.ZERO_SHOT_VOICE_CLONING)
    model = apply_lora(model, **presets.LORA)

=============================  ================  =========  ==================================================
parameter                      table             preset     reason
=============================  ================  =========  ==================================================
learning_rate                  1e-4 .. 5e-5      5e-5       lower end: stability of the audio codebook heads
                               Arabic 1e-5..3e-5 2e-5       a language far from the pre-training data
per_device_train_batch_size    2 .. 4            2          fits a 3B model with audio on one GPU
warmup_steps                   100 .. 500        300        1-2 % of the total steps of such a run
                               Arabic 500..1000  750        slower, stabler start for a new language
eval_steps                     500               500        a factor of save_steps (load_best_model_at_end)
save_steps                     500 .. 1000       1000       a multiple of eval_steps
LoRA rank / alpha / dropout    8..32 / 2x / 0.1  16/32/0.1  alpha ~ 2x rank; 0.1 the standard regulariser
=============================  ================  =========  ==================================================

The presets also switch on what makes a run diagnosable: ``eval_loss`` as the best-model metric (lower is
better), ``logging_nan_inf_filter=False`` (NaN shows in the logs instead of a window average),
``remove_unused_columns=False`` (dict samples keep their audio fields), ``label_names`` for the two targets,
``logging_steps=10`` and TensorBoard, which ``higgs-diag analyze`` reads.
"""
from __future__ import annotations

_COMMON = dict(
    per_device_train_batch_size=2,
    eval_strategy="steps",
    eval_steps=500,
    save_strategy="steps",
    save_steps=1000,
    load_best_model_at_end=True,
    metric_for_best_model="eval_loss",
    greater_is_better=False,
    logging_steps=10,
    logging_nan_inf_filter=False,
    remove_unused_columns=False,
    label_names=["label_ids", "label_audio_ids"],
    report_to=["tensorboard"],
)

#: Zero-shot voice cloning (seed 000's main row).
ZERO_SHOT_VOICE_CLONING = dict(_COMMON, learning_rate=5e-5, warmup_steps=300)

#: The same for Arabic (seed 000: lower learning rate, longer warmup; use a larger validation set too).
ARABIC_VOICE_CLONING = dict(_COMMON, learning_rate=2e-5, warmup_steps=750)

#: ``apply_lora(model, **LORA)``.
LORA = dict(r=16, alpha=32, dropout=0.1)

PRESETS = {"zero-shot-voice-cloning": ZERO_SHOT_VOICE_CLONING, "arabic-voice-cloning": ARABIC_VOICE_CLONING}

def preset(name: str, **overrides) -> dict:
    """A copy of the named preset (``zero-shot-voice-cloning``, ``arabic-voice-cloning``) with overrides."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    out = dict(base)
    out.update(overrides)
    return out
