"""`higgs-diag replay-batch` under torchrun: the batch files are split across ranks (CPU, gloo here), the numbers
are gathered, rank 0 prints the same report a single process prints."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "fixtures" / "replay" / "audio-labels-unshifted"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_splits_batches_and_reports_once():
    args = ["replay-batch", str(SCENARIO / "checkpoint-600"), str(SCENARIO / "higgs-diag" / "batches"),
            "--format", "json", "--fail-on", "never", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "higgs_diag.cli", *args], capture_output=True, text=True, env=env)
    multi = subprocess.run([str(TORCHRUN if TORCHRUN.exists() else shutil.which("torchrun")), "--standalone",
                            "--nproc_per_node", "2", "-m", "higgs_diag.cli", *args],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-2000:]
    a, b = json.loads(single.stdout), json.loads(multi.stdout)  # one JSON document: only rank 0 printed
    assert b["summary"]["replay"]["world_size"] == 2 and a["summary"]["replay"]["world_size"] == 1
    assert [f["code"] for f in a["findings"]] == [f["code"] for f in b["findings"]] == ["HD801", "HD800"]
    pa = [x["path"] for x in a["summary"]["replay"]["batches"]]
    pb = [x["path"] for x in b["summary"]["replay"]["batches"]]
    assert pa == pb and len(pa) == 3
    ma, mb = a["summary"]["replay"]["model"], b["summary"]["replay"]["model"]
    for k in ("audio_ce", "audio_ce_unshifted", "text_ce", "audio_copy", "n_audio_per_cb"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-6), k
