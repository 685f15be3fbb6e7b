"""Checkpoint loading for the replay: every layout offline and strict, LoRA merged exactly like PEFT computes it,
clear messages for what cannot be loaded, nothing unpickled."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (before peft: FACTS §1)
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_runs as M  # noqa: E402

import higgs_diag  # noqa: E402
from higgs_diag.config import ReplayOptions  # noqa: E402
from higgs_diag.batch import load_batch  # noqa: E402
from higgs_diag.replay.checkpoint import inspect_checkpoint  # noqa: E402
from higgs_diag.replay.errors import ReplayError  # noqa: E402
from higgs_diag.replay.api import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPLAY = ROOT / "fixtures" / "replay"
BATCH = REPLAY / "healthy" / "higgs-diag" / "batches" / "step-000200.pt"


def load(path, run=None, **kw):
    model, source = load_checkpoint(path, run_dir=run, options=ReplayOptions(device="cpu", dtype="float32", **kw))
    return source, model


def audio_logits(model, batch=None):
    batch = batch or load_batch(BATCH)[0]
    with torch.inference_mode():
        return model(**batch).audio_logits


def peft_reference(adapter_dir: Path, base_dir: Path):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from peft import PeftModel

    base = HiggsAudioModel(HiggsAudioConfig.from_dict(json.loads((base_dir / "config.json").read_text())))
    base.load_state_dict(load_file(str(base_dir / "model.safetensors")), strict=True)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_full_model_loads_exactly():
    src, model = load(REPLAY / "healthy" / "checkpoint-200")
    assert src.kind == "full" and src.model_class == "HiggsAudioModel" and src.step == 200
    ref = load_file(str(REPLAY / "healthy" / "checkpoint-200" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def test_sharded_full_model(tmp_path):
    src_dir = REPLAY / "healthy" / "checkpoint-200"
    shutil.copy(src_dir / "config.json", tmp_path / "config.json")
    sd = load_file(str(src_dir / "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    src, model = load(tmp_path)
    assert src.kind == "full" and len(src.weight_files) == 2
    _, ref = load(src_dir)
    assert torch.equal(audio_logits(model), audio_logits(ref))


def test_adapter_on_its_base_equals_peft():
    adapter = REPLAY / "healthy-lora" / "checkpoint-200"
    src, model = load(adapter)  # base from adapter_config.json's base_model_name_or_path (a relative local folder)
    assert src.kind == "adapter" and src.model_class == "PeftModel" and src.lora_modules == 19  # 2 layers x 7 + the audio FFN of layer 1 (3) + 2 heads
    assert Path(src.base).resolve() == (REPLAY / "healthy-lora" / "base").resolve()
    ref = peft_reference(adapter, REPLAY / "healthy-lora" / "base")
    torch.testing.assert_close(audio_logits(model), audio_logits(ref), rtol=1e-4, atol=1e-5)


def test_adapter_with_explicit_base(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(REPLAY / "healthy-lora" / "checkpoint-200", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "bosonai/higgs-audio-v2-generation-3B-base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReplayError, match="hub id.*never downloads: pass --base"):
        inspect_checkpoint(adapter)
    src, model = load(adapter, base=REPLAY / "healthy-lora" / "base")
    assert src.base_from == "--base"
    _, ref = load(REPLAY / "healthy-lora" / "checkpoint-200")
    torch.testing.assert_close(audio_logits(model), audio_logits(ref))


def test_wrapper_state_dict_with_lora_and_its_lora_adapters():
    ck = REPLAY / "healthy-wrapper" / "checkpoint-200"
    src, model = load(ck)
    assert src.kind == "wrapper-lora" and src.prefix == "model.base_model.model." and src.lora_alpha == 16
    assert src.lora_alpha_from.endswith("lora_adapters/adapter_config.json") and src.config_from  # from the run logs
    src2, model2 = load(ck / "lora_adapters")  # the adapter alone, on its base
    assert src2.kind == "adapter"
    ref = peft_reference(ck / "lora_adapters", REPLAY / "healthy-wrapper" / "base")
    torch.testing.assert_close(audio_logits(model), audio_logits(ref), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(audio_logits(model2), audio_logits(ref), rtol=1e-4, atol=1e-5)


def test_wrapper_lora_without_adapter_config_needs_lora_alpha(tmp_path):
    ck = tmp_path / "checkpoint-200"
    ck.mkdir()
    shutil.copy(REPLAY / "healthy-wrapper" / "checkpoint-200" / "model.safetensors", ck)
    base = REPLAY / "healthy-wrapper" / "base"
    with pytest.raises(ReplayError, match="--lora-alpha"):
        inspect_checkpoint(ck, base=base)
    src, model = load(ck, base=base, lora_alpha=16)
    _, ref = load(REPLAY / "healthy-wrapper" / "checkpoint-200")
    torch.testing.assert_close(audio_logits(model), audio_logits(ref))
    with pytest.raises(ReplayError, match="no config.json and no logged model_config"):
        higgs_diag.replay_batch(ck, [BATCH], options=ReplayOptions(lora_alpha=16))


def test_plain_wrapper_uses_the_logged_model_config():
    """fixtures/runs/eval-loss-missing: a wrapper nn.Module without LoRA and no config.json; the config comes from
    the run's TensorBoard model_config."""
    diag = higgs_diag.replay_batch(ROOT / "fixtures" / "runs" / "eval-loss-missing" / "checkpoint-20", [BATCH])
    s = diag.summary["replay"]
    assert s["checkpoint_kind"] == "wrapper" and "model_config" in s["config_from"]
    assert diag.findings[0].code == "HD805" and str(diag.findings[0].severity) == "critical"


def test_lora_merge_matches_peft_for_embeddings_rslora_and_modules_to_save(tmp_path):
    """A wrapper state dict of a PEFT model with LoRA on an embedding and linears, rsLoRA, a rank pattern and a
    module to save, with non-zero LoRA weights: the merged model equals PEFT's forward."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                     rank_pattern={"v_proj": 2}, modules_to_save=["audio_lm_head"])
    peft_model = get_peft_model(M.tiny_model(), cfg).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    wrapper = M.HiggsAudioForTraining(peft_model)
    ck = tmp_path / "checkpoint-7"
    ck.mkdir()
    save_file({k: v.contiguous() for k, v in wrapper.state_dict().items()}, str(ck / "model.safetensors"))
    (ck / "config.json").write_text(peft_model.get_base_model().config.to_json_string())
    peft_model.peft_config["default"].save_pretrained(str(ck / "lora_adapters"))
    src, model = load(ck)
    assert src.kind == "wrapper-lora"
    with torch.inference_mode():
        ref = peft_model(**load_batch(BATCH)[0]).audio_logits
    torch.testing.assert_close(audio_logits(model), ref, rtol=1e-4, atol=1e-5)


def test_keys_that_do_not_match_the_config(tmp_path):
    adapter = REPLAY / "healthy-lora" / "checkpoint-200"
    other = tmp_path / "other-base"
    M.HiggsAudioModel(M.tiny_config(hidden=48, intermediate=96)).save_pretrained(other, safe_serialization=True)
    with pytest.raises(ReplayError, match="does not fit this base"):
        load(adapter, base=other)
    full = tmp_path / "full"
    shutil.copytree(REPLAY / "healthy" / "checkpoint-200", full)
    cfg = json.loads((full / "config.json").read_text())
    cfg["audio_num_codebooks"] = 8
    (full / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReplayError, match=r"the keys do not match the config from .*config.json.*shapes differ"):
        load(full)


def test_missing_boson_multimodal_is_one_clear_message(monkeypatch):
    for name in list(sys.modules):
        if name.startswith("boson_multimodal"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "boson_multimodal", None)
    with pytest.raises(ReplayError, match="boson_multimodal.*pip install boson-multimodal.*--no-model"):
        higgs_diag.replay_batch(REPLAY / "healthy" / "checkpoint-200", [BATCH])
    diag = higgs_diag.replay_batch(REPLAY / "healthy" / "checkpoint-200", [BATCH], options=ReplayOptions(no_model=True))  # works without it
    assert diag.findings[0].code == "HD800"


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/higgs_diag_replay_pwned"),))


def test_pickled_weights_are_refused_never_loaded(tmp_path):
    marker = Path("/tmp/higgs_diag_replay_pwned")
    marker.unlink(missing_ok=True)
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    shutil.copy(REPLAY / "healthy" / "checkpoint-200" / "config.json", ck)
    torch.save({"embed_tokens.weight": Evil()}, ck / "pytorch_model.bin")
    with pytest.raises(ReplayError, match="pytorch_model.bin, a pickle.*never unpickles"):
        higgs_diag.replay_batch(ck, [BATCH])
    assert not marker.exists()


def test_truncated_and_foreign_weight_files(tmp_path):
    ck = tmp_path / "checkpoint-4"
    shutil.copytree(REPLAY / "healthy" / "checkpoint-200", ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReplayError, match="model.safetensors: truncated"):
        inspect_checkpoint(ck)
    (ck / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ReplayError, match="not a safetensors file"):
        inspect_checkpoint(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(ReplayError, match="holds no model weights.*expected config.json"):
        inspect_checkpoint(ck)


def test_wrapper_state_dict_next_to_adapter_files_needs_no_base(tmp_path):
    """higgs_diag.trainer's layout for a PEFT model inside a wrapper: the wrapper's model.safetensors and the
    adapter files in the same checkpoint folder. The self-contained state dict is used."""
    ck = tmp_path / "checkpoint-200"
    ck.mkdir()
    src_dir = REPLAY / "healthy-wrapper" / "checkpoint-200"
    shutil.copy(src_dir / "model.safetensors", ck)
    for f in (src_dir / "lora_adapters").iterdir():
        shutil.copy(f, ck)
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # no base anywhere: it must not be needed
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    src, model = load(ck, run=REPLAY / "healthy-wrapper")
    assert src.kind == "wrapper-lora" and src.lora_alpha == 16 and src.base is None
    _, ref = load(src_dir)
    torch.testing.assert_close(audio_logits(model), audio_logits(ref))


@pytest.mark.parametrize("scenario", ["healthy-lora", "healthy-wrapper"])
def test_moved_run_finds_its_base_next_to_the_checkpoint(tmp_path, scenario):
    """adapter_config.json records the base relative to where training ran; a copied run still finds it."""
    import shutil

    import higgs_diag

    run = tmp_path / "elsewhere" / scenario
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "replay" / scenario, run)
    ckpt = next(run.glob("checkpoint-*"))
    diag = higgs_diag.replay_batch(ckpt, [run / "higgs-diag" / "batches"])
    assert diag.verdict == "healthy", [(f.code, f.title) for f in diag.findings]
