"""The measuring half of ``higgs-diag replay-batch`` and ``higgs-diag analyze --replay``: checkpoint + batch
files -> a :class:`higgs_diag.evidence.ReplayEvidence` (plain numbers). The rules in ``higgs_diag.checks`` judge
the evidence and ``higgs_diag.api`` composes both; nothing here builds findings.

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
from ..config import ReplayOptions, Thresholds
from ..evidence import BatchRecord, ReplayEvidence
from ..layout import SAFETENSORS_WEIGHTS, is_checkpoint_dir
from .batches import find_batch_files, load_checked
from .checkpoint import Inspection, inspect_checkpoint
from .errors import ReplayError
from .evalpred import predict_eval_loss
from .logged import find_run_root, logged_for
from .pairing import assign, loadable_checkpoints

BATCH_DIRS = (("higgs-diag", "batches"), ("batches",))


def _load_run(run_dir: Path, explicit: bool):
    from ..run.discover import RunReadError
    from ..run.load import load_run

    try:
        return load_run(run_dir)
    except RunReadError as e:
        if explicit:
            raise ReplayError(f"--run {run_dir}: {e}") from None
        return None


def resolve_config(insp: Inspection | None, run, required: bool = True):
    """The model config: the checkpoint's (or its base's / --base) config.json, else the run's logged
    ``model_config`` (a wrapper's state dict has no config.json). Recorded on the inspection's source."""
    config, config_from = None, None
    if insp is not None and insp.source.config is not None:
        config, config_from = insp.source.config, insp.source.config_from
    elif run is not None and run.model_config:
        config, config_from = run.model_config, f"the run's logged model_config ({run.model_config_file})"
        if insp is not None:
            insp.source.config, insp.source.config_from = config, config_from
    if config is None and required and insp is not None:
        raise ReplayError(f"{insp.source.path}: no config.json and no logged model_config found for this "
                          f"{insp.source.kind} checkpoint; pass --run RUN_DIR (its TensorBoard events hold model_config) "
                          f"or --base PATH (a folder with the base model's config.json)")
    return config, config_from


def load_checkpoint(checkpoint: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
                    options: ReplayOptions = ReplayOptions()):
    """Load any supported checkpoint layout into a ``HiggsAudioModel`` (eval mode, no gradients, LoRA merged).
    Returns ``(model, ModelSource)``; raises :class:`ReplayError` with what to pass."""
    from .model import load_model

    ckpt = Path(checkpoint)
    root = Path(run_dir) if run_dir is not None else (find_run_root(ckpt) if ckpt.exists() else None)
    run = _load_run(root, explicit=run_dir is not None) if root is not None else None
    insp = inspect_checkpoint(ckpt, base=options.base, run_root=root if run is not None else None,
                              lora_alpha=options.lora_alpha)
    config, config_from = resolve_config(insp, run)
    model, _, _ = load_model(insp, config, config_from, options.device, options.dtype)
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


def measure(checkpoint: str | os.PathLike | None, batches: Iterable[str | os.PathLike] = (), *,
            run_dir: str | os.PathLike | None = None, run=None, options: ReplayOptions = ReplayOptions(),
            thresholds: Thresholds | None = None, batch_step: int | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> ReplayEvidence:
    """Inspect the checkpoint, read the run's logs (``run``, else ``run_dir``, else the checkpoint's output_dir)
    and stream the batches through the model; raises :class:`ReplayError` (one line) for unusable input.

    ``checkpoint``: a full model folder, a PEFT adapter folder (base from ``options.base`` or the adapter's
    ``base_model_name_or_path``), a wrapper's ``model.safetensors`` folder, or ``checkpoint-N`` with
    ``lora_adapters/``. ``batches``: ``.pt`` (loaded with ``weights_only=True``) or ``.safetensors`` files, or
    folders of them. ``options.no_model``: only the batch statistics (no torch model, no boson_multimodal)."""
    t = thresholds or Thresholds()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if run_dir is not None and not Path(run_dir).exists():
        raise ReplayError(f"--run {run_dir}: no such run directory")
    root = Path(run_dir) if run_dir is not None else (
        find_run_root(ckpt) if ckpt is not None and ckpt.exists() else None)
    if run is None and root is not None:
        run = _load_run(root, explicit=run_dir is not None)
    if run is None:
        root = None
    insp: Inspection | None = None
    if ckpt is not None:
        insp = inspect_checkpoint(ckpt, base=options.base, run_root=root, lora_alpha=options.lora_alpha)
    elif not options.no_model:
        raise ReplayError("no checkpoint given: pass CHECKPOINT (or --no-model to run the batch checks alone)")
    config, config_from = resolve_config(insp, run, required=not options.no_model)
    spec = BatchSpec.from_config(config)
    files = find_batch_files(batches)
    if not files:
        raise ReplayError("no batch files given: pass one or more .pt/.safetensors files or a folder of them")
    timings["inspect"] = time.perf_counter() - t0

    rank, world, local = dist_info()
    mine = files[rank::world]
    model = dev = dt = params = None
    if not options.no_model:
        from .measure import forward_params
        from .model import load_model

        t1 = time.perf_counter()
        want = options.device
        if world > 1 and (want or "auto") in ("auto", "cuda"):
            import torch

            want = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        model, dev, dt = load_model(insp, config, config_from, want, options.dtype)
        params = forward_params(model)
        timings["load"] = time.perf_counter() - t1
    step = insp.source.step if insp is not None else None
    records: list[BatchRecord] = []
    error: str | None = None
    t2 = time.perf_counter()
    try:
        for i, path in enumerate(mine):
            rec = measure_one(path, spec, t, model, dev, dt, params, run, step, batch_step)
            rec.checkpoint, rec.checkpoint_step = (str(ckpt), step) if ckpt is not None else (None, None)
            records.append(rec)
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
    ev = ReplayEvidence(source=insp.source if insp else None, batches=records, no_model=options.no_model,
                        run_root=str(root) if root else None,
                        run_args=run.args if run is not None else None,
                        run_model_config_from=run.model_config_file if run is not None else None,
                        config=config, config_from=config_from,
                        device=str(dev) if dev is not None else None,
                        dtype=str(dt).replace("torch.", "") if dt is not None else None,
                        world_size=world, seconds=timings, run=run)
    if insp is not None:
        from .weights import fingerprint

        w = fingerprint(insp)
        ev.weights = [w] if w is not None else []
    if insp is not None and records:
        keys = set(records[0].keys)
        for r in records[1:]:
            keys &= set(r.keys)
        ev.eval = predict_eval_loss(ev.run_args, insp.source.model_class, sorted(keys))
    return ev


def measure_one(path: Path, spec: BatchSpec, t: Thresholds, model=None, dev=None, dt=None, params=None, run=None,
                checkpoint_step: int | None = None, batch_step: int | None = None) -> BatchRecord:
    """One batch file: read (weights-only), the trainer's validation and statistics, the forward pass and the
    model checks (when a model is given), the logged losses. Nothing of the batch is kept but the numbers."""
    tensors, rec = load_checked(path, spec, t.replay_masked_share, step=batch_step)
    if model is not None:
        from .measure import measure

        rec.model = measure(model, tensors, dev, dt, str(path), params)
    del tensors
    rec.logged = logged_for(rec, run, checkpoint_step)
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


def latest_checkpoint(run, run_dir: Path, options: ReplayOptions = ReplayOptions()) -> Path:
    """The latest checkpoint of the run that can be loaded (the output_dir's own final save when there is none)."""
    found, reasons = loadable_checkpoints(run, run_dir, options)
    if not found:
        raise ReplayError(f"{run_dir}: no loadable checkpoint ({reasons[0] if reasons else 'none found'}); pass "
                          f"--checkpoint PATH (and --base PATH for an adapter)")
    return found[-1][1]


def measure_run(run_dir: str | os.PathLike, run=None, *, batches: Iterable[str | os.PathLike] = (),
                checkpoint: str | os.PathLike | None = None, options: ReplayOptions = ReplayOptions(),
                thresholds: Thresholds | None = None, all_checkpoints: bool = False, batch_step: int | None = None,
                progress=None) -> ReplayEvidence:
    """:func:`measure` for a run: its own batch dumps (or ``batches``), each replayed through the checkpoint
    nearest its step (``all_checkpoints``: through every one; ``checkpoint``: through that one), and the
    fingerprints of all its checkpoints' trainable weights."""
    run_dir = Path(run_dir)
    files = find_batch_files(batches) if batches else find_run_batches(run_dir)
    if not files:
        raise ReplayError(f"{run_dir}: no batch files in {run_dir / 'higgs-diag' / 'batches'} or {run_dir / 'batches'}; "
                          f"pass --batches PATH")
    found, reasons = loadable_checkpoints(run, run_dir, options)
    if checkpoint is not None:
        groups = {Path(checkpoint): files}
    elif options.no_model:
        groups = {found[-1][1] if found else None: files}
    elif not found:
        raise ReplayError(f"{run_dir}: no loadable checkpoint ({reasons[0] if reasons else 'none found'}); pass "
                          f"--checkpoint PATH (and --base PATH for an adapter)")
    else:
        groups = assign(files, found, all_checkpoints=all_checkpoints, step_override=batch_step)
    parts = [measure(ck, fs, run_dir=run_dir, run=run, options=options, thresholds=thresholds,
                     batch_step=batch_step, progress=progress) for ck, fs in groups.items()]
    ev = ReplayEvidence.merge(parts)
    ev.weights = [w for w in (_fingerprint(p, run_dir, options) for _, p in found) if w is not None]
    return ev


def _fingerprint(checkpoint: Path, run_dir: Path, options: ReplayOptions):
    from .weights import fingerprint

    try:
        return fingerprint(inspect_checkpoint(checkpoint, base=options.base, run_root=run_dir,
                                              lora_alpha=options.lora_alpha))
    except (ReplayError, OSError, ValueError):
        return None  # a checkpoint that cannot be fingerprinted says nothing about learning


def split_paths(paths: list[Path], no_model: bool = False) -> tuple[Path | None, list[Path]]:
    """``CHECKPOINT BATCH...`` from the command line; with ``--no-model`` the checkpoint may be left out."""
    if not paths:
        raise ReplayError("pass CHECKPOINT and at least one BATCH file or folder")
    first, rest = Path(paths[0]), [Path(p) for p in paths[1:]]
    if is_checkpoint_dir(first) or (first.is_file() and first.name == SAFETENSORS_WEIGHTS):
        if not rest:
            raise ReplayError(f"{first}: no batch given: pass one or more batch files or folders after the checkpoint")
        return first, rest
    if no_model:
        return None, [first, *rest]
    if not first.exists():
        raise ReplayError(f"{first}: no such checkpoint folder")
    raise ReplayError(f"{first}: not a checkpoint folder (no config.json, model.safetensors or adapter_config.json); "
                      f"pass CHECKPOINT first, then the batches (or --no-model to check batches alone)")
