"""What the user can set: the named thresholds of the rules (seed defaults; ``--set NAME=VALUE``) and which
rules run (``--select`` / ``--ignore``), both also from a JSON/TOML file (``--config FILE``):

    [thresholds]            # or the names at top level
    audio_loss_warning = 0.02
    select = ["HD2", "no-learning"]   # codes, code prefixes or categories
    ignore = ["HD504"]
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable


# Thresholds that no rule reads any more, with what replaced them (a clear error instead of "unknown").
RETIRED = {
    "replay_copy_rate": "HD801 no longer needs an absolute copy rate (it missed mild collapses); it compares the "
                        "copy rate with the data's own repeat rate (replay_copy_margin)",
}


@dataclass(frozen=True)
class Thresholds:
    # audio-loss monitor (seed 004)
    audio_loss_warning: float = 0.01
    audio_loss_critical: float = 0.005
    audio_sustained_window: int = 100
    # an episode below audio_loss_warning ends after this many consecutive steps back above it
    audio_recovery_steps: int = 10
    # copy-task signature: audio loss below this fraction of its starting value ...
    collapse_fraction: float = 0.01
    # ... within this many steps of the first logged point
    collapse_within_steps: int = 1000
    # no-learning: share of steps with grad_norm exactly 0
    zero_grad_share: float = 0.9
    # loss-divergence: final loss above running minimum by this factor (and no recovery)
    divergence_factor: float = 1.5
    # grad-explosion: grad_norm above this multiple of its rolling median
    grad_spike_factor: float = 10.0
    grad_spike_window: int = 50
    # loss-plateau: no relative improvement larger than this over the window (in steps)
    plateau_window_fraction: float = 0.3
    plateau_min_improvement: float = 0.01
    # overfitting: number of consecutive evaluations, from the eval_loss minimum on (the minimum counts),
    # that show the rise
    overfit_min_evals: int = 3
    overfit_rise_fraction: float = 0.05
    # suspicious constants a fallback writes instead of a real loss
    suspicious_constants: tuple = (0.0, 0.001)
    # recommended learning-rate range for Higgs Audio fine-tuning when the language is unknown: the union of
    # seed 000's ranges (5e-5..1e-4 for zero-shot voice cloning, 1e-5..3e-5 for Arabic)
    lr_recommended_min: float = 1e-5
    lr_recommended_max: float = 1e-4
    # ---- numerics / optimisation / schedule / resume checks (HD301-HD501, HD701) ----
    # fewest logged points a trend rule (flat loss, divergence, spikes) needs before it says anything
    trend_min_points: int = 5
    # non-finite: share of logged grad_norm points (or of masked loss points) from which the run
    # counts as broken (critical) rather than a few skipped steps (warning/info)
    nonfinite_critical_share: float = 0.1
    # nan-masked: consecutive logged steps of a loss pinned to a suspicious constant with grad_norm 0
    # (or non-finite) before it counts as a fallback constant rather than a stray batch
    masked_min_steps: int = 3
    # no-learning: the loss counts as flat when (max - min) <= this fraction of its median magnitude
    flat_loss_rel_range: float = 1e-3
    # smoothing of the loss curve: rolling median over this fraction of the logged points
    smooth_fraction: float = 0.05
    # loss-divergence: the rise must hold over this last fraction of the logged points ...
    divergence_tail_fraction: float = 0.1
    # ... and exceed the running minimum by at least this much in loss units (nats for a CE loss)
    divergence_min_rise: float = 0.1
    # ... over at least this many logged points at the end of the run
    divergence_min_tail_points: int = 3
    # grad-explosion: logged points of history the rolling median needs before a spike is judged
    grad_spike_min_history: int = 5
    # grad-explosion: a spike damaged the run when the median loss over the next loss_jump_points logged
    # points exceeds loss_jump_factor x its trailing median and rises by at least loss_jump_min_rise
    loss_jump_factor: float = 1.5
    loss_jump_points: int = 3
    loss_jump_min_rise: float = 0.1
    # grad-explosion: spikes are frequent at >= max(grad_spike_frequent_min, share x logged points)
    grad_spike_frequent_min: int = 3
    grad_spike_frequent_share: float = 0.02
    # loss-plateau: fewest logged points inside the plateau window
    plateau_min_points: int = 6
    # loss-plateau: skip when the final lr is below this fraction of the peak (the schedule ran down)
    plateau_lr_fraction: float = 0.1
    # lr-schedule: relative tolerance when comparing a learning rate to its peak or configured value
    lr_rel_tolerance: float = 0.01
    # lr-schedule: logged points with lr == 0 (besides a single first/last one) before it counts as stuck
    lr_zero_min_points: int = 3
    # lr-schedule: relative decay the configured scheduler should have produced by the last logged step
    # before a constant post-warmup lr counts as 'not decaying'
    lr_decay_expected_min: float = 0.1
    # resume-discontinuity: a step gap above this multiple of logging_steps counts as missing logs
    resume_gap_factor: float = 3.0
    # ---- replay-batch (HD800-HD809) ----
    # audio-over-masked: a batch whose share of -100 audio labels is above this is over-masked (warning;
    # critical when no audio target is left)
    replay_masked_share: float = 0.95
    # a logged loss matches a recomputed one when their ratio is within this factor
    replay_match_factor: float = 1.5
    # the shifted and unshifted audio CE must differ by at least this factor before a logged loss can tell
    # which of the two the trainer computed ...
    replay_separation_factor: float = 2.0
    # ... unless the checkpoint is the one of the batch's own step (one update apart): then a logged loss within
    # this relative tolerance of one and more than twice as far from the other tells
    replay_exact_tolerance: float = 0.005
    # copy task: the argmax equals the current input token more often than the data's own repeat rate (next
    # target == current input) by at least this much
    replay_copy_margin: float = 0.25
    # the audio head learned nothing: shifted audio CE at or above this fraction of ln(codebook_size + 2)
    replay_uniform_fraction: float = 0.9
    # ... and the same-position CE below the next-token CE by at least this factor (the copy task, judged from
    # the checkpoint's own numbers when no logged loss can be compared)
    replay_internal_separation: float = 1.25
    # a batch's logged loss is compared with a checkpoint at most this many steps older than the batch ...
    replay_pair_max_steps: int = 20
    # ... while the logged loss (median of the last 5 logged points) moved by less than this fraction between
    # the checkpoint's step and the batch's
    replay_pair_max_change: float = 0.1

    def replace(self, **changes: Any) -> "Thresholds":
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_overrides(self, items: dict[str, Any]) -> "Thresholds":
        """Apply ``{name: value}`` (values may be strings from the CLI); unknown names raise ValueError."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, raw in items.items():
            key = name.strip().replace("-", "_")
            if key in RETIRED:
                raise ValueError(f"threshold {name!r} was retired: {RETIRED[key]}")
            if key not in known:
                raise ValueError(f"unknown threshold {name!r}; known: {', '.join(known)}")
            default = getattr(self, key)
            try:
                if isinstance(default, tuple):
                    vals = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
                    value: Any = tuple(float(v) for v in vals)
                elif isinstance(default, int) and not isinstance(default, bool):
                    value = int(raw)
                else:
                    value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"threshold {name!r} needs a number, got {raw!r}") from None
            changes[key] = value
        out = self.replace(**changes)
        if not 1 <= out.grad_spike_min_history <= out.grad_spike_window:  # a trailing window holds at most `window`
            raise ValueError(f"threshold 'grad_spike_min_history' ({out.grad_spike_min_history}) must be between 1 "
                             f"and 'grad_spike_window' ({out.grad_spike_window})")
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "Thresholds":
        """Thresholds from a JSON or TOML file; every error names the file (ValueError)."""
        return load_config_file(path)[0]


class SelectionError(ValueError):
    """A ``--select`` / ``--ignore`` entry that matches no rule (a usage error)."""


@dataclass(frozen=True)
class Selection:
    """Which rules run: ``select`` (empty: all) minus ``ignore``. Each entry is a code (``HD201``), a code
    prefix (``HD2``, ``HD8``) or a category slug (``audio-loss-collapse``)."""

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @staticmethod
    def _matches(entry: str, code: str, category: str) -> bool:
        e = entry.strip()
        return e == category or (e.upper().startswith("HD") and code.startswith(e.upper()))

    def allows(self, code: str, category: str) -> bool:
        if self.select and not any(self._matches(e, code, category) for e in self.select):
            return False
        return not any(self._matches(e, code, category) for e in self.ignore)

    def merged(self, select: Iterable[str] = (), ignore: Iterable[str] = ()) -> "Selection":
        """This selection with command-line entries: a CLI ``--select`` replaces the file's, ``--ignore`` adds."""
        sel = tuple(select)
        return Selection(sel or self.select, self.ignore + tuple(ignore))

    def validate(self, known_codes: Iterable[str], known_categories: Iterable[str]) -> None:
        """ValueError naming an entry that matches no rule (a typo would silently select nothing)."""
        codes, cats = list(known_codes), set(known_categories)
        for e in self.select + self.ignore:
            if not any(self._matches(e, c, "") for c in codes) and e.strip() not in cats:
                raise SelectionError(f"--select/--ignore entry {e!r} matches no rule code, prefix or category "
                                 f"(`higgs-diag checks` lists them)")


def load_config_file(path: str | Path) -> tuple[Thresholds, Selection]:
    """Thresholds and rule selection from a JSON or TOML file; every error names the file (ValueError).
    The thresholds are the names at top level or in a ``thresholds`` table; ``select`` / ``ignore`` are lists
    at top level."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib  # Python 3.11+
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                raise ValueError("TOML needs Python 3.11+; use a JSON file") from None
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("expected a table of threshold names")
        data = dict(data)
        lists = {key: _entry_list(key, data.pop(key, ())) for key in ("select", "ignore")}
        table = data.pop("thresholds", None)
        if table is not None:
            if not isinstance(table, dict):
                raise ValueError("'thresholds' must be a table of threshold names")
            data.update(table)
        return Thresholds().with_overrides(data), Selection(lists["select"], lists["ignore"])
    except (ValueError, RecursionError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{p}: {e}") from None


def _entry_list(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = v.split(",")
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key!r} must be a list of codes, code prefixes or categories")
    return tuple(x.strip() for x in v if x.strip())


@dataclass(frozen=True)
class ReplayOptions:
    """How a checkpoint is loaded for a replay (the options that travel together from the CLI to the loader).

    ``base``: the base model folder of a LoRA adapter (default: its ``base_model_name_or_path``);
    ``lora_alpha``: for a wrapper state dict with LoRA weights and no adapter_config.json near it;
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``dtype``: ``auto`` or a torch dtype name;
    ``no_model``: only the batch checks (no model, no boson_multimodal)."""

    base: str | Path | None = None
    lora_alpha: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    no_model: bool = False
