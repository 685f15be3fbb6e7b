#!/usr/bin/env python
"""Cost of the per-batch validation (higgs_diag.batch.validate_batch) against a training step, run by hand:

    .venv/bin/python benchmarks/bench_batch_validation.py [--reps 3000] [--steps 300]

(a) validate_batch on the fixtures' batch (4 samples, 4 codebooks, delay pattern), as HiggsAudioTrainer calls it
    before every forward;
(b) one training step of the 33 k-parameter tiny HiggsAudioModel: HiggsAudioTrainer.training_step (forward,
    the shifted dual loss, backward) + optimizer step + zero_grad, with batch validation off;
(c) one step of the full HF training loop (dataloader, collate, step, logging every 50 steps), measured as the
    train_runtime of a HiggsAudioTrainer run divided by its steps, validation off and strict in alternating
    rounds (the difference is the validation's cost inside the loop; on a shared machine it drowns in noise);
(d) validate_batch on a release-size batch (8 codebooks x 1026 classes, 16 segments of 500 frames, 16 x 512 text
    tokens), for scale: a step of the 3B model on such a batch takes seconds.
Medians of repeated timings; 2 threads.

Target (docs/performance.md, "Batch validation inside the trainer"): (a) under 2 % of (b), cheap enough to leave
on before every forward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_runs as M  # noqa: E402
from _targets import target  # noqa: E402

from transformers import TrainingArguments  # noqa: E402

from higgs_diag.batch import BatchSpec, validate_batch  # noqa: E402
from higgs_diag.trainer import HiggsAudioTrainer  # noqa: E402


GOAL_SHARE = 0.02  # validate_batch under 2 % of a bare training step of the tiny model (docs/performance.md)


def per_call(fn, reps: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time of one call, in seconds."""
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t) / reps)
    return statistics.median(out)


def args(out, steps, **kw):
    return TrainingArguments(output_dir=str(out), report_to=[], logging_steps=50, per_device_train_batch_size=4,
                             learning_rate=2e-3, max_steps=steps, save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, seed=M.SEED, logging_nan_inf_filter=False, **kw)


def release_batch():
    g = torch.Generator().manual_seed(0)
    C, V, n_seg, frames, B, T = 8, 1024, 16, 500, 16, 512
    out = torch.randint(0, V, (C, n_seg * frames), generator=g)
    lab = out.clone()
    starts = torch.arange(n_seg) * frames
    for a in starts.tolist():
        out[:, a], out[:, a + frames - 1] = V, V + 1
        lab[:, a] = -100
        for k in range(1, C):  # delay-pattern fills
            out[k, a + 1:a + 1 + k] = V
            lab[k, a + 1:a + 1 + k] = -100
    ids = torch.randint(0, 128000, (B, T), generator=g)
    ids[:, 100] = 128016  # one <|AUDIO_OUT|> per sample
    text_lab = torch.full_like(ids, -100)
    text_lab[:, 99:103] = ids[:, 99:103]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), label_ids=text_lab, audio_out_ids=out,
                 label_audio_ids=lab, audio_out_ids_start=starts, audio_out_ids_start_group_loc=torch.arange(B))
    spec = BatchSpec(num_codebooks=C, codebook_size=V, stream_bos_id=V, stream_eos_id=V + 1, use_delay_pattern=True,
                     audio_out_token_idx=128016, vocab_size=128256)
    return batch, spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3, help="alternating off/strict rounds of the loop timing (c)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    import tempfile

    spec = BatchSpec.from_config(M.tiny_config())
    batch = M.collate(M.make_samples(4, 7))
    assert validate_batch(batch, spec) == []
    t_val = per_call(lambda: validate_batch(batch, spec), a.reps)

    with tempfile.TemporaryDirectory() as tmp:
        tr = HiggsAudioTrainer(model=M.tiny_model(), args=args(tmp, 10), train_dataset=M.SyntheticTTS([]),
                               data_collator=M.collate, batch_validation="off", startup_validation="off",
                               audio_monitor=False)
        tr.create_optimizer()
        model = tr.model

        def step():
            tr.training_step(model, batch)
            tr.optimizer.step()
            model.zero_grad()

        t_step = per_call(step, max(a.steps // 5, 20))

        train, _ = M.data(n_train=1024, n_eval=1)
        loop = {}
        for i in range(a.rounds):  # alternate the order: the machine's load drifts
            for mode in ("off", "strict") if i % 2 == 0 else ("strict", "off"):
                tr = HiggsAudioTrainer(model=M.tiny_model(), args=args(tmp, a.steps), train_dataset=train,
                                       data_collator=M.collate, batch_validation=mode, startup_validation="off",
                                       audio_monitor=False)
                out = tr.train()
                loop.setdefault(mode, []).append(out.metrics["train_runtime"] / a.steps)
        t_loop = {m: statistics.median(v) for m, v in loop.items()}
        spread = {m: (min(v), max(v)) for m, v in loop.items()}

    big, big_spec = release_batch()
    assert validate_batch(big, big_spec) == [], validate_batch(big, big_spec)
    t_big = per_call(lambda: validate_batch(big, big_spec), max(a.reps // 30, 20))

    print(f"(a) validate_batch, tiny batch             {t_val * 1e3:8.3f} ms")
    print(f"(b) training step (fwd+loss+bwd+optim)     {t_step * 1e3:8.3f} ms   ratio a/b = {t_val / t_step:.2%}")
    for m, label in (("off", "validation off   "), ("strict", "validation strict")):
        lo, hi = spread[m]
        print(f"(c) HF loop step, {label}       {t_loop[m] * 1e3:8.3f} ms   (median of {a.rounds}; "
              f"range {lo * 1e3:.2f}..{hi * 1e3:.2f} ms)")
    print(f"    ratio a/c = {t_val / t_loop['off']:.2%}; in-loop difference strict - off = "
          f"{(t_loop['strict'] - t_loop['off']) / t_loop['off']:+.2%} (compare with the ranges: noise)")
    print(f"(d) validate_batch, release-size batch     {t_big * 1e3:8.3f} ms")
    share = t_val / t_step
    target("batch validation: cost vs a training step (tiny)", f"{share:.2%}", f"< {GOAL_SHARE:.0%} of a step",
           share < GOAL_SHARE, note=f"(a) {t_val * 1e3:.3f} ms / (b) {t_step * 1e3:.2f} ms; "
                                    f"{t_val / t_loop['off']:.2%} of an HF loop step; load average "
                                    f"{os.getloadavg()[0]:.1f}: a busy machine slows (b) more than (a)")


if __name__ == "__main__":
    sys.exit(main())
