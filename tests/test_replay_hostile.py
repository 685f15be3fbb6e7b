"""Hostile and broken input to `higgs-diag replay-batch`: one line naming the file, exit 2, no traceback, nothing
executed, nothing written into the run."""
from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from higgs_diag.batch import load_batch, save_batch
from higgs_diag.cli import main
from _cli_util import runner  # tests/_cli_util.py

ROOT = Path(__file__).resolve().parents[1]
REPLAY = ROOT / "fixtures" / "replay"
CKPT = REPLAY / "healthy" / "checkpoint-200"
GOOD = REPLAY / "healthy" / "higgs-diag" / "batches" / "step-000200.pt"
MARKER = Path("/tmp/higgs_diag_replay_batch_pwned")


class Evil:
    def __reduce__(self):
        return (Path.touch, (MARKER,))




def good():
    return load_batch(GOOD)[0]


def _evil_pt(p):
    torch.save({"input_ids": torch.zeros(1, 2, dtype=torch.long), "x": Evil()}, p)


def _raw_pickle(p):
    p.write_bytes(pickle.dumps({"input_ids": Evil()}))


def _truncated(p):
    p.write_bytes(GOOD.read_bytes()[:300])


def _wrong_shapes(p):
    b = good()
    b["label_audio_ids"] = b["label_audio_ids"][:, :-5]
    save_batch(p, b)


def _ids_out_of_range(p):
    b = good()
    b["input_ids"][0, 0] = 10_000
    save_batch(p, b)


def _codes_out_of_range(p):
    b = good()
    b["audio_out_ids"][1, 3] = 99
    save_batch(p, b)


def _float_ids(p):
    b = good()
    b["input_ids"] = b["input_ids"].float()
    save_batch(p, b)


def _bad_starts(p):
    b = good()
    b["audio_out_ids_start"] = b["audio_out_ids_start"].flip(0)
    save_batch(p, b)


def _segment_count(p):
    b = good()
    b["input_ids"] = torch.where(b["input_ids"] == 60, torch.zeros_like(b["input_ids"]), b["input_ids"])
    save_batch(p, b)


def _not_a_batch(p):
    torch.save({"weights": torch.zeros(3)}, p)


def _garbage_safetensors(p):
    p.write_bytes(b"\x00" * 64)


CASES = [
    ("evil.pt", _evil_pt, "pickled Python objects"),
    ("raw.pt", _raw_pickle, "raw.pt"),
    ("cut.pt", _truncated, "truncated or damaged torch.save archive"),
    ("text.pt", lambda p: p.write_text("hello"), "not a torch.save file (neither a zip archive nor a pickle"),
    ("shapes.pt", _wrong_shapes, "label_audio_ids: shape"),
    ("ids.pt", _ids_out_of_range, "input_ids: holds 1 ids outside"),
    ("codes.pt", _codes_out_of_range, "audio_out_ids: holds 1 codes outside"),
    ("float.pt", _float_ids, "input_ids: must be a 2-D integer tensor"),
    ("starts.pt", _bad_starts, "audio_out_ids_start"),
    ("segments.pt", _segment_count, "<|AUDIO_OUT|> tokens"),
    ("other.pt", _not_a_batch, "none of its tensors is named like a Higgs Audio batch field"),
    ("junk.safetensors", _garbage_safetensors, "not a readable safetensors file"),
]


@pytest.mark.parametrize("name, make, message", CASES, ids=[c[0] for c in CASES])
def test_bad_batch_is_one_line_exit_2_and_runs_nothing(tmp_path, name, make, message):
    MARKER.unlink(missing_ok=True)
    p = tmp_path / name
    make(p)
    for extra in ([], ["--no-model"]):
        r = runner().invoke(main, ["replay-batch", str(CKPT), str(p), *extra])
        assert r.exit_code == 2, (r.stdout, r.stderr)
        assert r.stderr.startswith("higgs-diag: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert name in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr + r.stdout and r.stdout == ""
    assert not MARKER.exists()


@pytest.mark.parametrize("args, message", [
    (lambda t: [str(t / "nope"), str(GOOD)], "no such checkpoint folder"),
    (lambda t: [str(CKPT)], "no batch given"),
    (lambda t: [str(CKPT), str(t)], "no batch files"),
    (lambda t: [str(GOOD), str(GOOD)], "not a checkpoint folder"),
    (lambda t: [str(CKPT), str(t / "missing.pt")], "no such batch file"),
    (lambda t: [str(CKPT), str(GOOD), "--run", str(t / "norun")], "--run"),
    (lambda t: [str(CKPT), str(GOOD), "--device", "warp-drive"], "--device"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, args, message):
    r = runner().invoke(main, ["replay-batch", *args(tmp_path)])
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_config_json_is_one_line(tmp_path):
    ck = tmp_path / "checkpoint-1"
    shutil.copytree(CKPT, ck)
    (ck / "config.json").write_text("{not json")
    r = runner().invoke(main, ["replay-batch", str(ck), str(GOOD)])
    assert r.exit_code == 2 and "config.json: not valid JSON" in r.stderr, r.stderr


def test_analyze_replay_error_is_one_line(tmp_path):
    """No batches to replay: the log report still comes, with one line on stderr saying why no replay ran."""
    run = tmp_path / "run"
    shutil.copytree(REPLAY / "healthy", run)
    shutil.rmtree(run / "higgs-diag")
    r = runner().invoke(main, ["analyze", str(run), "--replay"])
    assert r.exit_code == 0 and "Verdict" in r.stdout
    assert r.stderr.count("\n") == 1 and "no batch files" in r.stderr and "--batches" in r.stderr, r.stderr


def test_real_process_stderr_is_one_line_for_a_raw_pickle(tmp_path):
    """Outside CliRunner too: torch's warnings about foreign pickles do not reach the terminal."""
    import subprocess

    MARKER.unlink(missing_ok=True)
    p = tmp_path / "raw.pt"
    _raw_pickle(p)
    r = subprocess.run([sys.executable, "-m", "higgs_diag.cli", "replay-batch", str(CKPT), str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "raw.pt" in r.stderr, r.stderr
    assert not MARKER.exists()
