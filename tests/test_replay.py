"""replay-batch on the replay fixtures (real tiny training with batch dumps, fixtures/make_replay.py): the cause of
every scenario comes first, none on the healthy runs; the CLI, `analyze --replay` and the library agree."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import higgs_diag
from higgs_diag.config import ReplayOptions
from higgs_diag.cli import main
from _cli_util import runner, tree_digest  # tests/_cli_util.py

ROOT = Path(__file__).resolve().parents[1]
REPLAY = ROOT / "fixtures" / "replay"
CAUSES = {"audio-labels-unshifted", "audio-labels-are-inputs", "audio-out-missing", "audio-over-masked"}


def ckpt(scenario: str) -> Path:
    return next(p for p in sorted((REPLAY / scenario).glob("checkpoint-*")))


def dumps(scenario: str) -> Path:
    return REPLAY / scenario / "higgs-diag" / "batches"





@pytest.mark.parametrize("scenario", sorted(CAUSES))
def test_each_fault_is_the_first_finding(scenario):
    diag = higgs_diag.replay_batch(ckpt(scenario), [dumps(scenario)])
    first = diag.findings[0]
    assert first.category == scenario and str(first.severity) == "critical", [f.title for f in diag.findings]
    assert not [f for f in diag.findings[1:] if f.category in CAUSES], "only one cause per scenario"


@pytest.mark.parametrize("scenario", ["healthy", "healthy-lora", "healthy-wrapper"])
def test_healthy_runs_name_no_cause(scenario):
    diag = higgs_diag.replay_batch(ckpt(scenario), [dumps(scenario)])
    assert diag.verdict == "healthy", [f.title for f in diag.findings]
    assert {f.code for f in diag.findings} == {"HD800"}
    m = diag.summary["replay"]["model"]
    # a well-fitted model: shifted CE well below uniform ln(18), far below the unshifted one, copy rate normal
    assert m["audio_ce"] < 0.85 * m["uniform"] < m["audio_ce_unshifted"]
    assert m["audio_copy_rate"] < 0.2
    for b in diag.summary["replay"]["batches"]:  # the trainer's logged loss is the shifted loss of the weights
        logged = b["logged"]["values"].get("audio_loss") or b["logged"]["values"]["loss"]
        replayed = b["model"]["audio_ce"] if "audio_loss" in b["logged"]["values"] else (
            b["model"]["audio_ce"] + b["model"]["text_ce"])
        assert abs(logged / replayed - 1) < 0.15, (logged, replayed)


def test_unshifted_numbers_match_the_issue_sentence():
    diag = higgs_diag.replay_batch(ckpt("audio-labels-unshifted"), [dumps("audio-labels-unshifted")])
    f = diag.findings[0]
    assert f.code == "HD801" and "matches the unshifted cross-entropy" in f.title and "without the one-position shift" \
        in f.title
    batches = diag.summary["replay"]["batches"]
    for b in batches:
        logged, u, s = b["logged"]["values"]["audio_loss"], b["model"]["audio_ce_unshifted"], b["model"]["audio_ce"]
        assert logged < 0.05 and u < 0.01 and s > 2.89  # collapsed; the shifted loss is worse than a uniform guess
    assert diag.summary["replay"]["model"]["audio_copy_rate"] > 0.8


def test_audio_out_missing_from_a_dump_of_the_model_inputs():
    """A user's own torch.save of what the model received (after the whitelist): the fields are named and the
    forward shows the empty audio logits."""
    diag = higgs_diag.replay_batch(ckpt("audio-out-missing"), [REPLAY / "audio-out-missing" / "user-dumps"])
    f = diag.findings[0]
    assert f.code == "HD803" and "[0, 4, 18]" in f.title
    for name in ("audio_out_ids", "audio_out_ids_start", "audio_out_ids_start_group_loc", "label_audio_ids"):
        assert name in f.title


def test_are_inputs_found_without_the_model():
    t0 = time.perf_counter()
    diag = higgs_diag.replay_batch(None, [dumps("audio-labels-are-inputs")], options=ReplayOptions(no_model=True),
                                   run_dir=REPLAY / "audio-labels-are-inputs")
    assert time.perf_counter() - t0 < 1.0
    assert diag.findings[0].code == "HD802" and diag.summary["replay"]["model"] is None


def test_over_masked_without_the_model():
    diag = higgs_diag.replay_batch(ckpt("audio-over-masked"), [dumps("audio-over-masked")], options=ReplayOptions(no_model=True))
    assert diag.findings[0].category == "audio-over-masked"


def test_no_model_does_not_import_boson_or_transformers():
    code = ("import sys, higgs_diag; from higgs_diag.config import ReplayOptions; "
            "d = higgs_diag.replay_batch(sys.argv[1], [sys.argv[2]], options=ReplayOptions(no_model=True)); "
            "bad = [m for m in ('boson_multimodal', 'transformers', 'peft') if m in sys.modules]; "
            "print(d.findings[0].code, bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt("audio-over-masked")), str(dumps("audio-over-masked"))],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "HD804" in r.stdout, r.stdout + r.stderr


def test_replayed_audio_loss_is_the_trainers_dual_loss():
    """The replay's per-batch audio/text CE are higgs_diag.losses.dual_loss on the same forward."""
    from higgs_diag.batch import load_batch
    from higgs_diag.losses import higgs_audio_loss
    from higgs_diag.replay.checkpoint import inspect_checkpoint
    from higgs_diag.replay.measure import measure
    from higgs_diag.replay.model import load_model

    insp = inspect_checkpoint(ckpt("healthy"))
    model, dev, dt = load_model(insp, insp.source.config, insp.source.config_from, "cpu", "float32")
    batch, _ = load_batch(dumps("healthy") / "step-000200.pt")
    rec = measure(model, batch, dev, dt, "b")
    with torch.no_grad():
        ref = higgs_audio_loss(model(**batch), batch["label_audio_ids"])
    assert rec.audio_ce == pytest.approx(float(ref.audio_loss), rel=1e-5)
    assert rec.text_ce == pytest.approx(float(ref.text_loss), rel=1e-5)
    assert rec.n_audio == ref.n_audio_targets and rec.n_text == ref.n_text_targets


@pytest.mark.parametrize("scenario, code", [("audio-labels-unshifted", "HD801"), ("audio-labels-are-inputs", "HD802"),
                                            ("audio-out-missing", "HD803"), ("audio-over-masked", "HD804")])
def test_cli_replay_batch_json_and_exit_code(scenario, code):
    run_dir = REPLAY / scenario
    before = tree_digest(run_dir)
    r = runner().invoke(main, ["replay-batch", str(ckpt(scenario)), str(dumps(scenario)), "--format", "json"])
    assert r.exit_code == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "higgs-diag.report/1" and doc["findings"][0]["code"] == code
    assert tree_digest(run_dir) == before  # the run directory and checkpoint are never modified


def test_cli_healthy_exit_0_and_reports_written(tmp_path):
    out = tmp_path / "rep"
    r = runner().invoke(main, ["replay-batch", str(ckpt("healthy")), str(dumps("healthy") / "step-000200.pt"),
                               "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "HD800" in r.stdout and (out / "report.json").is_file() and (out / "report.html").is_file()


@pytest.mark.parametrize("scenario, code, log_code", [("audio-labels-unshifted", "HD801", "HD201"),
                                                       ("audio-labels-are-inputs", "HD802", None),
                                                       ("audio-out-missing", "HD803", "HD202"),
                                                       ("audio-over-masked", "HD804", "HD203")])
def test_analyze_replay_merges_and_the_replay_leads(scenario, code, log_code):
    r = runner().invoke(main, ["analyze", str(REPLAY / scenario), "--replay", "--format", "json"])
    assert r.exit_code == 1, r.stderr
    doc = json.loads(r.stdout)
    codes = [f["code"] for f in doc["findings"]]
    assert codes[0] == code, codes
    if log_code:  # what the logs show is explained by the replayed cause
        f = next(f for f in doc["findings"] if f["code"] == log_code)
        assert f["caused_by"] == code
    assert doc["summary"]["replay"]["n_batches"] >= 2 and doc["summary"]["steps"]


def test_analyze_replay_with_named_batches_and_checkpoint():
    r = runner().invoke(main, ["analyze", str(REPLAY / "audio-out-missing"), "--batches",
                               str(REPLAY / "audio-out-missing" / "user-dumps"), "--checkpoint",
                               str(ckpt("audio-out-missing")), "--format", "json"])
    doc = json.loads(r.stdout)
    assert doc["findings"][0]["code"] == "HD803" and doc["summary"]["replay"]["n_batches"] == 1


def test_analyze_without_replay_stays_unchanged():
    r = runner().invoke(main, ["analyze", str(REPLAY / "audio-labels-are-inputs"), "--format", "json"])
    doc = json.loads(r.stdout)
    assert "replay" not in doc["summary"] and not any(f["code"].startswith("HD8") for f in doc["findings"])


def test_nan_weights_are_named(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    ck = tmp_path / "checkpoint-200"
    shutil.copytree(ckpt("healthy"), ck)
    sd = load_file(str(ck / "model.safetensors"))
    sd["layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    diag = higgs_diag.replay_batch(ck, [dumps("healthy") / "step-000200.pt"])
    assert diag.findings[0].code == "HD807" and "NaN/Inf" in diag.findings[0].title


# ---- the remaining replay checks, each on batches a real (buggy) collator or trainer produced -------------
sys.path.insert(0, str(ROOT / "fixtures"))
import make_runs as M  # noqa: E402

from higgs_diag.batch import save_batch  # noqa: E402


def _dump(tmp_path, name, batch, meta=None):
    return save_batch(tmp_path / name, batch, meta)


def test_delay_pattern_mismatch_hd806(tmp_path):
    """A collator built with use_delay_pattern=False for a model configured with the delay pattern."""
    p = _dump(tmp_path, "b.pt", M.collate(M.make_samples(4, 3), use_delay_pattern=False))
    diag = higgs_diag.replay_batch(ckpt("healthy"), [p], options=ReplayOptions(no_model=True))
    assert [f.code for f in diag.findings if f.severity.name != "INFO"][:1] == ["HD806"]
    assert not higgs_diag.replay_batch(ckpt("healthy"), [dumps("healthy")], options=ReplayOptions(no_model=True)).by_code("HD806")


def test_unmasked_segment_bos_hd809(tmp_path):
    """A collator that trains the stream BOS: labels [BOS, codes, EOS] instead of [-100, codes, EOS]."""
    b = M.collate(M.make_samples(4, 3))
    b["label_audio_ids"][:, b["audio_out_ids_start"]] = M.STREAM_BOS  # what that collator writes
    diag = higgs_diag.replay_batch(ckpt("healthy"), [_dump(tmp_path, "b.pt", b)], options=ReplayOptions(no_model=True))
    hd809 = diag.by_code("HD809")
    assert hd809 and hd809[0].severity.name == "WARNING"
    assert not higgs_diag.replay_batch(ckpt("healthy"), [dumps("healthy")], options=ReplayOptions(no_model=True)).by_code("HD809")


def test_logged_loss_of_another_formula_hd808(tmp_path):
    """A trainer that sums the per-codebook audio losses instead of averaging them: its logged audio_loss
    (computed here with that formula on the checkpoint's own numbers) matches neither replayed loss."""
    from higgs_diag.batch import load_batch

    batch_file = dumps("healthy") / "step-000200.pt"
    from higgs_diag.replay.api import measure

    ev = measure(ckpt("healthy"), [batch_file])
    per_cb = ev.batches[0].model.audio_ce_per_cb
    tensors, meta = load_batch(batch_file)
    summed = float(sum(per_cb))
    p = _dump(tmp_path, "step-000200.pt", tensors, {"step": 200, "losses": {"audio_loss": summed}})
    diag = higgs_diag.replay_batch(ckpt("healthy"), [p])
    hd808 = diag.by_code("HD808")
    assert hd808 and f"{summed:.4g}"[:4] in hd808[0].evidence[0]
    assert not higgs_diag.replay_batch(ckpt("healthy"), [batch_file]).by_code("HD808")
