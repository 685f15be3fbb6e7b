"""Benchmark: the per-batch cost of `higgs-diag replay-batch` over a bare forward pass, and its peak memory
(run by hand: `python benchmarks/bench_replay.py`; results in docs/performance.md).

Generates once, into benchmarks/_data/replay/ (gitignored), a randomly initialised HiggsAudioModel at a size a
2-core CPU can still run (the real 3.6B model cannot): the release's vocabulary (128,256 text tokens) and audio
head (8 codebooks x 1,026 classes), hidden 1024, 4 layers with the dual audio FFN in two of them (~330 M
parameters, saved as checkpoint-1000/model.safetensors), and 6 batch files of 2 TTS samples each (200 prompt
tokens, 300 audio frames with the delay pattern: ~515 positions per sample), written with save_batch.

Each measurement runs in a fresh process (wall times from time.perf_counter, RSS and its peak from
/proc/self/status, the peak reset after loading so that the batch phase is measured on its own):
  paired    the overhead: one process, the model loaded once, every batch twice (2 rounds), alternating
            "bare" (read the file + model(**batch) under inference_mode) and "replay" (measure_one: read,
            the trainer's validation and statistics, forward, model checks, logged losses); the ratio of
            each pair survives other load on a shared machine
  bare      load the model (the replay's loader), read all batches into memory, then time
            `model(**batch)` under torch.inference_mode for every batch
  replay    higgs_diag.replay.api.measure(checkpoint, batch folder): per batch, read the file
            (weights-only), run the trainer's batch validation and statistics, forward, the model checks
            (shifted/unshifted CE per codebook, copy rates, finiteness), the logged-loss lookup

The first batch (pair) of every process is a warm-up and is left out of the medians.

Throughput and memory of the command itself, each a fresh `higgs-diag replay-batch CKPT BATCH... --format json
--device cpu` process (batches/s = batches / the report's `seconds.batches`, the batch phase after loading; wall =
the whole process; peak RSS = the largest process, from os.wait4):
  tiny      the fixture model (fixtures/replay/healthy/checkpoint-200, 33,504 parameters) over 50 batches (its two
            dumps copied 25 times into benchmarks/_data/replay/tiny-batches/), 1 thread
  344M      the model above over 1, 6 and 12 batches (batches-12/: the 6 files hard-linked twice): peak memory
            must not grow with the number of batches
  torchrun  12 batches of the 344M model: `torchrun --standalone --nproc_per_node 2 -m higgs_diag.cli
            replay-batch ...` (the files split across the ranks, gathered, one report) with 1 thread per process,
            against 1 process with 2 threads (the same 2 cores), and 1 process with 1 thread (for scale)
`--device cuda` (torchrun ranks on `cuda:LOCAL_RANK`) runs the throughput and torchrun parts on GPUs; the
development machine has none, so the numbers in docs/performance.md are CPU only.

Targets (benchmarks/_targets.py): overhead of the checks over a bare forward < 10 %; peak RSS with 12 batches
<= 1.05 x with 1 batch; torchrun 2 processes x 1 thread >= 0.8 x 2 = 1.6 x the batches/s of 1 process x 1 thread
(the split scales with its ranks, the rule of the triage target; a rank stands for a device, here one core). The
2 processes against 1 process x 2 threads is printed beside it: on a CPU both use the 2 cores, and on the quiet
machine they tie (1.01x); it is not the split's target (it was until 2026-12-01, >= 1.5x, met only under load).

Usage: python benchmarks/bench_replay.py [--regenerate] [--threads 2] [--only overhead,throughput,torchrun]
                                        [--rounds 1] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "_data" / "replay"
CKPT = DATA / "checkpoint-1000"
BATCHES = DATA / "batches"
BATCHES_12 = DATA / "batches-12"
TINY = REPO / "fixtures" / "replay" / "healthy"  # only read
TINY_CKPT = TINY / "checkpoint-200"
TINY_BATCHES = DATA / "tiny-batches"
TINY_COPIES = 25
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from _proc import measure  # noqa: E402  (wall s and peak RSS of a fresh process, its output)
from _targets import target  # noqa: E402
from higgs_diag.config import ReplayOptions  # noqa: E402

N_BATCHES, SAMPLES, PROMPT, FRAMES = 6, 2, 200, 300
ROUNDS = 2  # paired measurement: every batch twice, bare and replay alternating
VOCAB = 128256
AUDIO_IN, AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS, EOT, PAD = 128015, 128016, 128013, 128012, 128009, 128001
CODEBOOKS, CODEBOOK_SIZE = 8, 1024


def bench_config():
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return HiggsAudioConfig(
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=4096, pad_token_id=PAD),
        audio_adapter_type="dual_ffn_fast_forward", audio_dual_ffn_layers=[1, 3],
        audio_num_codebooks=CODEBOOKS, audio_codebook_size=CODEBOOK_SIZE, audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1, use_delay_pattern=True, skip_audio_tower=True,
        encode_whisper_embed=False, encode_audio_in_tokens=True, audio_in_token_idx=AUDIO_IN,
        audio_out_token_idx=AUDIO_OUT, pad_token_id=PAD, audio_out_bos_token_id=AUDIO_OUT_BOS,
        audio_eos_token_id=AUDIO_EOS)


def make_batch(g):
    """One collated batch, aligned like boson's HiggsAudioSampleCollator (FACTS §1)."""
    import torch
    from boson_multimodal.model.higgs_audio.utils import build_delay_pattern_mask

    bos, eos = CODEBOOK_SIZE, CODEBOOK_SIZE + 1
    ids, labels, outs, labs = [], [], [], []
    for _ in range(SAMPLES):
        prompt = torch.randint(0, 120000, (PROMPT,), generator=g).tolist()
        answer = [AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS, EOT]
        ids.append(torch.tensor(prompt + answer))
        labels.append(torch.tensor([-100] * PROMPT + [AUDIO_OUT_BOS, -100, AUDIO_EOS, EOT]))
        codes = torch.randint(0, CODEBOOK_SIZE, (CODEBOOKS, FRAMES), generator=g)
        a = torch.cat([torch.full((CODEBOOKS, 1), bos), codes, torch.full((CODEBOOKS, 1), eos)], 1)
        lab = torch.cat([torch.full((CODEBOOKS, 1), -100), codes, torch.full((CODEBOOKS, 1), eos)], 1)
        outs.append(build_delay_pattern_mask(a[None], bos_token_id=bos, pad_token_id=eos)[0][0])
        labs.append(build_delay_pattern_mask(lab[None], bos_token_id=-100, pad_token_id=-100)[0][0])
    lengths = torch.tensor([o.shape[1] for o in outs])
    return {
        "input_ids": torch.stack(ids), "attention_mask": torch.ones(SAMPLES, PROMPT + 4, dtype=torch.long),
        "label_ids": torch.stack(labels),
        "audio_in_ids": torch.zeros((0, 0), dtype=torch.long), "audio_in_ids_start": torch.zeros(0, dtype=torch.long),
        "audio_out_ids": torch.cat(outs, 1).long(),
        "audio_out_ids_start": torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]), 0),
        "audio_out_ids_start_group_loc": torch.arange(SAMPLES),
        "label_audio_ids": torch.cat(labs, 1).long(),
    }


def generate():
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_diag.batch import save_batch

    if DATA.exists():
        shutil.rmtree(DATA)
    torch.manual_seed(0)
    model = HiggsAudioModel(bench_config())
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(CKPT, safe_serialization=True)
    del model
    g = torch.Generator().manual_seed(1)
    for i in range(N_BATCHES):
        save_batch(BATCHES / f"step-{1000 + i:06d}.pt", make_batch(g), {"step": 1000 + i})
    (DATA / "params.txt").write_text(str(n))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset VmHWM so that the peak of the batch phase is measured apart from the load (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(mode: str) -> dict:
    import torch

    out: dict = {"mode": mode}
    t0 = time.perf_counter()
    if mode == "paired":  # same process, alternating: the ratio survives a noisy, shared machine
        from higgs_diag.batch import BatchSpec, load_batch
        from higgs_diag.config import Thresholds
        from higgs_diag.replay.api import load_checkpoint, measure_one
        from higgs_diag.replay.measure import forward_params

        model, source = load_checkpoint(CKPT, options=ReplayOptions(device="cpu", dtype="float32"))
        spec, params, dev = BatchSpec.from_config(source.config), forward_params(model), torch.device("cpu")
        files = sorted(BATCHES.iterdir())
        bare, rep, checks = [], [], []
        for rnd in range(ROUNDS):
            for i, f in enumerate(files):
                for which in (("bare", "replay") if (i + rnd) % 2 == 0 else ("replay", "bare")):
                    t = time.perf_counter()
                    if which == "bare":  # what any evaluation does per batch: read it, run the model
                        batch = load_batch(f)[0]
                        with torch.inference_mode():
                            model(**batch)
                        del batch
                        bare.append(time.perf_counter() - t)
                    else:
                        rec = measure_one(f, spec, Thresholds(), model, dev, torch.float32, params)
                        rep.append(time.perf_counter() - t)
                        checks.append(rec.model.check_seconds)
        out.update(bare_s=bare, replay_s=rep, check_s=checks)
    elif mode == "bare":
        from higgs_diag.batch import load_batch
        from higgs_diag.replay.api import load_checkpoint

        model, _ = load_checkpoint(CKPT, options=ReplayOptions(device="cpu", dtype="float32"))
        out["load_s"] = time.perf_counter() - t0
        out["rss_after_load_mb"] = _status("VmRSS")
        batches = [load_batch(p)[0] for p in sorted(BATCHES.iterdir())]
        _reset_peak()
        times = []
        for b in batches:
            t = time.perf_counter()
            with torch.inference_mode():
                model(**b)
            times.append(time.perf_counter() - t)
        out["forward_s"] = times
        out["batch_phase_peak_mb"] = _status("VmHWM")
    else:
        from higgs_diag.replay.api import measure

        files = sorted(BATCHES.iterdir())
        per: list[float] = []
        last = [time.perf_counter()]

        def tick(i, n, path):
            if i == 1:  # the model is loaded and the first batch replayed: measure the batch phase from here
                out["rss_after_first_batch_mb"] = _status("VmRSS")
                _reset_peak()
            now = time.perf_counter()
            per.append(now - last[0])
            last[0] = now

        ev = measure(CKPT, files, options=ReplayOptions(device="cpu", dtype="float32"), progress=tick)
        per[0] -= ev.seconds.get("load", 0.0) + ev.seconds.get("inspect", 0.0)  # the first tick includes loading
        out["load_s"] = ev.seconds.get("load")
        out["per_batch_s"] = per
        out["forward_s"] = [b.model.forward_seconds for b in ev.batches]
        out["check_s"] = [b.model.check_seconds for b in ev.batches]
        out["batch_phase_peak_mb"] = _status("VmHWM")
        from higgs_diag.api import diagnose

        out["findings"] = [f.code for f in diagnose(None, evidence=ev).findings]
    out["peak_rss_mb"] = _rss_mb()
    return out


def run_child(mode: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare_copies() -> None:
    """The tiny model's batches x TINY_COPIES (copies: fixtures/ is only read) and the 6 big batches twice."""
    if not TINY_BATCHES.is_dir() or len(list(TINY_BATCHES.iterdir())) != 2 * TINY_COPIES:
        shutil.rmtree(TINY_BATCHES, ignore_errors=True)
        TINY_BATCHES.mkdir(parents=True)
        for f in sorted((TINY / "higgs-diag" / "batches").glob("*.pt")):
            for i in range(TINY_COPIES):
                shutil.copyfile(f, TINY_BATCHES / f"{f.stem}-copy{i:02d}.pt")
    if not BATCHES_12.is_dir() or len(list(BATCHES_12.iterdir())) != 2 * N_BATCHES:
        shutil.rmtree(BATCHES_12, ignore_errors=True)
        BATCHES_12.mkdir(parents=True)
        for f in sorted(BATCHES.iterdir()):
            for i in range(2):
                os.link(f, BATCHES_12 / f"{f.stem}-{i}.pt")


DEVICE = "cpu"  # --device: what the throughput and torchrun parts pass to replay-batch


def run_cli(ckpt: Path, batches: list[Path], threads: int, nproc: int = 1) -> dict:
    """One `higgs-diag replay-batch` process (under torchrun with ``nproc`` > 1): its report's replay numbers,
    wall seconds and the peak RSS of its largest process."""
    args = ["replay-batch", str(ckpt), *map(str, batches), "--format", "json", "--fail-on", "never",
            "--device", DEVICE]
    if nproc > 1:
        argv = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
                "-m", "higgs_diag.cli", *args]
    else:
        argv = [str(Path(sys.executable).with_name("higgs-diag")), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    m = measure(argv, env)
    if m["rc"] != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({m['rc']}):\n{m['stderr'][-3000:]}")
    rep = json.loads(m["stdout"])["summary"]["replay"]
    n, sec = rep["n_batches"], rep["seconds"]
    return {"n": n, "world": rep["world_size"], "batches_s": sec["batches"], "load_s": sec.get("load", 0.0),
            "wall": m["wall"], "rss_mb": m["rss_mb"], "per_s": n / sec["batches"], "model": rep["model"]}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _row(label: str, m: dict) -> None:
    print(f"  {label:44} {m['n']:>4} {m['per_s']:9.2f} {m['batches_s']:9.2f} {m['load_s']:7.2f} {m['wall']:8.2f} "
          f"{m['rss_mb']:9.0f}", flush=True)


def throughput(threads: int) -> None:
    prepare_copies()
    import torch

    print(f"\nthroughput, fresh `higgs-diag replay-batch ... --format json --device {DEVICE}` processes "
          f"(cores available {len(os.sched_getaffinity(0))}; GPU: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none here, --device cuda not measured'})")
    print(f"  {'':44} {'n':>4} {'batch/s':>9} {'batches s':>9} {'load s':>7} {'wall s':>8} {'peak MB':>9}")
    from safetensors import safe_open

    with safe_open(str(TINY_CKPT / "model.safetensors"), framework="pt") as f:
        n_tiny = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    tiny = run_cli(TINY_CKPT, [TINY_BATCHES], 1)
    _row(f"tiny fixture model ({n_tiny:,} params), 1 thread", tiny)
    mem = {k: run_cli(CKPT, files, threads) for k, files in
           ((1, [sorted(BATCHES.iterdir())[0]]), (6, [BATCHES]), (12, [BATCHES_12]))}
    for k, m in mem.items():
        _row(f"344M model, {k} batch{'es' if k > 1 else ''}, {threads} threads", m)
    grow = mem[12]["rss_mb"] / mem[1]["rss_mb"]
    target("replay: peak RSS, 12 batches vs 1 (344M model)", f"{grow:.3f}x", "<= 1.05x", grow <= 1.05,
           note=f"{mem[1]['rss_mb']:.0f} / {mem[6]['rss_mb']:.0f} / {mem[12]['rss_mb']:.0f} MB for 1 / 6 / 12")


def torchrun_split(rounds: int) -> None:
    prepare_copies()
    print(f"\ntorchrun split, 12 batches of the 344M model ({rounds} round(s), the three ways alternating)")
    print(f"  {'':44} {'n':>4} {'batch/s':>9} {'batches s':>9} {'load s':>7} {'wall s':>8} {'peak MB':>9}")
    ways = (("2 processes (torchrun) x 1 thread", 1, 2), ("1 process x 2 threads", 2, 1),
            ("1 process x 1 thread", 1, 1))
    got: dict = {w[0]: [] for w in ways}
    for r in range(rounds):
        for label, threads, nproc in (ways if r % 2 == 0 else ways[::-1]):
            got[label].append(run_cli(CKPT, [BATCHES_12], threads, nproc))
            _row(label, got[label][-1])
    med = lambda ms, k: statistics.median(m[k] for m in ms)  # noqa: E731
    two, one2, one1 = (got[w[0]] for w in ways)
    ratio = med(two, "per_s") / med(one2, "per_s")
    wall_ratio = med(one2, "wall") / med(two, "wall")
    a_, b_ = two[0], one2[0]  # the same numbers from the split run (gathered over the ranks) and one process
    same = a_["n"] == b_["n"] == 2 * N_BATCHES and a_["world"] == 2 and a_["model"]["n_audio_per_cb"] == \
        b_["model"]["n_audio_per_cb"] and all(abs(x - y) <= 1e-5 * abs(y) for x, y in
                                              zip(a_["model"]["audio_ce_per_cb"], b_["model"]["audio_ce_per_cb"]))
    print(f"  batches/s ratio: 2 processes x 1 thread / 1 process x 2 threads {ratio:.2f}x; "
          f"/ 1 process x 1 thread {med(two, 'per_s') / med(one1, 'per_s'):.2f}x; 1 process: 2 threads / 1 thread "
          f"{med(one2, 'per_s') / med(one1, 'per_s'):.2f}x; whole process (load, imports, torchrun start) "
          f"{wall_ratio:.2f}x; same batches counted: {same}")
    scale = med(two, "per_s") / med(one1, "per_s")
    target("replay: torchrun 2 procs vs 1 proc, batches/s (344M)", f"{scale:.2f}x",
           ">= 1.6x (0.8 x 2 ranks, 1 thread each)", scale >= 1.6 and same,
           note=f"vs 1 process x 2 threads {ratio:.2f}x; whole process {wall_ratio:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["paired", "bare", "replay"])
    ap.add_argument("--only", default="overhead,throughput,torchrun", help="which parts to run")
    ap.add_argument("--rounds", type=int, default=1, help="torchrun comparison rounds (default 1)")
    ap.add_argument("--device", default="cpu", help="throughput/torchrun parts: cpu (default) or cuda (each "
                                                    "torchrun rank then uses cuda:LOCAL_RANK)")
    a = ap.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(child(a.child)))
        return 0
    if a.regenerate or not (CKPT / "model.safetensors").is_file() or not BATCHES.is_dir():
        print("generating benchmarks/_data/replay ...", file=sys.stderr)
        generate()
    params = int((DATA / "params.txt").read_text())
    only = set(a.only.split(","))
    global DEVICE
    DEVICE = a.device
    if "overhead" in only:
        overhead(a.threads, params)
    if "throughput" in only:
        throughput(a.threads)
    if "torchrun" in only:
        torchrun_split(a.rounds)
    return 0


def overhead(threads: int, params: int) -> None:
    paired, bare, rep = (run_child(m, threads) for m in ("paired", "bare", "replay"))
    med = lambda xs: statistics.median(xs[1:]) if len(xs) > 1 else xs[0]  # noqa: E731
    print(f"model: {params / 1e6:.0f} M parameters, {sum(f.stat().st_size for f in CKPT.iterdir()) / 2**20:.0f} MB "
          f"on disk; {N_BATCHES} batches of {SAMPLES} samples ({PROMPT} prompt tokens, {FRAMES} frames x "
          f"{CODEBOOKS} codebooks); {threads} threads")
    pb, pr, pc = paired["bare_s"][1:], paired["replay_s"][1:], paired["check_s"][1:]
    ratios = sorted(r / b for r, b in zip(pr, pb))
    print(f"paired, {len(pb)} batch pairs: bare (read + forward) median {statistics.median(pb):.3f} s, replay (read + "
          f"validate + forward + checks + logged losses) median {statistics.median(pr):.3f} s")
    print(f"  per-pair overhead replay/bare - 1: median {100 * (statistics.median(ratios) - 1):+.2f}%, "
          f"range {100 * (ratios[0] - 1):+.1f}%..{100 * (ratios[-1] - 1):+.1f}%; total {100 * (sum(pr) / sum(pb) - 1):+.2f}%")
    print(f"  model checks alone: median {statistics.median(pc):.4f} s = "
          f"{100 * statistics.median(pc) / statistics.median(pb):.2f}% of a bare batch")
    f_bare, per = med(bare["forward_s"]), med(rep["per_batch_s"])
    print(f"separate processes: bare forward median {f_bare:.3f} s; replay per batch median {per:.3f} s "
          f"({100 * (per - f_bare) / f_bare:+.1f}%; sensitive to other load on the machine)")
    print(f"load: bare {bare['load_s']:.2f} s, replay {rep['load_s']:.2f} s")
    print(f"memory: RSS with the model loaded {bare['rss_after_load_mb']:.0f} MB; peak while forwarding: bare "
          f"{bare['batch_phase_peak_mb']:.0f} MB (all {N_BATCHES} batches held); replay: RSS after batch 1 "
          f"{rep['rss_after_first_batch_mb']:.0f} MB, peak over batches 2-{N_BATCHES} {rep['batch_phase_peak_mb']:.0f} MB")
    print(f"findings on the random model: {rep['findings']}")
    over = 100 * (statistics.median(ratios) - 1)
    target("replay: overhead vs bare forward (344M, paired)", f"{over:+.1f}%", "< 10%", over < 10,
           note=f"pairs {100 * (ratios[0] - 1):+.1f}%..{100 * (ratios[-1] - 1):+.1f}%")


if __name__ == "__main__":
    sys.exit(main())
