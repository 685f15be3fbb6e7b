"""What higgs-diag reads in a console log: ONE table of formats (pattern, what it gives, an example line each).

``FORMATS`` below is the whole vocabulary of the console reader (:mod:`higgs_diag.run.logs`): progress bars,
the HF Trainer's printed log dicts, the loss components that community trainers print, a custom loop's step
lines, the messages and exceptions that explain a failure, and the markers of a training session. Every row
carries an example line that its pattern must read (``tests/test_console_logs.py`` holds the table to it), and
``python -m higgs_diag.run.console`` prints the table in Markdown for the docs.

Values may be printed as ``2.31``, ``nan``, ``inf``, ``-inf``, ``np.float64(0.5)``, ``tensor(2.3)`` or
``tensor(2.3, device='cuda:0', grad_fn=<AddBackward0>)``: :func:`parse_value` reads them all.

Where a value's step comes from (the reader applies these rules; see :mod:`higgs_diag.run.logs`):

* HF log dicts (``{'loss': ...}``) take the count of the Trainer's progress bar redrawn right after them: the
  Trainer writes a dict with ``tqdm.write``, which redraws the bar at the current step (the bar drawn before
  the dict may be behind: tqdm redraws at most every 0.1 s). When no bar follows right away (``torchrun --tee``
  tails stdout and stderr separately, so prints and bars lose their relative order), the bar drawn before
  counts, and a value's step may be off by the lag between the two streams (a step or two). Without a progress
  bar (``disable_tqdm=True``) the dicts carry no step and are not placed (the trainer_state.json / TensorBoard
  hold them); their end-of-training summary still counts.
* Per-forward components (``Codebook k loss``, ``Audio loss computed``, ``LLM loss computed``) belong to the
  step the progress bar reaches next: the forwards of step N print before the bar moves to N. Several
  forwards per step (gradient accumulation) are **averaged**; when tqdm skipped drawing some steps (it redraws
  at most every 0.1 s) the bar jumps by j steps and the mean of the last n // j forwards is the value of the
  step it lands on (steps in between get none). Forwards of an evaluation (after an evaluation bar or an
  ``eval_*`` dict, until the training bar is drawn again) are not training values and are dropped, and so are
  the forwards of a step that never completed (the log ends or a traceback comes before the bar moves).
  Without a Trainer progress bar, components take the step of the nearest preceding ``Step N`` line,
  averaged per step; with neither they are not placed.
* ``Step N - ...`` lines carry their own step; a ``Val Loss`` line without one takes the last step seen.
* The Trainer's bar is the one without a description (``12%|█▏ | 20/168``); its total is ``max_steps``. A bar
  drawn one row lower (tqdm moves the cursor back up with ``ESC[A``) or with another total is the evaluation
  bar; a bar with a description (``Epoch 1/3: ...``, a custom loop's bar over micro-batches) counts no steps.
* Several ranks: lines prefixed ``[rank1]:`` / ``[default1]:`` (also when the prefix follows a bar on the same
  line) are read for messages and tracebacks only; the series and the steps come from rank 0 (or unprefixed
  lines), never from a mix of ranks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Limits of the reader (documented in docs/design.md): a console log larger than MAX_LOG_BYTES is not read (a
# ReadProblem says so); one carriage-return or newline separated segment keeps at most MAX_SEGMENT_BYTES.
MAX_LOG_BYTES = 1 << 29  # 512 MiB: the reader streams about 5 MB/s of component-heavy log, so ~2 min at most
MAX_SEGMENT_BYTES = 1 << 16  # 64 KiB
MAX_LINE = 2000  # characters of one line kept in evidence

NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|NaN|NAN|inf|Inf|INF|infinity|Infinity)"
# a value as printed: plain, numpy (np.float64(0.5), numpy.float32(1.0)) or a torch tensor (tensor(2.3, ...))
VALUE = rf"(?:(?:np|numpy|torch)\.[A-Za-z]\w*\(|tensor\()?\s*({NUM})"
_WRAPPED = re.compile(rf"^(?:(?:np|numpy|torch)\.[A-Za-z]\w*|tensor|float|int)\(\s*'?({NUM})'?\s*(?:,.*)?\)$", re.S)


def parse_value(text: str) -> float | None:
    """``2.31``, ``nan``, ``-inf``, ``np.float64(0.5)``, ``tensor(2.3, device='cuda:0')`` -> float; else None."""
    s = text.strip().rstrip(",").strip()
    try:
        return float(s)  # 2.31, nan, inf, -Infinity, 1e-05
    except ValueError:
        pass
    m = _WRAPPED.match(s)
    if m is None:
        return None
    try:
        return float(m.group(1))
    except ValueError:
        return None


@dataclass(frozen=True)
class ConsoleFormat:
    """One row of the table: ``kind`` says what the reader does with a match (see the module docstring)."""

    name: str
    kind: str  # progress | log-dict | component | step-line | marker | message | exception | traceback | rank
    pattern: re.Pattern
    gives: str  # canonical metric names, an event kind, or (in parentheses) what it means for the reader
    example: str
    requires_frame: str = ""  # exceptions: a function the traceback must pass through


def _f(name, kind, pattern, gives, example, flags=0, requires_frame=""):
    return ConsoleFormat(name, kind, re.compile(pattern, flags), gives, example, requires_frame)


FORMATS: tuple[ConsoleFormat, ...] = (
    # ---- progress ----------------------------------------------------------------------------------------
    _f("tqdm-bar", "progress",
       r"(?P<pct>\d{1,3})%\|(?P<bar>[^|]*)\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<info>[^\]]*)\]",
       "(the step n and max_steps: the HF Trainer's bar has no description)",
       "\r 12%|█▏        | 20/168 [00:03<00:21,  6.80it/s]"),
    _f("rank-prefix", "rank", r"^\[(?:rank|default|[a-z_]+?)?(\d+)\]:\s?",
       "(the line's rank; series keep rank 0)", "[rank1]:Codebook 0 loss: 2.9120"),
    # ---- the HF Trainer's printed log dicts --------------------------------------------------------------
    _f("hf-log-dict", "log-dict", r"\{'[A-Za-z_][^'\n]*':.*\}",
       "every numeric key with its name: loss, grad_norm, learning_rate, epoch, eval_loss, eval_*, train_runtime, "
       "train_loss ... (lr is learning_rate); a dict needs an 'epoch' key (the Trainer always adds it)",
       "{'loss': 2.31, 'grad_norm': 0.42, 'learning_rate': 4.9e-05, 'epoch': 0.12}"),
    # ---- loss components printed at every forward by community trainers ----------------------------------
    _f("codebook-loss", "component", rf"\bCodebook (\d+) loss:\s*{VALUE}", "audio_loss_cb{k}",
       "Codebook 3 loss: 2.8644"),
    _f("audio-loss", "component", rf"\bAudio loss computed:\s*{VALUE}", "audio_loss",
       "Audio loss computed: 2.8953, device: cuda:0"),
    _f("llm-loss", "component", rf"\bLLM loss computed:\s*{VALUE}", "text_loss",
       "LLM loss computed: tensor(4.0558, device='cuda:0')"),
    # ---- a custom loop's logger lines (codeman911/higgs-audio trainer.py pattern) ------------------------
    _f("step-losses", "step-line", r"\bStep (\d+)\s*[-:|]\s*Losses?:\s*(.*)",
       "loss (Total=), text_loss (Text=, LLM=), audio_loss (Audio=), other Name= as name_loss",
       "INFO:__main__:Step 20 - Losses: Text=3.1004, Audio=2.7012, Total=5.8016"),
    _f("val-loss", "step-line",
       rf"\b(?:Step (\d+)\s*[-:|]\s*)?Val(?:idation)? [Ll]oss:\s*{VALUE}"
       rf"(?:,\s*Text:\s*{VALUE})?(?:,\s*Audio:\s*{VALUE})?",
       "eval_loss (eval_text_loss, eval_audio_loss)",
       "INFO:__main__:Step 25 - Val Loss: 5.9120, Text: 3.2001, Audio: 2.7119"),
    # ---- markers of a training session -------------------------------------------------------------------
    _f("training-start", "marker", r"\*{5} Running training \*{5}", "(a new training session starts)",
       "11/24/2026 06:19:18 - INFO - transformers.trainer - ***** Running training *****"),
    _f("total-steps", "marker", r"Total optimization steps = ([\d,]+)", "(max_steps of the session)",
       "11/24/2026 06:19:18 - INFO - transformers.trainer -   Total optimization steps = 250"),
    _f("resume-step", "marker", r"Continuing training from global step (\d+)", "(the session resumes at that step)",
       "11/24/2026 05:57:18 - INFO - transformers.trainer -   Continuing training from global step 10"),
    _f("evaluation-start", "marker", r"\*{5} Running Evaluation \*{5}", "(evaluation forwards follow)",
       "***** Running Evaluation *****"),
    _f("training-completed", "marker", r"Training completed\. Do not forget", "event training-completed",
       "Training completed. Do not forget to share your model on huggingface.co/models =)"),
    # (the end-of-training summary is the hf-log-dict with train_runtime: also event training-completed)
    # ---- messages that explain a failure (event kinds of LogEvent) ---------------------------------------
    _f("metric-keyerror", "message", r"The `metric_for_best_model` training argument is set to '([^']*)', which is "
       r"not found in the evaluation metrics", "event metric-keyerror",
       "KeyError: \"The `metric_for_best_model` training argument is set to 'eval_loss', which is not found in the "
       "evaluation metrics. The available evaluation metrics are: ['eval_runtime']\""),
    _f("no-loss", "message", r"The model did not return a loss from the inputs", "event no-loss",
       "ValueError: The model did not return a loss from the inputs, only the following keys: logits,audio_logits"),
    _f("early-stopping-disabled", "message", r"early stopping is disabled", "event early-stopping-disabled",
       "early stopping required metric_for_best_model, but did not find eval_loss so early stopping is disabled"),
    _f("newly-initialized", "message", r"newly initialized|were not initialized from the model checkpoint",
       "event newly-initialized",
       "Some weights of HiggsAudioModel were not initialized from the model checkpoint at ./base and are newly "
       "initialized: ['audio_codebook_embeddings.weight']"),
    _f("rng-unpickling", "message", r"Weights only load failed", "event rng-unpickling",
       "_pickle.UnpicklingError: Weights only load failed. Unsupported global: GLOBAL "
       "numpy.core.multiarray._reconstruct"),
    # ---- tracebacks and the exceptions with a rule of their own ------------------------------------------
    _f("traceback", "traceback", r"Traceback \(most recent call last\):",
       "event traceback (its final exception line; found anywhere in a line, e.g. right after a bar)",
       "\r 12%|█▏        | 20/168 [00:03<00:21,  6.80it/s]Traceback (most recent call last):"),
    _f("batch-no-get", "exception", r"^AttributeError: '([\w.]+)' object has no attribute 'get'",
       "event batch-no-get (the traceback passes through prediction_step)",
       "AttributeError: 'ExtendedHiggsAudioBatchInput' object has no attribute 'get'",
       requires_frame="prediction_step"),
    _f("batch-no-len", "exception", r"^TypeError: object of type '([\w.]+)' has no len\(\)",
       "event batch-no-len (the traceback passes through _prepare_inputs)",
       "TypeError: object of type 'HiggsAudioBatchInput' has no len()", requires_frame="_prepare_inputs"),
    _f("peft-labels", "exception", r"^TypeError: (?:[\w.]+\.)?forward\(\) got an unexpected keyword argument 'labels'",
       "event peft-labels", "TypeError: HiggsAudioModel.forward() got an unexpected keyword argument 'labels'"),
)

BY_NAME = {f.name: f for f in FORMATS}
MESSAGES = tuple((f.name, f.pattern) for f in FORMATS if f.kind == "message")
MESSAGE_ANY = re.compile("|".join(f"(?:{p.pattern})" for _, p in MESSAGES))  # a cheap first test per line
# a line none of these words is in holds nothing the reader wants (tests hold every example of FORMATS to it)
QUICK = re.compile(r"\{'|[Ll]oss|Step|Traceback|\*{5}|Training completed|optimization steps|Continuing training|"
                   r"metric_for_best_model|early stopping|initiali[sz]ed|Weights only")
MARKER_ANY = re.compile("|".join(f"(?:{f.pattern.pattern})" for f in FORMATS if f.kind == "marker"))
EXCEPTIONS = tuple(f for f in FORMATS if f.kind == "exception")
COMPONENTS = tuple(f for f in FORMATS if f.kind == "component")
BAR = BY_NAME["tqdm-bar"].pattern
RANK = BY_NAME["rank-prefix"].pattern
LOG_DICT = BY_NAME["hf-log-dict"].pattern
STEP_LOSSES = BY_NAME["step-losses"].pattern
VAL_LOSS = BY_NAME["val-loss"].pattern
TRAINING_START = BY_NAME["training-start"].pattern
EVALUATION_START = BY_NAME["evaluation-start"].pattern
TRAINING_COMPLETED = BY_NAME["training-completed"].pattern
TOTAL_STEPS = BY_NAME["total-steps"].pattern
RESUME_STEP = BY_NAME["resume-step"].pattern
TRACEBACK_START = "Traceback (most recent call last):"

# a traceback's frame line, its final exception line ("ValueError: ...", "torch.OutOfMemoryError: ...",
# "KeyboardInterrupt") and the lines between chained tracebacks
FRAME = re.compile(r'^\s*File "([^"]*)", line (\d+), in (\S+)')
EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*|:)?$")
NOT_EXC = ("During handling of the above exception", "The above exception was the direct cause")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CURSOR_UP = "\x1b[A"  # tqdm draws a nested bar (position 1: the evaluation bar) and moves back up

_KEY = re.compile(r"'([^'\n]+)':\s*")
_PAIR = re.compile(rf"([A-Za-z][\w ]*?)\s*=\s*{VALUE}")
_STEP_NAMES = {"total": "loss", "loss": "loss", "text": "text_loss", "llm": "text_loss", "audio": "audio_loss"}


def parse_log_dict(text: str) -> dict[str, float] | None:
    """The numeric entries of a printed HF log dict found in ``text`` (None when there is none, or when it has
    no ``epoch``: the Trainer adds ``epoch`` to every dict it logs, a printed config dict has none)."""
    m = LOG_DICT.search(text)
    if m is None:
        return None
    body = m.group(0)[1:-1]
    keys = list(_KEY.finditer(body))
    out: dict[str, float] = {}
    for i, km in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(body)
        v = parse_value(body[km.end():end].strip().rstrip(","))
        if v is not None:
            out[km.group(1)] = v
    return out if "epoch" in out else None


def parse_step_losses(rest: str) -> dict[str, float]:
    """``Text=3.1, Audio=2.7, Total=5.8`` -> ``{"text_loss": 3.1, "audio_loss": 2.7, "loss": 5.8}``."""
    out = {}
    for m in _PAIR.finditer(rest):
        name = m.group(1).strip().lower().replace(" ", "_")
        v = parse_value(m.group(2))
        if v is not None:
            out[_STEP_NAMES.get(name, name if name.endswith("loss") else f"{name}_loss")] = v
    return out


# the component formats as one alternation: one search per line instead of one per format
_COMPONENT_ANY = re.compile("|".join(f"(?P<c{i}>{f.pattern.pattern})" for i, f in enumerate(COMPONENTS)))
_COMPONENT_GROUPS = {f"c{i}": (f, _COMPONENT_ANY.groupindex[f"c{i}"]) for i, f in enumerate(COMPONENTS)}


def component(text: str) -> tuple[str, float] | None:
    """(canonical metric, value) of a per-forward loss print, or None."""
    m = _COMPONENT_ANY.search(text)
    if m is None:
        return None
    f, g = _COMPONENT_GROUPS[m.lastgroup]
    if f.name == "codebook-loss":  # the groups after the named one: the codebook index, then the value
        v = parse_value(m.group(g + 2))
        return (f"audio_loss_cb{int(m.group(g + 1))}", v) if v is not None else None
    v = parse_value(m.group(g + 1))
    return (f.gives, v) if v is not None else None


def markdown_table() -> str:
    """The table for docs/design.md."""
    rows = ["| format | kind | gives | example |", "|---|---|---|---|"]
    for f in FORMATS:
        ex = f.example.replace("\r", "\\r").replace("|", "\\|")
        gives = f.gives.replace("|", "\\|")
        code = f"`` {ex} ``" if "`" in ex else f"`{ex}`"
        rows.append(f"| `{f.name}` | {f.kind} | {gives} | {code} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
