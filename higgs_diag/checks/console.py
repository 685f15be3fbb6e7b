"""Checks on the console log: the messages that explain a run that stopped or resumed badly."""
from __future__ import annotations

from ..diagnosis import Severity
from . import causes, check, finding

# log-event kinds that a dedicated check explains (a traceback of one of these is not "unexplained")
_EXPLAINED = {"metric-keyerror", "no-loss", "rng-unpickling"}


def _at(e) -> str:
    return f"{e.file}:{e.line}: {e.text[:400]}"


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
    missing loss, the RNG-state unpickling error) and no later session in the same log completed
    (that case is crash-then-completed, HD005).

    Why it happens: anything from out-of-memory to a data error; higgs-diag has no dedicated check for
    it, and the exception line is the start.

    Example: `train.log:310: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB`.

    Fix: read the traceback in the log (the checks above it in this report may show what led to it);
    fix the exception, then resume from the last checkpoint.
    """
    last, later = _last_crash(run)
    if last is not None and not later:
        yield finding(Severity.CRITICAL, f"Training stopped with {_exception(last)}", evidence=[_at(last)])


@check("HD005", "training-crashed", rank=80)
def crash_then_completed(run, t):
    """An earlier training session crashed, and a later one in the same log completed.

    What it detects: a traceback no dedicated check explains, followed in the same console log by
    "Training completed." (info).

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


causes("HD701", "HD004", "HD005")  # a crash in the log explains the resume that follows it
