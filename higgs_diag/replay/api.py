"""The library face of ``higgs-diag replay-batch`` and ``higgs-diag analyze --replay``.

Batches stream one at a time: each file is loaded (weights-only), checked, run through the model under
``torch.inference_mode`` and reduced to a few numbers before the next one is read, so peak memory is the
model plus one batch's activations. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank replays its share of
the files (``files[rank::world_size]``, on ``cuda:LOCAL_RANK`` when CUDA is used) and the per-batch numbers
are gathered, so every rank builds the same report; only rank 0 prints it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from ..batch import BatchSpec
from ..config import Thresholds
from ..diagnosis import Diagnosis, Finding
from .batches import find_batch_files, load_checked
from .checkpoint import Inspection, inspect_checkpoint
from .errors import ReplayError
from .evalpred import predict_eval_loss
from .evidence import BatchRecord, ReplayEvidence
from .logged import find_run_root, logged_for

BATCH_DIRS = (("higgs-diag", "batches"), ("batches",))


def _load_run(path: Path, explicit: bool):
    from ..run.discover import RunReadError
    from ..run.load import load_run

    try:
        return load_run(path)
    except RunReadError as e:
        if explicit:
            raise ReplayError(f"--run {path}: {e}") from None
        return None


def resolve_config(insp: Inspection | None, run_data, required: bool = True):
    """The model config: the checkpoint's (or its base's / --base) config.json, else the run's logged
    ``model_config`` (a wrapper's state dict has no config.json). Recorded on the inspection's source."""
    config, config_from = None, None
    if insp is not None and insp.source.config is not None:
        config, config_from = insp.source.config, insp.source.config_from
    elif run_data is not None and run_data.model_config:
        config, config_from = run_data.model_config, f"the run's logged model_config ({run_data.model_config_file})"
        if insp is not None:
            insp.source.config, insp.source.config_from = config, config_from
    if config is None and required and insp is not None:
        raise ReplayError(f"{insp.source.path}: no config.json and no logged model_config found for this "
                          f"{insp.source.kind} checkpoint; pass --run RUN_DIR (its TensorBoard events hold model_config) "
                          f"or --base PATH (a folder with the base model's config.json)")
    return config, config_from


def load_checkpoint(checkpoint: str | os.PathLike, *, run: str | os.PathLike | None = None,
                    base: str | os.PathLike | None = None, lora_alpha: float | None = None,
                    device: str | None = "auto", dtype: str | None = "auto"):
    """Load any supported checkpoint layout into a ``HiggsAudioModel`` (eval mode, no gradients, LoRA merged).
    Returns ``(model, ModelSource)``; raises :class:`ReplayError` with what to pass."""
    from .model import load_model

    ckpt = Path(checkpoint)
    run_root = Path(run) if run is not None else (find_run_root(ckpt) if ckpt.exists() else None)
    run_data = _load_run(run_root, explicit=run is not None) if run_root is not None else None
    insp = inspect_checkpoint(ckpt, base=base, run_root=run_root if run_data is not None else None,
                              lora_alpha=lora_alpha)
    config, config_from = resolve_config(insp, run_data)
    model, _, _ = load_model(insp, config, config_from, device, dtype)
    return model, insp.source


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return 0, 1, 0
    return (rank, world, local) if world > 1 else (0, 1, 0)


def replay_evidence(checkpoint: str | os.PathLike | None, batches: Iterable[str | os.PathLike] = (), *,
                    run: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                    lora_alpha: float | None = None, no_model: bool = False, device: str | None = "auto",
                    dtype: str | None = "auto", thresholds: Thresholds | None = None, run_obj=None,
                    progress: Callable[[int, int, str], None] | None = None) -> ReplayEvidence:
    """Measure: inspect the checkpoint, read the run's logs, stream the batches (see :func:`replay`)."""
    t = thresholds or Thresholds()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    run_root = Path(run) if run is not None else (find_run_root(ckpt) if ckpt is not None and ckpt.exists() else None)
    if run is not None and not Path(run).exists():
        raise ReplayError(f"--run {run}: no such run directory")
    run_data = run_obj if run_obj is not None else (_load_run(run_root, explicit=run is not None) if run_root else None)
    if run_data is None:
        run_root = None
    insp: Inspection | None = None
    if ckpt is not None:
        insp = inspect_checkpoint(ckpt, base=base, run_root=run_root, lora_alpha=lora_alpha)
    elif not no_model:
        raise ReplayError("no checkpoint given: pass CHECKPOINT (or --no-model to run the batch checks alone)")
    config, config_from = resolve_config(insp, run_data, required=not no_model)
    spec = BatchSpec.from_config(config)
    files = find_batch_files(batches)
    if not files:
        raise ReplayError("no batch files given: pass one or more .pt/.safetensors files or a folder of them")
    timings["inspect"] = time.perf_counter() - t0

    rank, world, local = dist_info()
    mine = files[rank::world]
    model = dev = dt = params = None
    if not no_model:
        from .measure import forward_params
        from .model import load_model

        t1 = time.perf_counter()
        want = device
        if world > 1 and (device or "auto") in ("auto", "cuda"):
            import torch

            want = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        model, dev, dt = load_model(insp, config, config_from, want, dtype)
        params = forward_params(model)
        timings["load"] = time.perf_counter() - t1
    step = insp.source.step if insp is not None else None
    records: list[BatchRecord] = []
    error: str | None = None
    t2 = time.perf_counter()
    try:
        for i, path in enumerate(mine):
            records.append(replay_one(path, spec, t, model, dev, dt, params, run_data, step))
            if progress is not None:
                progress(i + 1, len(mine), str(path))
    except ReplayError as e:
        if world == 1:
            raise
        error = str(e)
    if world > 1:
        records = _gather(records, error, files, dev)
    timings["batches"] = time.perf_counter() - t2
    del model
    ev = ReplayEvidence(source=insp.source if insp else None, batches=records, no_model=no_model,
                        run_root=str(run_root) if run_root else None,
                        run_args=run_data.args if run_data is not None else None,
                        run_model_config_from=run_data.model_config_file if run_data is not None else None,
                        config=config, config_from=config_from,
                        device=str(dev) if dev is not None else None,
                        dtype=str(dt).replace("torch.", "") if dt is not None else None,
                        world_size=world, seconds=timings)
    if insp is not None and records:
        keys = set(records[0].keys)
        for r in records[1:]:
            keys &= set(r.keys)
        ev.eval = predict_eval_loss(ev.run_args, insp.source.model_class, sorted(keys))
    return ev


def replay_one(path: Path, spec: BatchSpec, t: Thresholds, model=None, dev=None, dt=None, params=None, run_data=None,
               checkpoint_step: int | None = None) -> BatchRecord:
    """One batch file: read (weights-only), the trainer's validation and statistics, the forward pass and the
    model checks (when a model is given), the logged losses. Nothing of the batch is kept but the numbers."""
    tensors, rec = load_checked(path, spec, t.replay_masked_share)
    if model is not None:
        from .measure import measure

        rec.model = measure(model, tensors, dev, dt, str(path), params)
    del tensors
    rec.logged = logged_for(rec, run_data, checkpoint_step)
    return rec


def _gather(records: list[BatchRecord], error: str | None, files: list[Path], dev) -> list[BatchRecord]:
    """All ranks' records (plain dicts) on every rank, in file order; any rank's error is raised on all."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if dev is not None and getattr(dev, "type", "cpu") == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    try:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, {"error": error, "records": [r.to_dict() for r in records]})
    finally:
        if created:
            dist.destroy_process_group()
    errors = [o["error"] for o in out if o and o.get("error")]
    if errors:
        raise ReplayError(errors[0])
    order = {str(f): i for i, f in enumerate(files)}
    merged = [BatchRecord.from_dict(d) for o in out for d in o["records"]]
    return sorted(merged, key=lambda r: order.get(r.path, len(order)))


def findings_of(ev: ReplayEvidence, thresholds: Thresholds | None = None) -> list[Finding]:
    from ..checks import run_replay_checks

    return run_replay_checks(ev, thresholds)


def replay(checkpoint: str | os.PathLike | None, batches: Iterable[str | os.PathLike] = (), *,
           run: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
           lora_alpha: float | None = None, no_model: bool = False, device: str | None = "auto",
           dtype: str | None = "auto", thresholds: Thresholds | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> Diagnosis:
    """Replay saved batches through a checkpoint and name the cause.

    ``checkpoint``: a full model folder, a PEFT adapter folder (base from ``base`` or the adapter's
    ``base_model_name_or_path``), a wrapper's ``model.safetensors`` folder, or ``checkpoint-N`` with
    ``lora_adapters/``. ``batches``: ``.pt`` (loaded with ``weights_only=True``) or ``.safetensors`` files, or
    folders of them. ``run``: the output_dir whose logs give the logged losses, ``args`` and ``model_config``
    (default: discovered from the checkpoint's parent). ``no_model``: only the batch checks (no torch model,
    no boson_multimodal). ``lora_alpha``: for a wrapper state dict with LoRA weights and no adapter_config.json
    near it. Raises :class:`ReplayError` (one line, naming the file) for input it cannot use.
    """
    ev = replay_evidence(checkpoint, batches, run=run, base=base, lora_alpha=lora_alpha, no_model=no_model,
                         device=device, dtype=dtype, thresholds=thresholds, progress=progress)
    target = str(checkpoint) if checkpoint is not None else ", ".join(b.path for b in ev.batches[:3])
    return Diagnosis(target=target, findings=findings_of(ev, thresholds), summary={"replay": ev.summary()})


# ---- analyze RUN --replay ----------------------------------------------------------------------------------
def find_run_batches(run_dir: Path) -> list[Path]:
    """The batch dumps of a run: ``higgs-diag/batches/`` (the trainer's), else a ``batches/`` folder."""
    for parts in BATCH_DIRS:
        d = run_dir.joinpath(*parts)
        if d.is_dir():
            files = find_batch_files([d]) if any(d.iterdir()) else []
            if files:
                return files
    return []


def latest_checkpoint(run, run_dir: Path, base=None, lora_alpha=None) -> Path:
    """The latest checkpoint of the run that can be loaded (highest step first, the output_dir's own final
    save last)."""
    cands = [Path(c.path) for c in sorted(run.checkpoints, key=lambda c: (c.step is not None, c.step or 0),
                                          reverse=True)] if run is not None else []
    cands.append(run_dir)
    reasons = []
    for c in cands:
        try:
            inspect_checkpoint(c, base=base, run_root=run_dir, lora_alpha=lora_alpha)
            return c
        except ReplayError as e:
            reasons.append(str(e))
    raise ReplayError(f"{run_dir}: no loadable checkpoint ({reasons[0] if reasons else 'none found'}); pass "
                      f"--checkpoint PATH (and --base PATH for an adapter)")


def replay_run_evidence(run_dir: str | os.PathLike, run=None, *, batches: Iterable[str | os.PathLike] = (),
                        checkpoint: str | os.PathLike | None = None, base=None, lora_alpha=None,
                        no_model: bool = False, device="auto", dtype="auto", thresholds=None,
                        progress=None) -> ReplayEvidence:
    run_dir = Path(run_dir)
    files = list(batches) or find_run_batches(run_dir)
    if not files:
        raise ReplayError(f"{run_dir}: no batch files in {run_dir / 'higgs-diag' / 'batches'} or {run_dir / 'batches'}; "
                          f"pass --batches PATH")
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run, run_dir, base, lora_alpha)
    return replay_evidence(ckpt, files, run=run_dir, base=base, lora_alpha=lora_alpha, no_model=no_model,
                           device=device, dtype=dtype, thresholds=thresholds, run_obj=run, progress=progress)


def merge(diag: Diagnosis, ev: ReplayEvidence, thresholds: Thresholds | None = None) -> Diagnosis:
    """One report from the log findings and the replay findings (causes linked across both)."""
    from ..checks import link_causes

    found = list(diag.findings) + findings_of(ev, thresholds)
    link_causes(found)
    summary = dict(diag.summary)
    summary["replay"] = ev.summary()
    return Diagnosis(target=diag.target, findings=found, summary=summary, tool_version=diag.tool_version)


CHECKPOINT_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
                      "adapter_model.safetensors", "lora_adapters", "pytorch_model.bin", "adapter_model.bin")


def is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in CHECKPOINT_MARKERS)


def split_paths(paths: list[Path], no_model: bool = False) -> tuple[Path | None, list[Path]]:
    """``CHECKPOINT BATCH...`` from the command line; with ``--no-model`` the checkpoint may be left out."""
    if not paths:
        raise ReplayError("pass CHECKPOINT and at least one BATCH file or folder")
    first, rest = Path(paths[0]), [Path(p) for p in paths[1:]]
    if is_checkpoint_dir(first) or (first.is_file() and first.name == "model.safetensors"):
        if not rest:
            raise ReplayError(f"{first}: no batch given: pass one or more batch files or folders after the checkpoint")
        return first, rest
    if no_model:
        return None, [first, *rest]
    if not first.exists():
        raise ReplayError(f"{first}: no such checkpoint folder")
    raise ReplayError(f"{first}: not a checkpoint folder (no config.json, model.safetensors or adapter_config.json); "
                      f"pass CHECKPOINT first, then the batches (or --no-model to check batches alone)")
