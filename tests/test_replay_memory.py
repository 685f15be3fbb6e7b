"""Replay at the model's own size: the checkpoint's dtype by default, weights memory-mapped (not copied) when that
dtype is the one used, LoRA merged without writing to any file, and a one-line refusal before loading when the
model would not fit in memory (the available memory is monkeypatched: no big model needed)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import higgs_diag
from higgs_diag.batch import load_batch
from higgs_diag.cli import main
from higgs_diag.config import ReplayOptions
from higgs_diag.replay import memory, model as replay_model
from higgs_diag.replay.api import load_checkpoint
from higgs_diag.replay.checkpoint import inspect_checkpoint
from higgs_diag.replay.errors import ReplayError
from _cli_util import runner  # tests/_cli_util.py

ROOT = Path(__file__).resolve().parents[1]
REPLAY = ROOT / "fixtures" / "replay"
FULL = REPLAY / "healthy" / "checkpoint-200"
BATCH = REPLAY / "healthy" / "higgs-diag" / "batches" / "step-000200.pt"


def load(path, **kw):
    model, source = load_checkpoint(path, options=ReplayOptions(device="cpu", **kw))
    return source, model


def audio_logits(model, dtype=torch.float32):
    batch = load_batch(BATCH)[0]
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.inference_mode():
        return model(**batch).audio_logits.float()


def to_bf16(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder with its safetensors weights in bfloat16 (like the release's)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.bin"))
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(f),
                  metadata={"format": "pt"})
    return dst


def mapped_ranges(file: Path) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of the mappings of ``file`` in this process."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(str(file.resolve())):
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                out.append((a, b, line.split()[1]))
    return out


def in_mapping(t: torch.Tensor, ranges) -> bool:
    return any(a <= t.data_ptr() < b for a, b, _ in ranges)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


# ---- the default dtype ------------------------------------------------------------------------------------
def test_auto_is_the_checkpoints_own_dtype():
    cpu = torch.device("cpu")
    assert replay_model.resolve_dtype("auto", cpu, "bfloat16") is torch.bfloat16
    assert replay_model.resolve_dtype(None, cpu, "BF16") is torch.bfloat16
    assert replay_model.resolve_dtype("auto", cpu, "float16") is torch.float16
    assert replay_model.resolve_dtype("auto", cpu, "float32") is torch.float32
    assert replay_model.resolve_dtype("auto", cpu, None) is torch.float32
    assert replay_model.resolve_dtype("float32", cpu, "bfloat16") is torch.float32


def test_bf16_checkpoint_replays_in_bf16_on_cpu_and_float32_only_when_asked(tmp_path):
    ck = to_bf16(FULL, tmp_path / "checkpoint-200")
    src, m16 = load(ck)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    _, m32 = load(ck, dtype="float32")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    for (k, a), b in zip(m16.state_dict().items(), m32.state_dict().values()):
        assert torch.equal(a.float(), b), k  # the same weights, upcast exactly
    a16, a32 = audio_logits(m16, torch.bfloat16), audio_logits(m32)
    assert torch.isfinite(a16).all()
    torch.testing.assert_close(a16, a32, rtol=0.05, atol=0.1)  # bf16 rounding only
    diag = higgs_diag.replay_batch(ck, [BATCH], options=ReplayOptions(device="cpu"))
    assert diag.summary["replay"]["dtype"] == "bfloat16" and diag.verdict == "healthy", \
        [f.title for f in diag.findings]


def test_adapter_defaults_to_its_base_dtype(tmp_path):
    base = to_bf16(REPLAY / "healthy-lora" / "base", tmp_path / "base")
    adapter = REPLAY / "healthy-lora" / "checkpoint-200"
    src, model = load(adapter, base=base)  # the adapter itself is float32, the base bfloat16
    assert src.kind == "adapter" and {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---- memory-mapped, not copied ----------------------------------------------------------------------------
def test_full_model_weights_are_views_of_the_mapped_file():
    file = FULL / "model.safetensors"
    src, model = load(FULL)
    ranges = mapped_ranges(file)
    assert ranges and all(perm.startswith("rw") and perm.endswith("p") for *_, perm in ranges)  # private (CoW)
    params = dict(model.named_parameters())
    assert params and all(in_mapping(p, ranges) for p in params.values()), \
        [k for k, p in params.items() if not in_mapping(p, ranges)][:3]
    ref = load_file(str(file))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_sharded_and_wrapper_weights_are_mapped_too(tmp_path):
    sd = load_file(str(FULL / "model.safetensors"))
    keys = sorted(sd)
    shutil.copy(FULL / "config.json", tmp_path / "config.json")
    weight_map = {}
    for i, ks in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, model = load(tmp_path)
    ranges = [r for f in tmp_path.glob("model-*.safetensors") for r in mapped_ranges(f)]
    assert all(in_mapping(p, ranges) for p in model.parameters())

    wrapper = REPLAY / "healthy-wrapper" / "checkpoint-200"  # wrapper state dict with LoRA weights
    before = digest(wrapper)
    src, model = load(wrapper)
    assert src.kind == "wrapper-lora"
    ranges = mapped_ranges(wrapper / "model.safetensors")
    assert all(in_mapping(p, ranges) for p in model.parameters())  # adapted matrices too: copy-on-write
    assert digest(wrapper) == before


def test_lora_merge_never_writes_to_the_files(tmp_path):
    adapter = REPLAY / "healthy-lora" / "checkpoint-200"
    base = REPLAY / "healthy-lora" / "base"
    before = digest(base), digest(adapter)
    _, first = load(adapter)
    _, second = load(adapter)  # a merge that reached the file would be applied twice here
    assert (digest(base), digest(adapter)) == before
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    plain = load_file(str(base / "model.safetensors"))
    changed = [k for k, v in first.state_dict().items() if k in plain and not torch.equal(v, plain[k])]
    src = inspect_checkpoint(adapter)
    assert changed and len(changed) <= src.source.lora_modules  # only the adapted matrices differ from the base


def test_converted_weights_are_copies(tmp_path):
    ck = to_bf16(FULL, tmp_path / "checkpoint-200")
    _, model = load(ck, dtype="float32")
    ranges = mapped_ranges(ck / "model.safetensors")
    assert not any(in_mapping(p, ranges) for p in model.parameters())


# ---- the memory check -------------------------------------------------------------------------------------
def _between_bf16_and_f32(insp) -> int:
    w = replay_model.loaded_weights(insp)
    lo, hi = (memory.needed_bytes(w, insp.source.config, d) for d in ("bfloat16", "float32"))
    assert lo < hi
    return (lo + hi) // 2


def test_refuses_in_one_line_before_loading(monkeypatch):
    insp = inspect_checkpoint(FULL)
    have = _between_bf16_and_f32(insp)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (have, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(memory, "_cuda_free", lambda: None)

    def never(*a, **k):
        raise AssertionError("the model was built although it does not fit")

    monkeypatch.setattr(replay_model, "build_model", never)
    t0 = time.perf_counter()
    with pytest.raises(ReplayError) as e:
        replay_model.load_model(insp, insp.source.config, insp.source.config_from, "cpu", "float32")
    assert time.perf_counter() - t0 < 0.5
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(FULL))
    assert "needs about" in msg and "float32, asked for with --dtype" in msg and "available (MemAvailable" in msg
    assert "stopped before loading" in msg and "fits: --dtype bfloat16" in msg and memory.SKIP_ENV in msg


def test_auto_refuses_too_and_says_when_nothing_fits(monkeypatch):
    insp = inspect_checkpoint(FULL)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (10 * 2**20, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(memory, "_cuda_free", lambda: None)
    with pytest.raises(ReplayError, match=r"the checkpoint's own dtype.*nothing fits here.*--device cuda.*--no-model"):
        replay_model.load_model(insp, insp.source.config, insp.source.config_from, "cpu", "auto")


def test_a_gpu_that_fits_is_suggested(monkeypatch):
    insp = inspect_checkpoint(FULL)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (10 * 2**20, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(memory, "_cuda_free", lambda: 80 * 10**9)
    with pytest.raises(ReplayError, match=r"fits: --device cuda \(.* of 80.0 GB free\)"):
        replay_model.load_model(insp, insp.source.config, insp.source.config_from, "cpu", "float32")


def test_the_adapter_next_to_merged_float32_weights_is_suggested(monkeypatch, tmp_path):
    """checkpoint-N/model.safetensors (a wrapper's float32 state dict with LoRA) next to lora_adapters/ on a
    bfloat16 base: the adapter on its base is named as an option that fits."""
    base = to_bf16(REPLAY / "healthy-wrapper" / "base", tmp_path / "base")
    ck = tmp_path / "checkpoint-200"
    shutil.copytree(REPLAY / "healthy-wrapper" / "checkpoint-200", ck,
                    ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.bin"))
    cfg_file = ck / "lora_adapters" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_file.write_text(json.dumps(cfg))
    shutil.copy(base / "config.json", ck / "config.json")
    insp = inspect_checkpoint(ck)
    assert insp.source.kind == "wrapper-lora"
    have = _between_bf16_and_f32(insp)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (have, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(memory, "_cuda_free", lambda: None)
    with pytest.raises(ReplayError, match=r"fits: --dtype bfloat16 .* or the LoRA adapter .*lora_adapters on its "
                                          r"base instead of the merged weights \(.* in bfloat16\)"):
        replay_model.load_model(insp, insp.source.config, insp.source.config_from, "cpu", "auto")


def test_skip_env_and_unknown_memory_load_anyway(monkeypatch):
    insp = inspect_checkpoint(FULL)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1, "MemAvailable in /proc/meminfo"))
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    model, _, dt = replay_model.load_model(insp, insp.source.config, insp.source.config_from, "cpu", "auto")
    assert dt is torch.float32
    monkeypatch.delenv(memory.SKIP_ENV)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (None, "unknown"))
    replay_model.load_model(insp, insp.source.config, insp.source.config_from, "cpu", "auto")


def test_cli_stops_with_exit_2_and_one_line(monkeypatch, tmp_path):
    ck = to_bf16(FULL, tmp_path / "checkpoint-200")
    have = _between_bf16_and_f32(inspect_checkpoint(ck))
    monkeypatch.setattr(memory, "available_bytes", lambda device: (have, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(memory, "_cuda_free", lambda: None)
    r = runner().invoke(main, ["replay-batch", str(ck), str(BATCH), "--device", "cpu", "--dtype", "float32"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("higgs-diag: error: ") and "--dtype bfloat16" in lines[0]
    r = runner().invoke(main, ["replay-batch", str(ck), str(BATCH), "--device", "cpu", "--format", "json"])
    assert r.exit_code == 0, r.stderr  # auto: the checkpoint's bfloat16 fits
    assert json.loads(r.stdout)["summary"]["replay"]["dtype"] == "bfloat16"


def test_release_geometry_numbers():
    """The release model (5,771,283,456 parameters, bfloat16): fits a 24 GiB machine in bfloat16, not in float32
    (more than the development machine's whole MemTotal of 25.28 GB)."""
    cfg = {"text_config": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                           "num_attention_heads": 24}}
    w = memory.Weights({"BF16": 5_771_283_456})
    assert w.stored_dtype == "bfloat16" and w.bytes_in("bfloat16") == 11_542_566_912
    bf16, f32 = memory.needed_bytes(w, cfg, "bfloat16"), memory.needed_bytes(w, cfg, "float32")
    assert 12.5e9 < bf16 < 14e9 and f32 > 25.3e9


def test_count_weights_skips_lora_and_original_module():
    w = memory.count_weights([("a.weight", [4, 8], "BF16"), ("b.lora_A.default.weight", [2, 8], "F32"),
                              ("c.original_module.weight", [4, 4], "F32"), ("d.weight", [3], "F32"),
                              ("e.position_ids", [10], "I64")])
    assert w.float_params == {"BF16": 32, "F32": 3} and w.other_bytes == 80 and w.stored_dtype == "bfloat16"


def test_meminfo(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       24683656 kB\nMemFree:        1000 kB\nMemAvailable:   20000000 kB\n")
    assert memory.meminfo_available(p) == 20000000 * 1024
    p.write_text("MemTotal:       24683656 kB\n")
    assert memory.meminfo_available(p) is None
    assert memory.meminfo_available(tmp_path / "missing") is None
    if os.path.exists(memory.MEMINFO):
        have, where = memory.available_bytes(torch.device("cpu"))
        assert have > 0 and "MemAvailable" in where
