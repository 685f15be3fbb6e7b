"""Checks on the console log: the messages that explain a run that stopped or resumed badly, the crashes with
a known cause, and a run that stopped before its last step."""
from __future__ import annotations

from ..diagnosis import Severity
from . import causes, check, finding

# log-event kinds that a dedicated check explains (a traceback of one of these is not "unexplained")
_EXPLAINED = {"metric-keyerror", "no-loss", "rng-unpickling", "batch-no-get", "batch-no-len", "peft-labels"}


def _at(e) -> str:
    rank = f" (rank {e.rank})" if getattr(e, "rank", None) is not None else ""
    return f"{e.file}:{e.line}{rank}: {e.text[:400]}"


def _from_log(run, kind: str, severity: Severity, title: str, limit: int = 2):
    """One finding quoting the log lines of ``kind``, or nothing when the log has none."""
    ev = [e for e in run.log_events if e.kind == kind]
    if ev:
        yield finding(severity, title, evidence=[_at(e) for e in ev[:limit]])


@check("HD104", "loss-missing", rank=2)
def model_returned_no_loss(run, t):
    """Training stopped: the model did not return a loss.

    What it detects: `ValueError: The model did not return a loss from the inputs` in the console log.

    Why it happens: `HiggsAudioModel.forward` computes no loss: it returns `logits` and `audio_logits`,
    and its output declares `loss`, `llm_loss` and `audio_loss` but leaves them `None`
    (boson_multimodal 0.1.1). The HF Trainer's default `compute_loss` needs `outputs.loss` and raises;
    a `compute_loss` that returns `outputs.loss` returns `None`.

    Example: `train.log:88: ValueError: The model did not return a loss from the inputs, only the
    following keys: logits,audio_logits,...`.

    Fix: compute the loss yourself from `logits`/`expanded_labels` and `audio_logits`/`label_audio_ids`,
    shifted by one position (`higgs_diag.losses.higgs_audio_loss`), or train with
    `higgs_diag.trainer.HiggsAudioTrainer`, which does.
    """
    yield from _from_log(run, "no-loss", Severity.CRITICAL, "Training stopped: the model did not return a loss")


@check("HD702", "resume-failed", rank=4)
def resume_rng_unpickling(run, t):
    """Resuming failed: transformers 4.46 cannot load `rng_state.pth` under torch >= 2.6.

    What it detects: `UnpicklingError: Weights only load failed` in the console log, the error that
    `resume_from_checkpoint` hits when it loads the checkpoint's RNG state.

    Why it happens: torch 2.6 made `torch.load(weights_only=True)` the default; `rng_state.pth` holds
    numpy RNG state (pickled numpy objects), which the weights-only unpickler refuses, and
    transformers 4.46's `_load_rng_state` does not allow them, so `resume_from_checkpoint` stops before
    training.

    Example: `train.log:40: _pickle.UnpicklingError: Weights only load failed. ... Unsupported global:
    GLOBAL numpy.core.multiarray._reconstruct`.

    Fix: resume with `higgs_diag.trainer.HiggsAudioTrainer`, which loads the RNG state with exactly the
    numpy globals it needs allowed (only for that file), or use transformers >= 4.49 when
    boson_multimodal allows it; do not set `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` for the whole process.
    """
    yield from _from_log(run, "rng-unpickling", Severity.CRITICAL,
                         "Resuming from a checkpoint failed: rng_state.pth is refused by torch's weights-only load")


@check("HD003", "config-mismatch", rank=30)
def newly_initialized_weights(run, t):
    """Some weights were newly initialised when the model was loaded: they start from random values.

    What it detects: the transformers warning `Some weights of ... were not initialized from the model
    checkpoint ... and are newly initialized` in the console log.

    Why it happens: the checkpoint does not hold every parameter of the model class being built: a
    config with other `audio_num_codebooks` / `audio_dual_ffn_layers` than the checkpoint, a base
    checkpoint without the audio heads, or renamed keys. For Higgs Audio, randomly initialised audio
    heads or codebook embeddings make the start of fine-tuning look like training from scratch.

    Example: `train.log:12: Some weights of HiggsAudioModel were not initialized from the model checkpoint
    at ./base and are newly initialized: ['audio_codebook_embeddings.weight']`.

    Fix: build the model from the checkpoint's own config (`HiggsAudioConfig.from_pretrained(path)`),
    and check the listed weights: they should be empty for a fine-tune, or be exactly the new layers you
    added on purpose.
    """
    yield from _from_log(run, "newly-initialized", Severity.WARNING, "Some weights were newly initialised at load time",
                         limit=3)


def _last_crash(run):
    """(the last traceback no dedicated check explains, the later "Training completed." lines of its log)."""
    tbs = [e for e in run.log_events if e.kind == "traceback"]
    if not tbs:
        return None, []
    last = tbs[-1]
    if any(e.kind in _EXPLAINED and e.file == last.file and e.line >= last.line for e in run.log_events):
        return None, []
    return last, [e for e in run.log_events
                  if e.kind == "training-completed" and e.file == last.file and e.line > last.line]


def _exception(e) -> str:
    return e.text.split(":")[0]  # "RuntimeError: CUDA out of memory" -> the exception's name, for the title


@check("HD004", "training-crashed", rank=60)
def unexplained_crash(run, t):
    """Training stopped with an exception that no other check explains.

    What it detects: the last `Traceback (most recent call last):` of the console log and its exception
    line, when it is not one of the failures with a dedicated check (the best-metric KeyError, the
    missing loss, the RNG-state unpickling error, a batch object that is not a dict, PEFT's `labels`)
    and no later session in the same log completed (that case is crash-then-completed, HD005).

    Why it happens: anything from out-of-memory to a data error; higgs-diag has no dedicated check for
    it, and the exception line is the start.

    Example: `train.log:310: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB`.

    Fix: read the traceback in the log (the checks above it in this report may show what led to it);
    fix the exception, then resume from the last checkpoint.
    """
    last, later = _last_crash(run)
    if last is not None and not later:
        yield finding(Severity.CRITICAL, f"Training stopped with {_exception(last)}", evidence=_crash_evidence(last))


@check("HD005", "training-crashed", rank=80)
def crash_then_completed(run, t):
    """An earlier training session crashed, and a later one in the same log completed.

    What it detects: a traceback no dedicated check explains, followed in the same console log by
    "Training completed." or the Trainer's end-of-training summary `{'train_runtime': ...}` (info).

    Why it happens: a job that was pre-empted, killed or crashed and then resumed from a checkpoint
    (the same log appended to); the crash is history as far as the final model is concerned.

    Example: `train.log:140: __main__._Preempted: SIGTERM` then `train.log:305: Training completed.`

    Fix: nothing to do if the resumed run is what you wanted; see resume-discontinuity (HD701) for
    repeated or missing steps around the resume.
    """
    last, later = _last_crash(run)
    if last is not None and later:
        yield finding(Severity.INFO, f"An earlier session stopped with {_exception(last)}; a later one completed",
                      evidence=[_at(last), _at(later[-1])])


def _crash(run, kind: str):
    """The last event of ``kind`` (a crash with a rule of its own) and its traceback's innermost frames."""
    ev = [e for e in run.log_events if e.kind == kind]
    return ev[-1] if ev else None


def _crash_evidence(e) -> list[str]:
    out = [_at(e)]
    if e.context:
        out.append("raised in " + " <- ".join(reversed(e.context)))
    if e.step is not None:
        out.append(f"the console showed step {e.step} when it was raised")
    return out


@check("HD011", "batch-invalid", rank=3)
def batch_object_not_dict(run, t):
    """Training stopped: the collator returns a batch object, and the HF Trainer needs a dict.

    What it detects: `AttributeError: '<class>' object has no attribute 'get'` raised in
    `Trainer.prediction_step`, or `TypeError: object of type '<class>' has no len()` raised in
    `Trainer._prepare_inputs`, in the console log.

    Why it happens: the Trainer treats a batch as a mapping: `_prepare_inputs` calls `len(inputs)` and
    `prediction_step` calls `inputs.get("return_loss")` and `inputs.get(name)` for every label name
    (transformers 4.45-4.46). boson_multimodal's collator returns a `HiggsAudioBatchInput` dataclass, which has
    no `len`: the first training step fails. Community trainers wrap it in a batch class with `__len__` and
    `__getitem__` but no `get`: training runs, and the first evaluation fails, before any checkpoint or
    `trainer_state.json` exists. A batch that is not a Mapping is not moved to the device either.

    Example: `train.log:38: AttributeError: 'ExtendedHiggsAudioBatchInput' object has no attribute 'get'`,
    raised in `prediction_step` at step 20, the first evaluation.

    Fix: make the collator return a plain dict of tensors, e.g.
    `{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}` for a `HiggsAudioBatchInput`, and
    read `inputs["label_audio_ids"]` in `compute_loss`; keep `label_names=["label_ids", "label_audio_ids"]` so
    that the evaluation computes `eval_loss`.
    """
    e = _crash(run, "batch-no-get") or _crash(run, "batch-no-len")
    if e is None:
        return
    cls = e.text.split("'")[1] if e.text.count("'") >= 2 else "batch"
    calls = "inputs.get(...)" if e.kind == "batch-no-get" else "len(inputs)"
    yield finding(Severity.CRITICAL, f"Training stopped: the batch is a `{cls}` object, not a dict (the Trainer "
                                     f"calls `{calls}`)",
                  evidence=_crash_evidence(e), steps=(e.step, e.step) if e.step is not None else None)


@check("HD012", "config-mismatch", rank=3)
def peft_causal_lm_labels(run, t):
    """Training stopped: `PeftModelForCausalLM` passes `labels` to `HiggsAudioModel.forward`, which has none.

    What it detects: `TypeError: forward() got an unexpected keyword argument 'labels'` in the console log.

    Why it happens: `get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", ...))` wraps the model in
    `PeftModelForCausalLM`, whose `forward(input_ids, attention_mask, ..., labels=None, **kwargs)` calls the
    base model with `labels=labels`. `HiggsAudioModel.forward` takes `label_ids` and `label_audio_ids`, not
    `labels`, so the call fails: with the Trainer, in `evaluate()`, before any eval_loss KeyError. The same
    wrapper also makes the Trainer's default `label_names` `['labels']`, a key a Higgs batch does not have.

    Example: `train.log:57: TypeError: HiggsAudioModel.forward() got an unexpected keyword argument 'labels'`,
    raised in peft's `forward`.

    Fix: create the adapter without a task type (`LoraConfig(task_type=None, ...)` gives a plain `PeftModel`,
    which passes the batch's keyword arguments through unchanged) and set
    `label_names=["label_ids", "label_audio_ids"]` (a `PeftModel` has no label arguments of its own, so the
    Trainer would otherwise compute no `eval_loss`); or call the base model
    (`model.base_model.model(**inputs)`) in `compute_loss` and `prediction_step`.
    """
    e = _crash(run, "peft-labels")
    if e is not None:
        yield finding(Severity.CRITICAL, "Training stopped: PeftModelForCausalLM passed `labels`, which the "
                                         "model's forward does not take",
                      evidence=_crash_evidence(e), steps=(e.step, e.step) if e.step is not None else None)


def _max_steps(run, console) -> tuple[int | None, str]:
    """The run's planned last step and where it was read."""
    if console.max_steps:
        return console.max_steps, console.max_steps_from or "the console"
    ms = run.arg("max_steps")
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
        return int(ms), "max_steps in the logged TrainingArguments"
    if run.state is not None and run.state.max_steps and run.state.max_steps > 0:
        return run.state.max_steps, f"max_steps in {run.state.path}"
    return None, ""


@check("HD010", "stopped-early", rank=65)
def stopped_early(run, t):
    """Training stopped before its last step: no end-of-training summary, and no later session finished it.

    What it detects: a console log of the training whose last session ends below `max_steps` (the Trainer's
    progress-bar total `N/168` or its "Total optimization steps = N", else `max_steps` of the logged
    TrainingArguments, else of `trainer_state.json`) without the end-of-training summary after it (the
    Trainer's `{'train_runtime': ...}` dict or "Training completed."), while no other file of the run
    reaches `max_steps` or logged `train_runtime` later. The last step is the furthest the console, the
    `trainer_state.json` or the TensorBoard files show. Critical when the session ended with an exception
    (the exception's own check says why), warning when the log just ends. Judged only with a console log:
    a checkpoint's `trainer_state.json` or a TensorBoard file alone may be a snapshot of a run in progress.

    Why it happens: the process died: an exception, a SIGTERM or SIGKILL from a scheduler, pre-emption or
    the out-of-memory killer (Python then prints nothing: the log ends mid progress bar), a closed terminal;
    or the run is still going. The model you have is the last checkpoint's, not the finished run's.

    Example: `stopped at step 129 of 768`, last line `train.log:25: 17%|█▋ | 129/768 [00:09<03:06,
    3.43it/s]`, no exception, last checkpoint `checkpoint-100`.

    Fix: fix the exception if there is one; then resume from the last checkpoint with
    `trainer.train(resume_from_checkpoint=True)` (same `output_dir` and arguments). For pre-emptible jobs,
    save more often (`save_steps`) and resubmit with resume. If the run is still going, analyze it again when
    it has finished.
    """
    cands = [c for c in run.consoles if c.sessions or c.last_step is not None or c.unplaced]
    if not cands:
        return
    c = max(cands, key=lambda c: (c.last_step if c.last_step is not None else -1, c.completed))
    if c.completed or any(o.completed and (o.last_step or 0) >= (c.last_step or 0) for o in cands):
        return
    max_steps, src = _max_steps(run, c)
    if max_steps is None:
        return
    last = max(s for s in (c.last_step, run.last_step, 0) if s is not None)
    rt = run.series("train_runtime")  # a session that finished after the one this console shows
    if last >= max_steps or (len(rt) and int(rt.index.max()) > (c.last_step if c.last_step is not None else -1)):
        return
    tbs = [e for e in run.log_events if e.kind == "traceback" and e.file == c.file and e.line >= c.session_start_line]
    exc = tbs[-1] if tbs else None
    ev = [f"last step {last} of {max_steps} ({src}); no end-of-training summary ({{'train_runtime': ...}} or "
          f"\"Training completed.\") after it"]
    if c.last_line and (exc is None or exc.text[:200] not in c.last_line):
        ev.append(f"last line {c.file}:{c.last_line_no}: {c.last_line[:300]}")
    if exc is not None:
        ev.append(f"exception: {_at(exc)}")
    else:
        ev.append("no exception in the log: the process was killed (SIGTERM/SIGKILL, pre-emption, out of host "
                  "memory) or is still running")
    ckpts = [k for k in run.checkpoints if k.step is not None and k.step <= last]
    detail = ""
    if ckpts:
        k = max(ckpts, key=lambda k: k.step)
        ev.append(f"last checkpoint: {k.path} (step {k.step})")
        again = f" (steps {k.step + 1}-{last} are trained again)" if last > k.step else ""
        detail = f"Here: resume from {k.path}{again}."
    elif not run.checkpoints and len(run.files_read) > len(run.consoles):  # the output_dir was read, not a log alone
        detail = "No checkpoint was saved before the stop: the run starts over."
    what = f" with {_exception(exc)}" if exc is not None else ": the log just ends"
    yield finding(Severity.CRITICAL if exc is not None else Severity.WARNING,
                  f"Training stopped early at step {last} of {max_steps}{what}", evidence=ev, fix_detail=detail,
                  steps=(last, last))


causes("HD701", "HD004", "HD005")  # a crash in the log explains the resume that follows it
# the crash explains the early stop (the first present, most specific first)
causes("HD010", "HD011", "HD012", "HD104", "HD702", "HD102", "HD004")
