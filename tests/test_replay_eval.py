"""The eval_loss prediction of the replay against a real ``Trainer.evaluate()`` in every configuration of FACTS §2.

Each configuration trains nothing: it builds the real model class (HiggsAudioModel, PeftModel, PeftModelForCausalLM,
a wrapper with ``forward(**kwargs)``), the real HF Trainer with the logged-args equivalent, evaluates, saves the
model with ``save_model`` and asks the replay (checkpoint inspection + logged args + batch keys) what evaluate does.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (before peft: FACTS §1)
from transformers import Trainer, TrainingArguments
from transformers.utils import find_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_runs as M  # noqa: E402

from higgs_diag.losses import higgs_audio_loss  # noqa: E402
from higgs_diag.replay.checkpoint import inspect_checkpoint  # noqa: E402
from higgs_diag.replay.evalpred import DEFAULT_LABEL_NAMES, predict_eval_loss  # noqa: E402

warnings.filterwarnings("ignore")


class LossTrainer(Trainer):
    """A trainer whose compute_loss works for every model kind (what a run that logged a training loss has):
    the dual loss on HiggsAudioModel outputs, the wrapper's own loss, and for PeftModelForCausalLM a call that
    bypasses its forward (which would pass labels= to HiggsAudioModel)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = model.base_model if type(model).__name__ == "PeftModelForCausalLM" else model
        outputs = target(**inputs)
        if isinstance(outputs, dict) and set(outputs) == {"loss"}:
            loss = outputs["loss"]
        else:
            loss = higgs_audio_loss(outputs, inputs.get("label_audio_ids")).loss
        return (loss, outputs) if return_outputs else loss


def drop_label_audio_ids(samples):
    b = M.collate(samples)
    b.pop("label_audio_ids")
    return b


def build(kind: str):
    from peft import LoraConfig, get_peft_model

    model = M.tiny_model()
    if kind == "peft":
        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    if kind == "peft-causal-lm":
        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    if kind == "wrapper":
        return M.HiggsAudioForTraining(model)
    return model


LABELS = ["label_ids", "label_audio_ids"]
# (model kind, label_names, collator): FACTS §2's configurations, with and without the fix
CONFIGS = [
    ("full", None, M.collate),
    ("full", LABELS, M.collate),
    ("full", ["labels"], M.collate),
    ("full", None, drop_label_audio_ids),
    ("full", LABELS, drop_label_audio_ids),
    ("peft", None, M.collate),
    ("peft", LABELS, M.collate),
    ("peft-causal-lm", None, M.collate),
    ("peft-causal-lm", LABELS, M.collate),
    ("wrapper", None, M.collate),
    ("wrapper", LABELS, M.collate),
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    M.tiny_model().save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize("kind, label_names, collator", CONFIGS,
                         ids=[f"{k}-{ln}-{c.__name__}" for k, ln, c in CONFIGS])
def test_prediction_agrees_with_trainer_evaluate(tmp_path, base_dir, kind, label_names, collator):
    model = build(kind)
    args = TrainingArguments(str(tmp_path / "out"), per_device_eval_batch_size=4, use_cpu=True, report_to=[],
                             remove_unused_columns=False, label_names=label_names, disable_tqdm=True,
                             eval_strategy="steps", eval_steps=10, save_safetensors=True)
    trainer = LossTrainer(model=model, args=args, eval_dataset=M.SyntheticTTS(M.make_samples(8, 5)),
                          data_collator=collator)
    try:
        metrics = trainer.evaluate()
        real, raised = "eval_loss" in metrics, None
    except TypeError as e:
        real, raised = None, str(e)
    ckpt = tmp_path / "ckpt"
    trainer.save_model(str(ckpt))
    source = inspect_checkpoint(ckpt, base=base_dir).source
    logged_args = json.loads(trainer.args.to_json_string())  # what TensorBoardCallback writes as the `args` text
    keys = sorted(collator(M.make_samples(2, 3)))
    pred = predict_eval_loss(logged_args, source.model_class, keys)
    assert pred.produced == real, (pred.reason, metrics if real is not None else raised)
    if raised is not None:
        assert pred.raises and "unexpected keyword argument 'labels'" in raised and "labels" in pred.raises
    if not real:
        assert pred.fix


def test_default_label_names_are_transformers_find_labels():
    import peft

    for name, expected in DEFAULT_LABEL_NAMES.items():
        if name == "wrapper":
            cls = M.HiggsAudioForTraining
        elif name == "HiggsAudioModel":
            cls = type(M.tiny_model())
        else:
            cls = getattr(peft, name)
        assert find_labels(cls) == expected, name


def test_keyerror_at_save_is_predicted_critical(tmp_path):
    """The wrapper without label_names and best model by eval_loss: training stops with the KeyError; the replay's
    finding on the saved checkpoint is critical and names the fix."""
    from higgs_diag.checks import run_checks
    from higgs_diag.evidence import BatchRecord, ReplayEvidence

    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             remove_unused_columns=False, disable_tqdm=True, eval_strategy="steps", eval_steps=2,
                             save_steps=2, max_steps=4, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", save_safetensors=True)
    trainer = LossTrainer(model=build("wrapper"), args=args, train_dataset=M.SyntheticTTS(M.make_samples(16, 4)),
                          eval_dataset=M.SyntheticTTS(M.make_samples(4, 5)), data_collator=M.collate)
    with pytest.raises(KeyError, match="eval_loss"):
        trainer.train()
    source = inspect_checkpoint(tmp_path / "out" / "checkpoint-2").source
    assert source.kind == "wrapper" and source.model_class == "wrapper"
    pred = predict_eval_loss(json.loads(args.to_json_string()), source.model_class, sorted(M.collate(
        M.make_samples(2, 3))))
    ev = ReplayEvidence(source=source, batches=[BatchRecord(path="b.pt")], eval=pred)
    f = [x for x in run_checks(None, replay_evidence=ev) if x.code == "HD805"]
    assert f and str(f[0].severity) == "critical" and 'label_names=["label_ids", "label_audio_ids"]' in f[0].fix
