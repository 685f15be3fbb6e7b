"""HiggsAudioTrainer under torchrun: two CPU processes (gloo) train, reduce their component losses and
counts across ranks, and process 0 writes one consistent set of metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import higgs_diag
from higgs_diag.batch import load_batch
from higgs_diag.losses import higgs_audio_loss

from _trainer_util import M

HERE = Path(__file__).resolve().parent
COMPONENTS = ("text_loss", "audio_loss", "audio_loss_cb0", "audio_loss_cb3", "n_text_targets", "n_audio_targets",
              "n_batches_no_audio_targets")


def _launch(out: Path) -> tuple[int, str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_train.py"), str(out)]
    # its own process group, so that a hang kills the launcher *and* both workers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return -9, stdout, "the torchrun run hung for 240 s\n" + stderr
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    # One relaunch if the launch itself fails (a rendezvous port race on a shared machine was seen once);
    # the assertions below run on one complete run either way.
    failures = []
    for attempt in range(2):
        out = tmp_path_factory.mktemp("ddp") / "run"
        code, stdout, stderr = _launch(out)
        if code == 0:
            break
        failures.append(f"attempt {attempt + 1}: exit {code}\n{stdout[-2000:]}\n{stderr[-5000:]}")
    else:
        pytest.fail("\n\n".join(failures))
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    return out, ranks


def test_two_ranks_train_and_log_identical_reduced_metrics(ddp_run):
    out, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["is_world_process_zero"] for r in ranks] == [True, False]
    logs = [[e for e in r["log_history"] if "loss" in e or "eval_loss" in e] for r in ranks]
    assert len(logs[0]) == 6 + 2
    for a, b in zip(*logs):  # every rank logged the same all-reduced components
        assert a["step"] == b["step"]
        for k in COMPONENTS:
            key = k if "loss" in a else f"eval_{k}"
            assert a[key] == b[key], (a["step"], key)


def test_rank_zero_writes_one_trainer_state_and_per_rank_rng_files(ddp_run):
    out, ranks = ddp_run
    ckpt = out / "checkpoint-6"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["log_history"] == ranks[0]["log_history"][:len(state["log_history"])]
    assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # TensorBoard from process 0 only
    run = higgs_diag.load_run(out)
    assert {"audio_loss", "eval_audio_loss", "eval_loss", "n_audio_targets"} <= set(run.metrics)


def test_only_rank_zero_writes_the_monitor_dump(ddp_run):
    out, _ranks = ddp_run
    dumps = sorted((out / "higgs-diag" / "batches").glob("*.pt"))
    assert [p.name for p in dumps] == ["step-000001.pt"]
    tensors, meta = load_batch(dumps[0])
    assert meta["step"] == 1 and "label_audio_ids" in tensors
    rank0 = load_batch(out / "batch-rank0.pt")[0]  # the dump is rank 0's batch, not rank 1's (which differs)
    assert torch.equal(tensors["input_ids"], rank0["input_ids"])


def test_step_one_losses_are_token_weighted_over_both_ranks(ddp_run):
    """Step 1's logged components equal the loss of one batch holding both ranks' batches (same initial weights)."""
    out, ranks = ddp_run
    batches = [load_batch(out / f"batch-rank{i}.pt")[0] for i in range(2)]
    model = M.tiny_model().eval()
    tot = {"text": [0.0, 0], "cb": [[0.0, 0] for _ in range(M.NUM_CODEBOOKS)]}
    with torch.no_grad():
        for b in batches:
            res = higgs_audio_loss(model(**b), b["label_audio_ids"])
            tot["text"][0] += float(res.text_loss) * res.n_text_targets
            tot["text"][1] += res.n_text_targets
            for k, (v, n) in enumerate(zip(res.codebook_losses.tolist(), res.n_audio_targets_per_codebook)):
                tot["cb"][k][0] += v * n
                tot["cb"][k][1] += n
    step1 = next(e for e in ranks[0]["log_history"] if e.get("step") == 1 and "loss" in e)
    cbs = [s / n for s, n in tot["cb"]]
    assert step1["text_loss"] == pytest.approx(tot["text"][0] / tot["text"][1], abs=2e-5)
    assert step1["audio_loss"] == pytest.approx(sum(cbs) / len(cbs), abs=2e-5)
    assert step1["n_audio_targets"] == sum(n for _, n in tot["cb"])
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])  # the ranks saw different data
