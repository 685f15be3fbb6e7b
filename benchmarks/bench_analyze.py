"""Benchmark: reading the logs of a real-size Higgs Audio fine-tuning run (run by hand: `make bench`).

Generates (once, into benchmarks/_data/, gitignored) the reference run of an 8-GPU job:

    reference_run/
      checkpoint-143361/trainer_state.json   143,361 steps, logging_steps=1, eval every 500 steps (~36 MB)
      runs/Jan15_09-12-44_node-0/events.out.tfevents.<time>.node-0.4242.0
                                             the same points as HF's TensorBoardCallback writes them,
                                             plus the args/model_config text summaries (~47 MB, ~862k events)

The training entries hold loss, audio_loss, text_loss (what a Higgs trainer passes to ``self.log``),
grad_norm, learning_rate, epoch: six scalars per step, as in the job this reproduces (862k events).

Then times, each in a fresh subprocess (wall seconds and peak RSS of that child, via os.wait4):
  (a) higgs_diag.run.events.read_event_file alone
  (b) higgs-diag analyze <run> --format json           (skipped until the command exists)
  (c) tbparse SummaryReader(file).scalars
  (d) tensorboard EventAccumulator(path, size_guidance={'scalars': 0}).Reload()

Usage: python benchmarks/bench_analyze.py [--regenerate] [--only a,b,c,d]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "_data"
RUN = DATA / "reference_run"
MAX_STEPS = 143_361
EVAL_STEPS = 500
SAVE_STEPS = 1000
WARMUP = 500
PEAK_LR = 5e-5
SEED = 20240917
T0 = 1_736_932_364.0  # 2025-01-15 09:12:44 UTC
RUN_NAME = "Jan15_09-12-44_node-0"
EVENT_NAME = f"events.out.tfevents.{int(T0)}.node-0.4242.0"
TRAIN_TAGS = ("loss", "audio_loss", "text_loss", "grad_norm", "learning_rate", "epoch")
EVAL_KEYS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from _proc import measure  # noqa: E402  (the fresh-process wall / cpu / peak RSS measurement)
from _proc import installed_env  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The reference run, at any length
# ------------------------------------------------------------------------------------------------
def _curves(max_steps: int = MAX_STEPS):
    import numpy as np

    rng = np.random.default_rng(SEED)
    s = np.arange(1, max_steps + 1, dtype=np.float64)
    audio = 1.85 + 5.15 * np.exp(-s / 2500.0) + 0.45 * np.exp(-s / 40000.0)
    audio = audio * (1 + 0.035 * rng.standard_normal(s.size))
    text = 0.04 + 0.22 * np.exp(-s / 1500.0) + np.abs(0.01 * rng.standard_normal(s.size))
    loss = audio + text  # 7.27 at step 1
    grad = 0.38 + 0.04 * rng.standard_normal(s.size) + 0.06 * np.exp(-s / 5000.0)
    grad = np.clip(grad, 0.22, None)
    spikes = rng.choice(np.arange(2000, max_steps), size=7, replace=False)
    grad[spikes] *= rng.uniform(6, 25, size=spikes.size)
    loss[spikes + 1] += rng.uniform(0.2, 0.8, size=spikes.size)
    lr = np.where(s <= WARMUP, PEAK_LR * s / WARMUP,
                  PEAK_LR * 0.5 * (1 + np.cos(math.pi * (s - WARMUP) / (max_steps - WARMUP))))
    epoch = s / (max_steps / 3.0)
    # HF rounds the logged loss to 4 digits; grad_norm is a float32 .item(); lr and epoch are float64
    loss = np.round(loss, 4)  # audio_loss/text_loss: logged with .item(), full precision
    audio = audio.astype(np.float32).astype(np.float64)
    text = text.astype(np.float32).astype(np.float64)
    grad = grad.astype(np.float32).astype(np.float64)
    return s.astype(np.int64), loss, audio, text, grad, lr, epoch


def _eval_points(loss, max_steps: int = MAX_STEPS):
    import numpy as np

    rng = np.random.default_rng(SEED + 1)
    out = []
    for step in range(EVAL_STEPS, max_steps + 1, EVAL_STEPS):
        ev_loss = float(np.mean(loss[max(0, step - 200):step])) + 0.08 + 0.01 * rng.standard_normal()
        runtime = round(118.0 + 4 * rng.standard_normal(), 4)
        out.append((step, {
            "eval_loss": round(ev_loss, 4),
            "eval_runtime": runtime,
            "eval_samples_per_second": round(1968 / runtime, 3),
            "eval_steps_per_second": round(123 / runtime, 3),
            "epoch": step / (max_steps / 3.0),
        }))
    return out


def _args_json() -> str:
    args = {
        "output_dir": "/scratch/higgs-ft/arabic-zero-shot", "overwrite_output_dir": False, "do_train": True,
        "do_eval": True, "do_predict": False, "eval_strategy": "steps", "prediction_loss_only": False,
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 1,
        "eval_accumulation_steps": None, "eval_delay": 0, "learning_rate": PEAK_LR, "weight_decay": 0.01,
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08, "max_grad_norm": 1.0,
        "num_train_epochs": 3, "max_steps": -1, "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {},
        "warmup_ratio": 0.0, "warmup_steps": WARMUP, "log_level": "passive", "logging_dir":
        f"/scratch/higgs-ft/arabic-zero-shot/runs/{RUN_NAME}", "logging_strategy": "steps",
        "logging_first_step": False, "logging_steps": 1, "logging_nan_inf_filter": True,
        "save_strategy": "steps", "save_steps": SAVE_STEPS, "save_total_limit": 3, "save_safetensors": True,
        "seed": 42, "bf16": True, "fp16": False, "local_rank": 0, "dataloader_num_workers": 4,
        "eval_steps": EVAL_STEPS, "run_name": "/scratch/higgs-ft/arabic-zero-shot", "remove_unused_columns": False,
        "label_names": ["label_ids", "label_audio_ids"], "load_best_model_at_end": False,
        "metric_for_best_model": None, "greater_is_better": None, "ddp_find_unused_parameters": False,
        "report_to": ["tensorboard"], "gradient_checkpointing": True, "include_num_input_tokens_seen": False,
    }
    return json.dumps(args, indent=2) + "\n"


def _model_config_json() -> str:
    cfg = {
        "architectures": ["HiggsAudioModel"], "model_type": "higgs_audio", "audio_adapter_type": "dual_ffn_fast_forward",
        "audio_codebook_size": 1024, "audio_num_codebooks": 8, "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025, "audio_in_token_idx": 128015, "audio_out_token_idx": 128016,
        "audio_out_bos_token_id": 128013, "audio_eos_token_id": 128012, "pad_token_id": 128001,
        "use_delay_pattern": True, "skip_audio_tower": False, "encode_whisper_embed": True,
        "audio_dual_ffn_layers": list(range(0, 28)),
        "text_config": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
                        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0},
        "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    }
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _scalar_payload(wall: float, step: int, tag: bytes, value: float) -> bytes:
    """Event{wall_time, step, summary{value{tag, simple_value}}}, byte-identical to SerializeToString()."""
    inner = b"\x0a" + _varint(len(tag)) + tag + b"\x15" + struct.pack("<f", value)
    val = b"\x0a" + _varint(len(inner)) + inner
    summ = b"\x2a" + _varint(len(val)) + val
    return b"\x09" + struct.pack("<d", wall) + ((b"\x10" + _varint(step)) if step else b"") + summ


def _state_head_tail(max_steps: int, last_epoch: float) -> tuple[str, str]:
    """trainer_state.json as HF writes it (json.dumps(indent=2, sort_keys=True)), cut where log_history's
    entries go."""
    state = {
        "best_metric": None, "best_model_checkpoint": None, "epoch": last_epoch, "eval_steps": EVAL_STEPS,
        "global_step": max_steps, "is_hyper_param_search": False, "is_local_process_zero": True,
        "is_world_process_zero": True, "log_history": [], "logging_steps": 1, "max_steps": max_steps,
        "num_input_tokens_seen": 0, "num_train_epochs": 3, "save_steps": SAVE_STEPS,
        "stateful_callbacks": {"TrainerControl": {"args": {
            "should_epoch_stop": False, "should_evaluate": False, "should_log": False,
            "should_save": True, "should_training_stop": True}, "attributes": {}}},
        "total_flos": 4.913482911795e+19, "train_batch_size": 2, "trial_name": None, "trial_params": None,
    }
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    head, tail = text.split('"log_history": [],\n')
    return head + '"log_history": [\n', "\n  ],\n" + tail


# one log_history entry, formatted as json.dumps(indent=2, sort_keys=True) nests it (floats are finite: repr
# is json's float text)
_TRAIN_ENTRY = ('    {\n      "audio_loss": %r,\n      "epoch": %r,\n      "grad_norm": %r,\n      "learning_rate": %r,'
                '\n      "loss": %r,\n      "step": %d,\n      "text_loss": %r\n    }')
_EVAL_ENTRY = ('    {\n      "epoch": %r,\n      "eval_loss": %r,\n      "eval_runtime": %r,\n'
               '      "eval_samples_per_second": %r,\n      "eval_steps_per_second": %r,\n      "step": %d\n    }')


def _write_state(path: Path, cols, evals: dict, block: int) -> int:
    """Stream trainer_state.json (byte-identical to json.dumps of the whole state); the points written."""
    steps, loss, audio, text, grad, lr, epoch = cols
    head, tail = _state_head_tail(len(steps), float(epoch[-1]))
    points = 0
    with open(path, "w") as f:
        f.write(head)
        for b0 in range(0, len(steps), block):
            sl = slice(b0, b0 + block)
            out = []
            for st, lo, au, te, gn, l_r, ep in zip(*(c[sl].tolist() for c in cols)):
                out.append(_TRAIN_ENTRY % (au, ep, gn, l_r, lo, st, te))
                ev = evals.get(st)
                if ev is not None:
                    out.append(_EVAL_ENTRY % (ev["epoch"], ev["eval_loss"], ev["eval_runtime"],
                                              ev["eval_samples_per_second"], ev["eval_steps_per_second"], st))
            n_steps = len(steps[sl])
            points += 6 * n_steps + 5 * (len(out) - n_steps)  # 6 scalars per training entry, 5 per evaluation
            f.write((",\n" if b0 else "") + ",\n".join(out))
        f.write(tail)
    return points


def _header_payloads() -> list[bytes]:
    """file_version and the args/model_config text summaries, as torch's SummaryWriter writes them."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

    payloads = []
    fv = event_pb2.Event(wall_time=T0 + 0.41, file_version="brain.Event:2")
    fv.source_metadata.writer = "tensorboard.summary.writer.event_file_writer"
    payloads.append(fv.SerializeToString())
    for i, (what, text_) in enumerate((("args", _args_json()), ("model_config", _model_config_json()))):
        v = summary_pb2.Summary.Value(
            tag=f"{what}/text_summary",
            metadata=summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")),
            tensor=tensor_pb2.TensorProto(dtype=7, string_val=[text_.encode()], tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])))
        payloads.append(event_pb2.Event(wall_time=T0 + 2.0 + i * 1e-3, summary=summary_pb2.Summary(value=[v]))
                        .SerializeToString())
    return payloads


_EVENT_TAGS = [f"train/{k}".encode() for k in TRAIN_TAGS] + [("eval/" + k[5:]).encode() for k in EVAL_KEYS] + [b"train/epoch"]


def _scalar_records(wall, step, tag, value) -> bytes:
    """The framed TFRecord records of scalar events (arrays in file order), vectorised: records of one tag
    and one step-varint width have one layout, built as rows of one 2-D byte array (what
    _scalar_payload + frame_records give, checked on samples)."""
    import numpy as np

    from higgs_diag.run.events import crc32c_segments, masked_crc32c
    from higgs_diag.run.crc32c import mask

    assert (step >= 1).all() and (step < 1 << 35).all()
    vw = 1 + sum((step >= (1 << (7 * k))).astype(np.int64) for k in range(1, 5))
    tlen = np.array([len(t) for t in _EVENT_TAGS])
    plen = 9 + 1 + vw + tlen[tag] + 11
    offs = np.cumsum(16 + plen) - (16 + plen)
    out = np.zeros(int((16 + plen).sum()), dtype=np.uint8)
    key = tag * 8 + vw
    for kv in np.unique(key).tolist():
        sel = np.flatnonzero(key == kv)
        t, w = divmod(kv, 8)
        tb = _EVENT_TAGS[t]
        tl = len(tb)
        pl = 9 + 1 + w + tl + 11
        m = sel.size
        rec = np.zeros((m, 16 + pl), dtype=np.uint8)
        rec[:, 0:8] = np.frombuffer(struct.pack("<Q", pl), dtype=np.uint8)
        rec[:, 8:12] = np.frombuffer(struct.pack("<I", masked_crc32c(struct.pack("<Q", pl))), dtype=np.uint8)
        rec[:, 12] = 0x09
        rec[:, 13:21] = np.ascontiguousarray(wall[sel], dtype="<f8").view(np.uint8).reshape(m, 8)
        rec[:, 21] = 0x10
        st = step[sel]
        for k in range(w):
            rec[:, 22 + k] = ((st >> (7 * k)) & 0x7F) | (0x80 if k < w - 1 else 0)
        p = 22 + w
        rec[:, p:p + 6] = np.frombuffer(bytes([0x2A, tl + 9, 0x0A, tl + 7, 0x0A, tl]), dtype=np.uint8)
        rec[:, p + 6:p + 6 + tl] = np.frombuffer(tb, dtype=np.uint8)
        rec[:, p + 6 + tl] = 0x15
        rec[:, p + 7 + tl:p + 11 + tl] = np.ascontiguousarray(value[sel], dtype="<f4").view(np.uint8).reshape(m, 4)
        assert p + 11 + tl == 12 + pl
        crc = mask(crc32c_segments(rec[:, 12:12 + pl].tobytes(), np.arange(m) * pl, np.full(m, pl)))
        rec[:, 12 + pl:] = crc.astype("<u4").view(np.uint8).reshape(m, 4)
        dst = np.ndarray(shape=(out.size - (16 + pl) + 1,), dtype=f"V{16 + pl}", buffer=out, strides=(1,))
        dst[offs[sel]] = rec.view(f"V{16 + pl}").reshape(-1)
    return out.tobytes()


def _write_events(path: Path, cols, evals: dict, block: int) -> tuple[int, int]:
    """Stream the event file (what torch's SummaryWriter writes for HF's TensorBoardCallback: wall_time,
    step and one simple_value per event); (points, records) written."""
    import numpy as np

    from tensorboard.compat.proto import event_pb2

    from higgs_diag.run.events import frame_records

    steps = cols[0]
    vals = dict(zip(TRAIN_TAGS, cols[1:]))
    ev_steps = np.array(sorted(evals), dtype=np.int64)
    ev_vals = np.array([[evals[s][k] for k in EVAL_KEYS + ("epoch",)] for s in ev_steps.tolist()]).reshape(-1, 5)
    ev_run = np.array([evals[s]["eval_runtime"] for s in ev_steps.tolist()])
    wall0 = T0 + 95.0
    points = records = 0
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        head = _header_payloads()
        f.write(frame_records(head))
        records += len(head)
        for b0 in range(0, len(steps), block):
            st = steps[b0:b0 + block]
            n = st.size
            e_at = np.searchsorted(ev_steps, st)
            is_ev = (e_at < ev_steps.size) & (ev_steps[np.minimum(e_at, ev_steps.size - 1)] == st)
            cnt = 7 + 6 * is_ev  # increments per step: the step's own, 6 train events, [the eval's own, 5 events]
            first = np.cumsum(cnt) - cnt
            inc = np.full(int(cnt.sum()), 2.1e-5)
            i = np.arange(b0, b0 + n, dtype=np.int64)
            inc[first] = 0.87 + 0.01 * ((i * 7919) % 13)
            emit = np.ones(inc.size, dtype=bool)
            emit[first] = False
            fe = first[is_ev]
            inc[fe + 7] = ev_run[e_at[is_ev]]
            emit[fe + 7] = False
            for k in range(8, 13):
                inc[fe + k] = 1.7e-5
            wall = np.cumsum(np.r_[wall0, inc])[1:]  # sequential sums, as the old per-event loop added them
            wall0 = float(wall[-1])
            wall = wall[emit]
            rstep = np.repeat(st, cnt - 1 - is_ev)
            tag = np.zeros(wall.size, dtype=np.int64)
            val = np.zeros(wall.size, dtype=np.float64)
            pos = np.cumsum(cnt - 1 - is_ev) - (cnt - 1 - is_ev)  # first emitted record of each step
            for k, name in enumerate(TRAIN_TAGS):
                tag[pos + k] = k
                val[pos + k] = vals[name][b0:b0 + n]
            pe = pos[is_ev] + 6
            for k in range(5):
                tag[pe + k] = 6 + k
                val[pe + k] = ev_vals[e_at[is_ev], k]
            data = _scalar_records(wall, rstep, tag, val)
            # self-check on samples: the hand encoder against protobuf and the per-record encoder
            for r in rng.choice(wall.size, size=min(40, wall.size), replace=False).tolist() + [wall.size - 1]:
                pl = _scalar_payload(float(wall[r]), int(rstep[r]), _EVENT_TAGS[tag[r]], float(val[r]))
                assert event_pb2.Event.FromString(pl).SerializeToString() == pl
                if r == wall.size - 1:
                    assert data.endswith(frame_records([pl]))
            f.write(data)
            points += wall.size
            records += wall.size
    return points, records


def generate_run(root: Path, max_steps: int, *, state: bool = True, events: bool = True, force: bool = False,
                 block: int = 50_000) -> dict:
    """Write the reference run at ``max_steps`` steps into ``root`` (reused when present): its trainer_state.json
    and/or its event file, streamed block by block. Returns the meta (paths, points written, sizes)."""
    meta_path = root.parent / (root.name + ".meta.json")
    state_path = root / f"checkpoint-{max_steps}" / "trainer_state.json"
    ev_path = root / "runs" / RUN_NAME / EVENT_NAME

    def located(meta: dict) -> dict:  # the paths under root as it is now (the folder may have moved)
        return {**meta, "state_path": str(state_path) if meta["state"] else None,
                "event_path": str(ev_path) if meta["events"] else None}

    if not force and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("steps") == max_steps and (meta.get("state"), meta.get("events")) == (state, events)
                and (not state or state_path.exists()) and (not events or ev_path.exists())):
            return located(meta)
    t = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    meta_path.unlink(missing_ok=True)
    cols = _curves(max_steps)
    evals = dict(_eval_points(cols[1], max_steps))
    meta = {"steps": max_steps, "state": state, "events": events, "state_points": 0, "points": 0,
            "records": 0, "event_bytes": 0, "state_bytes": 0}
    if state:
        state_path.parent.mkdir(parents=True)
        meta["state_points"] = _write_state(state_path, cols, evals, block)
        meta["state_bytes"] = state_path.stat().st_size
    t_state = time.perf_counter() - t
    if events:
        ev_path.parent.mkdir(parents=True)
        meta["points"], meta["records"] = _write_events(ev_path, cols, evals, block)
        meta["event_bytes"] = ev_path.stat().st_size
    meta_path.write_text(json.dumps(meta))
    meta = located(meta)
    print(f"generated {root} in {time.perf_counter() - t:.1f} s (trainer_state {t_state:.1f} s): "
          f"{meta['state_bytes'] / 1e6:.1f} MB trainer_state.json, {meta['event_bytes'] / 1e6:.1f} MB event file, "
          f"{meta['records']:,} records, {meta['points']:,} scalar points in the event file, "
          f"{meta['state_points']:,} in the state file", file=sys.stderr)
    return meta


def generate(force: bool = False) -> tuple[Path, Path, int]:
    """Write the reference run (reused when present). Returns (trainer_state, event file, points written)."""
    meta = generate_run(RUN, MAX_STEPS, force=force)
    return Path(meta["state_path"]), Path(meta["event_path"]), int(meta["points"])


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
CHILD_A = """
import sys, time, json
t = time.perf_counter()
from higgs_diag.run.events import read_event_file
t1 = time.perf_counter()
r = read_event_file(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"points": len(r.scalars), "inner": t2 - t1, "import": t1 - t, "problems": [str(p) for p in r.problems],
                  "texts": sorted(r.texts)}))
"""

CHILD_C = """
import sys, time, json
t = time.perf_counter()
from tbparse import SummaryReader
df = SummaryReader(sys.argv[1]).scalars
print(json.dumps({"points": len(df), "inner": time.perf_counter() - t}))
"""

CHILD_D = """
import sys, time, json
t = time.perf_counter()
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
n = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
print(json.dumps({"points": n, "inner": time.perf_counter() - t}))
"""


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            continue
    try:
        return json.loads(text)
    except ValueError:
        return {}


ANALYZE_REPEAT = 5  # (b) is measured this many times, the median process reported


def _analyze_points(report: dict):
    """Points read, from the analyze JSON report when it says (summary.n_points or similar)."""
    summ = report.get("summary", {}) if isinstance(report, dict) else {}
    for key in ("n_points", "points", "scalar_points", "n_scalars"):
        if isinstance(summ.get(key), int):
            return summ[key]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--only", default="a,b,c,d")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.generate_only:
        generate(opts.regenerate)
        return 0
    # generate in a child, so that this process stays small (a forked child starts with its parent's RSS)
    gen = [sys.executable, str(Path(__file__).resolve()), "--generate-only"] + (["--regenerate"] if opts.regenerate else [])
    subprocess.run(gen, check=True)
    meta = generate_run(RUN, MAX_STEPS)  # written by the child: only its meta is read here
    state_path, ev_path, written = Path(meta["state_path"]), Path(meta["event_path"]), int(meta["points"])
    written_all = written + int(meta["state_points"])
    py = sys.executable
    cli = Path(py).parent / "higgs-diag"
    only = set(opts.only.split(","))
    rows = []
    print(f"run: {RUN}\n  {state_path.relative_to(RUN)} {state_path.stat().st_size / 1e6:.1f} MB\n"
          f"  {ev_path.relative_to(RUN)} {ev_path.stat().st_size / 1e6:.1f} MB, {written:,} scalar points written",
          file=sys.stderr)

    # (a) and (b) run higgs-diag as installed, with its .pyc files (one warm-up fills the cache); tbparse and
    # TensorBoard, (c) and (d), keep their installed .pyc files
    env_ours = installed_env("analyze")
    if only & {"a", "b"}:
        subprocess.run([str(cli), "analyze", str(RUN), "--format", "json"], capture_output=True, env=env_ours)
    if "a" in only:
        m = measure([py, "-c", CHILD_A, str(ev_path)], env_ours)
        out = _last_json(m["stdout"])
        rows.append(("(a) higgs_diag read_event_file", m, out.get("points"), out.get("inner")))
        if m["rc"] or out.get("problems"):
            print(m["stderr"][-2000:], out.get("problems"), file=sys.stderr)
    if "b" in only:
        has_cli = cli.exists() and subprocess.run([str(cli), "analyze", "--help"], capture_output=True).returncode == 0
        if not has_cli:
            print("(b) skipped: `higgs-diag analyze` does not exist yet", file=sys.stderr)
        else:
            # the median of ANALYZE_REPEAT processes (about a second each): one run moves with the machine
            ms = sorted((measure([str(cli), "analyze", str(RUN), "--format", "json"], env_ours)
                         for _ in range(ANALYZE_REPEAT)),
                        key=lambda x: x["wall"])
            m = ms[len(ms) // 2]
            print(f"(b) {len(ms)} processes, wall s: " + " ".join(f"{x['wall']:.2f}" for x in ms)
                  + f"; the median's cpu {m['cpu']:.2f} s", file=sys.stderr)
            report = _last_json(m["stdout"]) if m["stdout"].strip() else {}
            if m["rc"] not in (0, 1):
                print(f"(b) exit code {m['rc']}: {m['stderr'][-2000:]}", file=sys.stderr)
            rows.append(("(b) higgs-diag analyze --format json", m, _analyze_points(report), None))
    if "c" in only:
        m = measure([py, "-c", CHILD_C, str(ev_path)])
        out = _last_json(m["stdout"])
        rows.append(("(c) tbparse SummaryReader.scalars", m, out.get("points"), out.get("inner")))
        if m["rc"]:
            print(m["stderr"][-2000:], file=sys.stderr)
    if "d" in only:
        m = measure([py, "-c", CHILD_D, str(ev_path)])
        out = _last_json(m["stdout"])
        rows.append(("(d) EventAccumulator(scalars=0).Reload", m, out.get("points"), out.get("inner")))
        if m["rc"]:
            print(m["stderr"][-2000:], file=sys.stderr)

    ref_a = next((r[1]["wall"] for r in rows if r[0].startswith("(a)")), None)
    ref_b = next((r[1]["wall"] for r in rows if r[0].startswith("(b)")), None)
    head = f"{'':40} {'wall s':>8} {'cpu s':>6} {'in-proc s':>9} {'peak RSS MB':>11} {'points read':>12} {'written':>9} {'/(b)':>6} {'/(a)':>6}"
    print(head)
    print("-" * len(head))
    for label, m, pts, inner in rows:
        ratio_b = f"{m['wall'] / ref_b:6.2f}" if ref_b else f"{'-':>6}"
        ratio_a = f"{m['wall'] / ref_a:6.2f}" if ref_a else f"{'-':>6}"
        pts_s = f"{pts:,}" if isinstance(pts, int) else "?"
        inner_s = f"{inner:9.3f}" if isinstance(inner, (int, float)) else f"{'-':>9}"
        print(f"{label:40} {m['wall']:8.3f} {m['cpu']:6.2f} {inner_s} {m['rss_mb']:11.1f} {pts_s:>12} {written:>9,} {ratio_b} {ratio_a}")
    print(textwrap.dedent("""
        wall: the whole child process (interpreter start, imports, reading); cpu: its user + system seconds (less
        moved by other jobs on a shared machine than wall); in-proc: the library call alone (wall).
        /(b), /(a): wall time relative to `higgs-diag analyze` and to read_event_file (higher = slower).
        written: scalar events in the event file; analyze's points read count trainer_state.json's too."""))
    _targets(rows, written, written_all)
    return 0


def _targets(rows, written: int, written_all: int) -> None:
    """The targets of issue #11 (one run), in benchmarks/_targets.py's format."""
    sys.path.insert(0, str(HERE))
    from _targets import target

    by = {r[0][:3]: r for r in rows}
    b, c, a = by.get("(b)"), by.get("(c)"), by.get("(a)")
    ok_b = b is not None and b[1]["rc"] in (0, 1)
    if ok_b:
        wall, rss = b[1]["wall"], b[1]["rss_mb"]
        target("one run: analyze wall time", f"{wall:.2f} s", "<= 1.0 s", wall <= 1.0, f"{b[1]['cpu']:.2f} s CPU")
        target("one run: analyze peak RSS", f"{rss:.0f} MB", "<= 300 MB", rss <= 300)
        if c is not None and not c[1]["rc"]:
            ratio = c[1]["wall"] / wall
            target("one run: analyze vs tbparse (wall)", f"{ratio:.1f}x", ">= 15x faster", ratio >= 15,
                   f"tbparse {c[1]['wall']:.1f} s on the event file alone; CPU seconds "
                   f"{c[1]['cpu'] / max(b[1]['cpu'], 1e-9):.1f}x")
        else:
            target("one run: analyze vs tbparse (wall)", "-", ">= 15x faster", None, "tbparse not run (--only)")
        pts = b[2]
        target("one run: every point read by analyze", f"{pts:,}" if isinstance(pts, int) else "?",
               f"== {written_all:,} written", pts == written_all,
               f"{written:,} in the event file + {written_all - written:,} in trainer_state.json")
    else:
        why = "analyze not run (--only)" if b is None else f"analyze exit code {b[1]['rc']}"
        for name, goal in (("one run: analyze wall time", "<= 1.0 s"), ("one run: analyze peak RSS", "<= 300 MB"),
                           ("one run: analyze vs tbparse (wall)", ">= 15x faster"),
                           ("one run: every point read by analyze", f"== {written_all:,} written")):
            target(name, "-", goal, None, why)
    if a is not None:
        target("one run: event reader reads every point", f"{a[2]:,}" if isinstance(a[2], int) else "?",
               f"== {written:,} written", a[2] == written and not a[1]["rc"])


if __name__ == "__main__":
    sys.exit(main())
