"""Batch schema, safe loading and the batch validation shared by the trainer and replay-batch."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

from higgs_diag.batch import (BatchError, BatchSpec, BatchValidationError, batch_stats, load_batch, save_batch,
                              validate_batch)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_runs as M  # noqa: E402  (the fixtures' collator: boson's alignment, without librosa)

SPEC = BatchSpec.from_config(M.tiny_config())


def good_batch(n=4, **kw):
    return M.collate(M.make_samples(n, 7), **kw)


def kinds(issues):
    return {i.kind for i in issues}


def test_a_collated_batch_is_clean():
    b = good_batch()
    assert validate_batch(b, SPEC) == []
    st = batch_stats(b, SPEC)
    assert st.n_segments == 4 == st.n_audio_out_tokens and st.staircase is True
    assert 0 < st.audio_masked_share < 0.5 and st.segments_without_targets == 0


@pytest.mark.parametrize("fault, kind, field", [
    (lambda b: b.pop("audio_out_ids"), "missing-field", "audio_out_ids"),
    (lambda b: b.update(audio_out_ids=torch.zeros((4, 0), dtype=torch.long)), "empty-audio-out", "audio_out_ids"),
    (lambda b: b.update(label_audio_ids=b["audio_out_ids"].clone()), "labels-are-inputs", "label_audio_ids"),
    (lambda b: b.update(label_audio_ids=torch.full_like(b["label_audio_ids"], -100)), "all-audio-masked",
     "label_audio_ids"),
    (lambda b: b.update(label_audio_ids=b["label_audio_ids"][:, :-3]), "shape-mismatch", "label_audio_ids"),
    (lambda b: b.update(audio_out_ids_start=b["audio_out_ids_start"].flip(0)), "bad-starts", "audio_out_ids_start"),
    (lambda b: b.update(audio_out_ids=b["audio_out_ids"][:3], label_audio_ids=b["label_audio_ids"][:3]),
     "codebook-count", "audio_out_ids"),
    (lambda b: b["label_audio_ids"].__setitem__((0, 1), 99), "label-range", "label_audio_ids"),
    (lambda b: b.update(input_ids=torch.where(b["input_ids"] == M.AUDIO_OUT, M.PAD, b["input_ids"])),
     "segment-count", "input_ids"),
])
def test_each_bad_batch_kind_is_named(fault, kind, field):
    b = good_batch()
    fault(b)
    issues = validate_batch(b, SPEC)
    assert kind in kinds(issues), issues
    assert any(i.field == field for i in issues if i.kind == kind)
    with pytest.raises(BatchValidationError, match=field):
        validate_batch(b, SPEC, mode="strict")


def test_delay_pattern_mismatch_and_over_masking():
    b = good_batch(use_delay_pattern=False)
    assert "delay-pattern" in kinds(validate_batch(b, SPEC))
    b = good_batch()
    lab = b["label_audio_ids"]
    keep = torch.zeros_like(lab, dtype=torch.bool)
    keep[:, 1] = True  # one target per codebook left
    b["label_audio_ids"] = torch.where(keep, lab, torch.full_like(lab, -100))
    issues = validate_batch(b, SPEC, max_masked_share=0.9)
    assert "over-masked" in kinds(issues) and all(i.severity == "warning" for i in issues)
    validate_batch(b, SPEC, max_masked_share=0.9, mode="strict")  # a warning does not stop training


def test_save_and_load_round_trip(tmp_path):
    b = good_batch()
    p = save_batch(tmp_path / "step-000010.pt", b, {"step": 10, "losses": {"audio_loss": torch.tensor(0.5)}})
    tensors, meta = load_batch(p)
    assert set(tensors) == set(b) and all(torch.equal(tensors[k], b[k]) for k in b)
    assert meta["step"] == 10 and meta["losses"]["audio_loss"] == 0.5 and meta["format"] == "higgs-diag.batch/1"


def test_safetensors_batches(tmp_path):
    from safetensors.torch import save_file

    b = {k: v.contiguous() for k, v in good_batch().items()}
    save_file(b, str(tmp_path / "b.safetensors"))
    tensors, meta = load_batch(tmp_path / "b.safetensors")
    assert torch.equal(tensors["label_audio_ids"], b["label_audio_ids"]) and meta == {}


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/higgs_diag_pwned"),))


def test_hostile_and_broken_files_get_one_line_errors(tmp_path):
    marker = Path("/tmp/higgs_diag_pwned")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    torch.save({"input_ids": torch.zeros(1), "x": Evil()}, evil)
    with pytest.raises(BatchError, match="pickled Python objects"):
        load_batch(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"input_ids": Evil()}))
    with pytest.raises(BatchError):
        load_batch(raw)
    assert not marker.exists()
    good = save_batch(tmp_path / "good.pt", good_batch())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(BatchError, match="cut.pt"):
        load_batch(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(BatchError, match="none of its tensors"):
        load_batch(other)
    with pytest.raises(BatchError, match="no such file"):
        load_batch(tmp_path / "nope.pt")
