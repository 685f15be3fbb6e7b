"""Benchmark: `higgs-diag replay-batch` on a checkpoint of the release model's size, against
`HiggsAudioModel.from_pretrained(..., torch_dtype=bfloat16, low_cpu_mem_usage=True)` + one forward.
Run by hand (not in `make test` / `make bench`): `python benchmarks/bench_replay_release.py`; results in
docs/performance.md.

Needs about 12 GB of free disk (the checkpoint, deleted afterwards) and 16 GB of available memory
(MemAvailable) before each measurement: it waits (up to --wait minutes) while other jobs use more.

1. Builds, in a temporary folder, a checkpoint at the release geometry with random weights: Llama-3.2-3B-like
   backbone (hidden 3,072, 28 layers, 24 heads / 8 KV heads, vocabulary 128,256, intermediate 8,192), the dual
   audio FFN on all 28 layers, 8 codebooks x 1,026 classes: 5,771,283,456 parameters, 11.54 GB in bfloat16,
   written shard by shard (6 shards of at most 2 GB + model.safetensors.index.json), so building never holds
   more than one shard in memory. The model is built on the meta device for the names and shapes only.
2. Builds one batch of two ~10 s utterances (120 prompt tokens each, 245 frames with the delay pattern:
   audio_out_ids [8, 508]), saved with higgs_diag.batch.save_batch.
3. Measures, each in a fresh child process (boson_multimodal imported before the clock starts in both):
   tool      higgs_diag.replay.api.measure(CKPT, [BATCH]) with the default options (device auto = cpu, dtype
             auto = the checkpoint's bfloat16): load time, the batch phase (read + validate + forward + model
             checks), the whole call
   baseline  HiggsAudioModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True), then
             load_batch + model(**batch) under torch.inference_mode
   paired    both models in one process (they share the page cache's pages), then rounds of: a bare forward
             of each and the tool's whole per-batch work (measure_one), order rotating: the ratios survive
             other jobs on a shared machine better than separate processes do
   refuse    `higgs-diag replay-batch CKPT BATCH --dtype float32` (23.1 GB of weights): must stop in one line
             before loading; the process wall time and the in-process time of measure() until the error
   Peak RSS is VmHWM of /proc/self/status; a sampler thread (every 20 ms) records the largest RssAnon
   (private memory) and RssFile (file-backed pages: the memory-mapped weights) seen.
   The checkpoint's pages are read once before the "warm" rounds (tool and baseline alternate, --rounds
   times each); one "cold" round of each follows, the checkpoint's pages dropped from the page cache first
   (posix_fadvise DONTNEED on its own files only).

Targets: peak memory <= 1.05 x the baseline's; total time (load + forward) <= 1.2 x the baseline's.

Usage: python benchmarks/bench_replay_release.py [--dir DIR] [--rounds 2] [--no-cold] [--no-paired] [--keep]
       [--wait 30]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 128256, 3072, 8192, 28, 24, 8
CODEBOOKS, CODEBOOK_SIZE = 8, 1024
AUDIO_IN, AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS, EOT, PAD = 128015, 128016, 128013, 128012, 128009, 128001
SAMPLES, PROMPT, FRAMES = 2, 120, 245  # 245 frames + BOS + EOS + 7 delay columns = 254 per utterance
SHARD_BYTES = 2 * 10**9
PAIRED_ROUNDS = 3
NEED_DISK, NEED_MEM = 13 * 10**9, 16 * 10**9
EXPECTED_PARAMS = 5_771_283_456


def release_config():
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    cfg = HiggsAudioConfig(
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HIDDEN // HEADS, max_position_embeddings=131072, pad_token_id=PAD,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
        audio_adapter_type="dual_ffn_fast_forward", audio_dual_ffn_layers=list(range(LAYERS)),
        audio_num_codebooks=CODEBOOKS, audio_codebook_size=CODEBOOK_SIZE, audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1, use_delay_pattern=True, skip_audio_tower=True,
        encode_whisper_embed=False, encode_audio_in_tokens=True, audio_in_token_idx=AUDIO_IN,
        audio_out_token_idx=AUDIO_OUT, pad_token_id=PAD, audio_out_bos_token_id=AUDIO_OUT_BOS,
        audio_eos_token_id=AUDIO_EOS)
    cfg.torch_dtype = torch.bfloat16
    cfg.architectures = ["HiggsAudioModel"]
    return cfg


def build_checkpoint(ckpt: Path) -> int:
    """Random bfloat16 weights at the release geometry, written shard by shard; returns the parameter count."""
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from safetensors.torch import save_file
    from transformers.modeling_utils import no_init_weights

    cfg = release_config()
    with torch.device("meta"), no_init_weights():
        shapes = [(k, tuple(v.shape)) for k, v in HiggsAudioModel(cfg).state_dict().items()]
    ckpt.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(ckpt)
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        n = 2 * int(torch.Size(shape).numel())
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map, total, n_params = {}, 0, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
            n_params += t.numel()
        save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
        del tensors
        print(f"  {fname}: {len(shard)} tensors", file=sys.stderr, flush=True)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return n_params


def build_batch(path: Path) -> list[int]:
    import torch
    from boson_multimodal.model.higgs_audio.utils import build_delay_pattern_mask

    from higgs_diag.batch import save_batch

    g = torch.Generator().manual_seed(1)
    bos, eos = CODEBOOK_SIZE, CODEBOOK_SIZE + 1
    ids, labels, outs, labs = [], [], [], []
    for _ in range(SAMPLES):
        prompt = torch.randint(0, 120000, (PROMPT,), generator=g).tolist()
        ids.append(torch.tensor(prompt + [AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS, EOT]))
        labels.append(torch.tensor([-100] * PROMPT + [AUDIO_OUT_BOS, -100, AUDIO_EOS, EOT]))
        codes = torch.randint(0, CODEBOOK_SIZE, (CODEBOOKS, FRAMES), generator=g)
        a = torch.cat([torch.full((CODEBOOKS, 1), bos), codes, torch.full((CODEBOOKS, 1), eos)], 1)
        lab = torch.cat([torch.full((CODEBOOKS, 1), -100), codes, torch.full((CODEBOOKS, 1), eos)], 1)
        outs.append(build_delay_pattern_mask(a[None], bos_token_id=bos, pad_token_id=eos)[0][0])
        labs.append(build_delay_pattern_mask(lab[None], bos_token_id=-100, pad_token_id=-100)[0][0])
    lengths = torch.tensor([o.shape[1] for o in outs])
    batch = {
        "input_ids": torch.stack(ids), "attention_mask": torch.ones(SAMPLES, PROMPT + 4, dtype=torch.long),
        "label_ids": torch.stack(labels),
        "audio_in_ids": torch.zeros((0, 0), dtype=torch.long),
        "audio_in_ids_start": torch.zeros(0, dtype=torch.long),
        "audio_out_ids": torch.cat(outs, 1).long(),
        "audio_out_ids_start": torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]), 0),
        "audio_out_ids_start_group_loc": torch.arange(SAMPLES),
        "label_audio_ids": torch.cat(labs, 1).long(),
    }
    save_batch(path, batch, {"step": 1000})
    return list(batch["audio_out_ids"].shape)


# ---- measurements (child processes) -----------------------------------------------------------------------
def _status() -> dict[str, int]:
    """The memory fields of /proc/self/status, kB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


class Sampler(threading.Thread):
    """The largest RssAnon and RssFile seen (every 20 ms), and the split at the largest VmRSS."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max_anon = self.max_file = self.max_rss = 0
        self.at_peak: dict[str, int] = {}

    def sample(self):
        s = _status()
        self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
        self.max_file = max(self.max_file, s.get("RssFile", 0))
        if s.get("VmRSS", 0) > self.max_rss:
            self.max_rss, self.at_peak = s["VmRSS"], s

    def run(self):
        while not self.stop.wait(0.02):
            self.sample()

    def result(self) -> dict:
        self.stop.set()
        self.join()
        self.sample()
        s = _status()
        gb = 1024 / 1e9  # kB -> GB
        return {"vmhwm_gb": s["VmHWM"] * gb, "max_anon_gb": self.max_anon * gb, "max_file_gb": self.max_file * gb,
                "peak_anon_gb": self.at_peak.get("RssAnon", 0) * gb, "peak_file_gb": self.at_peak.get("RssFile", 0) * gb}


def child(mode: str, ckpt: Path, batch: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import boson_multimodal.model.higgs_audio  # noqa: F401  (imported before the clock in every mode)

    out: dict = {"mode": mode}
    sampler = Sampler()
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "tool":
        from higgs_diag.config import ReplayOptions
        from higgs_diag.replay.api import measure

        ev = measure(ckpt, [batch], options=ReplayOptions())
        out.update(total_s=time.perf_counter() - t0, load_s=ev.seconds.get("load"),
                   forward_s=ev.batches[0].model.forward_seconds, batch_s=ev.seconds.get("batches"),
                   dtype=ev.dtype, device=ev.device, audio_ce=ev.batches[0].model.audio_ce)
    elif mode == "baseline":
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        from higgs_diag.batch import load_batch

        model = HiggsAudioModel.from_pretrained(str(ckpt), torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
        model.eval()
        t1 = time.perf_counter()
        b = load_batch(batch)[0]
        t2 = time.perf_counter()
        with torch.inference_mode():
            o = model(**b)
        t3 = time.perf_counter()
        out.update(total_s=t3 - t0, load_s=t1 - t0, forward_s=t3 - t2, batch_s=t3 - t1,
                   dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                   audio_logits=list(o.audio_logits.shape))
    elif mode == "refuse":
        from higgs_diag.config import ReplayOptions
        from higgs_diag.replay.api import measure
        from higgs_diag.replay.errors import ReplayError

        try:
            measure(ckpt, [batch], options=ReplayOptions(dtype="float32"))
            out["error"] = None
        except ReplayError as e:
            out["error"] = str(e)
        out["total_s"] = time.perf_counter() - t0
    elif mode == "paired":  # both models in one process (the same page-cache pages), forwards alternating
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        from higgs_diag.batch import BatchSpec, load_batch
        from higgs_diag.config import ReplayOptions, Thresholds
        from higgs_diag.replay.api import load_checkpoint, measure_one
        from higgs_diag.replay.measure import forward_params

        t = time.perf_counter()
        tool, source = load_checkpoint(ckpt, options=ReplayOptions())
        out["tool_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        base = HiggsAudioModel.from_pretrained(str(ckpt), torch_dtype=torch.bfloat16, low_cpu_mem_usage=True).eval()
        out["baseline_load_s"] = time.perf_counter() - t
        b = load_batch(batch)[0]
        spec, params, dev = BatchSpec.from_config(source.config), forward_params(tool), torch.device("cpu")
        runs: dict[str, list[float]] = {"baseline": [], "tool": [], "replay": []}
        for r in range(PAIRED_ROUNDS + 1):  # round 0 warms up (pages, allocator) and is dropped
            order = ["baseline", "tool", "replay"]
            for which in order[r % 3:] + order[: r % 3]:
                t = time.perf_counter()
                if which == "replay":  # the tool's whole per-batch work: read, validate, forward, checks
                    measure_one(batch, spec, Thresholds(), tool, dev, torch.bfloat16, params)
                else:
                    with torch.inference_mode():
                        (base if which == "baseline" else tool)(**b)
                if r:
                    runs[which].append(time.perf_counter() - t)
        out.update({f"{k}_forward_s": v for k, v in runs.items()})
    out["cpu_s"] = time.process_time() - c0  # CPU seconds of all threads: less sensitive to other jobs
    out.update(sampler.result())
    return out


def mem_available() -> int:
    from higgs_diag.replay.memory import meminfo_available

    return meminfo_available() or 0


def wait_for_memory(minutes: float) -> int:
    deadline = time.time() + 60 * minutes
    while True:
        have = mem_available()
        if have >= NEED_MEM:
            return have
        if time.time() > deadline:
            raise SystemExit(f"only {have / 1e9:.1f} GB available (MemAvailable) after waiting {minutes} min; the "
                             f"benchmark needs {NEED_MEM / 1e9:.0f} GB: retry when other jobs are done")
        print(f"  waiting: {have / 1e9:.1f} GB available, {NEED_MEM / 1e9:.0f} GB needed", file=sys.stderr, flush=True)
        time.sleep(30)


def run_child(mode: str, ckpt: Path, batch: Path, wait: float, threads: int) -> dict:
    have = wait_for_memory(wait)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(ckpt), str(batch)], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(wall_s=wall, mem_available_gb=have / 1e9)
    print(f"  {mode}: {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()})}",
          file=sys.stderr, flush=True)
    return out


def run_cli_refusal(ckpt: Path, batch: Path) -> dict:
    exe = Path(sys.executable).with_name("higgs-diag")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "higgs_diag.cli"]
    t = time.perf_counter()
    r = subprocess.run(cmd + ["replay-batch", str(ckpt), str(batch), "--dtype", "float32"], capture_output=True,
                       text=True)
    return {"wall_s": time.perf_counter() - t, "exit": r.returncode, "stderr": r.stderr.strip().splitlines()}


def drop_cache(ckpt: Path) -> None:
    for f in ckpt.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(ckpt: Path) -> None:
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to build the checkpoint (default: a temp dir "
                                                               "under /tmp)")
    ap.add_argument("--rounds", type=int, default=2, help="warm rounds of tool and baseline (alternating)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache round")
    ap.add_argument("--no-paired", dest="paired", action="store_false",
                    help="skip the paired run (both models in one process, forwards alternating)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse it when present)")
    ap.add_argument("--wait", type=float, default=30, help="minutes to wait for 16 GB of available memory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CKPT", "BATCH"))
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return 0

    parent = a.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = parent / "higgs-diag-release-bench" if a.keep else Path(tempfile.mkdtemp(prefix="higgs-diag-release-",
                                                                                    dir=parent))
    ckpt, batch = work / "checkpoint-1000", work / "batches" / "step-001000.pt"
    try:
        if not (ckpt / "model.safetensors.index.json").is_file():
            free = shutil.disk_usage(parent).free
            if free < NEED_DISK:
                raise SystemExit(f"{parent}: {free / 1e9:.1f} GB free on disk, {NEED_DISK / 1e9:.0f} GB needed")
            wait_for_memory(a.wait)
            print(f"building the release-size checkpoint in {ckpt} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            n = build_checkpoint(ckpt)
            print(f"  built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        import torch  # noqa: F401

        from higgs_diag.replay.checkpoint import inspect_checkpoint
        from higgs_diag.replay.model import loaded_weights

        n = loaded_weights(inspect_checkpoint(ckpt)).n_float
        assert n == EXPECTED_PARAMS, n
        shape = build_batch(batch)
        disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        shards = len(list(ckpt.glob("*.safetensors")))

        results: dict[str, list[dict]] = {"tool": [], "baseline": [], "tool cold": [], "baseline cold": []}
        print("warming the page cache ...", file=sys.stderr, flush=True)
        warm_cache(ckpt)
        for r in range(a.rounds):
            for mode in (("baseline", "tool") if r % 2 == 0 else ("tool", "baseline")):
                results[mode].append(run_child(mode, ckpt, batch, a.wait, a.threads))
        if not a.no_cold:
            for mode in ("baseline", "tool"):
                drop_cache(ckpt)
                results[f"{mode} cold"].append(run_child(mode, ckpt, batch, a.wait, a.threads))
        paired = run_child("paired", ckpt, batch, a.wait, a.threads) if a.paired else None
        refuse = run_child("refuse", ckpt, batch, a.wait, a.threads)
        cli = run_cli_refusal(ckpt, batch)

        print()
        print(f"checkpoint: {n:,} parameters, {disk / 1e9:.2f} GB in {shards} bfloat16 shards; batch: {SAMPLES} "
              f"utterances, audio_out_ids {shape}; {a.threads} threads; MemAvailable at the start of each run "
              f"{min(x['mem_available_gb'] for v in results.values() for x in v):.1f}-"
              f"{max(x['mem_available_gb'] for v in results.values() for x in v):.1f} GB")
        print()
        print("| | load s | forward s | total s (load + batch) | process wall s | peak RSS (VmHWM) GB | "
              "at the peak: file-backed / anonymous GB | dtype |")
        print("|---|---|---|---|---|---|---|---|")
        med = {}
        for mode, runs in results.items():
            if not runs:
                continue
            m = {k: statistics.median(x[k] for x in runs) for k in ("load_s", "forward_s", "total_s", "wall_s",
                                                                     "vmhwm_gb", "peak_file_gb", "peak_anon_gb",
                                                                     "max_anon_gb")}
            med[mode] = m
            spread = (f" ({min(x['total_s'] for x in runs):.1f}-{max(x['total_s'] for x in runs):.1f})"
                      if len(runs) > 1 else "")
            print(f"| {mode} ({len(runs)} run{'s' if len(runs) > 1 else ''}) | {m['load_s']:.1f} | "
                  f"{m['forward_s']:.1f} | {m['total_s']:.1f}{spread} | {m['wall_s']:.1f} | "
                  f"{m['vmhwm_gb']:.2f} | {m['peak_file_gb']:.2f} / {m['peak_anon_gb']:.2f} (anonymous at most "
                  f"{m['max_anon_gb']:.2f}) | {runs[0]['dtype']} |")
        print()
        for suffix in ("", " cold"):
            t, b = med.get("tool" + suffix), med.get("baseline" + suffix)
            if not (t and b):
                continue
            mem, tim = t["vmhwm_gb"] / b["vmhwm_gb"], t["total_s"] / b["total_s"]
            print(f"targets{suffix or ' (warm)'}: peak memory {mem:.3f} x the baseline (<= 1.05: "
                  f"{'met' if mem <= 1.05 else 'NOT met'}); total time {tim:.3f} x (<= 1.2: "
                  f"{'met' if tim <= 1.2 else 'NOT met'}); process wall {t['wall_s'] / b['wall_s']:.3f} x")
        if paired:
            pb, pt, pr = (paired[f"{k}_forward_s"] for k in ("baseline", "tool", "replay"))
            ratio = statistics.median(t / b for t, b in zip(pt, pb))
            print(f"paired (one process, {len(pb)} rounds after a warm-up, order rotating): load tool "
                  f"{paired['tool_load_s']:.2f} s, from_pretrained {paired['baseline_load_s']:.2f} s; bare forward "
                  f"of the tool's model median {statistics.median(pt):.2f} s vs from_pretrained's "
                  f"{statistics.median(pb):.2f} s (per-round ratio median {ratio:.3f}); the tool's whole batch "
                  f"(read + validate + forward + checks) median {statistics.median(pr):.2f} s "
                  f"({statistics.median(r / b for r, b in zip(pr, pb)):.3f} x the bare forward)")
        print()
        print(f"refusal (--dtype float32): measure() stopped after {refuse['total_s']:.3f} s, peak RSS "
              f"{refuse['vmhwm_gb']:.2f} GB: {refuse['error']}")
        print(f"CLI: exit {cli['exit']} after {cli['wall_s']:.2f} s (process wall, imports included); stderr: "
              f"{len(cli['stderr'])} line(s): {cli['stderr'][:1]}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
