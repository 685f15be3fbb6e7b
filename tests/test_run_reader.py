"""The run reader: trainer_state.json quirks users really have, discovery, console logs, the real corpus."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from higgs_diag.run.discover import RunReadError, discover
from higgs_diag.run.load import canonical_tag, load_run
from higgs_diag.run.logs import read_log
from higgs_diag.run.trainer_state import read_trainer_state

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def write_state(path: Path, history, **extra) -> Path:
    data = {"global_step": extra.pop("global_step", 10), "max_steps": 10, "logging_steps": 1,
            "log_history": history, **extra}
    path.write_text(json.dumps(data))
    return path


def test_nan_infinity_literals_and_strings_are_kept(tmp_path):
    p = tmp_path / "trainer_state.json"
    p.write_text('{"global_step": 3, "log_history": ['
                 '{"loss": NaN, "grad_norm": Infinity, "learning_rate": "1e-05", "epoch": 0.1, "step": 1},'
                 '{"loss": 2.5, "grad_norm": -Infinity, "lr": 2e-5, "epoch": 0.2, "step": 2},'
                 '{"loss": "oops", "step": 3}]}')
    res = read_trainer_state(p)
    got = list(zip(res.steps, res.metrics, res.values))
    loss1 = [v for s, m, v in got if m == "loss" and s == 1][0]
    assert math.isnan(loss1)
    assert [v for s, m, v in got if m == "grad_norm"] == [math.inf, -math.inf]
    assert [v for s, m, v in got if m == "learning_rate"] == [1e-5, 2e-5]  # string and `lr` alias
    assert res.non_numeric == 1  # "oops" is not a number and is not invented into one
    assert [p.kind for p in res.problems] == ["non-numeric"]  # ... and it is said, not dropped silently
    assert res.info.global_step == 3


def test_entries_without_step_and_several_eval_sets(tmp_path):
    hist = [{"loss": 1.0, "step": 5},
            {"eval_a_loss": 0.5, "eval_a_runtime": 1.0, "step": 5},
            {"eval_b_loss": 0.7, "eval_b_runtime": 1.0, "step": 5},
            {"predict_loss": 0.9}]
    res = read_trainer_state(write_state(tmp_path / "trainer_state.json", hist))
    assert res.info.entries_without_step == 1
    metrics = list(res.metrics)
    assert ("predict_loss" in metrics) and res.steps[metrics.index("predict_loss")] == 5
    at5 = {m for s, m in zip(res.steps, res.metrics) if s == 5}
    assert {"eval_a_loss", "eval_b_loss", "eval_a_runtime", "eval_b_runtime"} <= at5  # both eval sets kept


def test_lfs_pointer_and_non_state_and_empty(tmp_path):
    lfs = tmp_path / "a.json"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12965\n")
    r = read_trainer_state(lfs)
    assert r.info is None and r.problems[0].kind == "lfs-pointer" and "12965" in r.problems[0].message
    other = tmp_path / "b.json"
    other.write_text('{"best_metric": {"f1": 1}}')
    assert read_trainer_state(other).problems[0].kind == "not-trainer-state"
    empty = write_state(tmp_path / "c.json", [])
    r = read_trainer_state(empty)
    assert r.info is not None and r.problems[0].kind == "empty"


def test_cut_off_file_salvages_entries(tmp_path):
    hist = [{"loss": 3.0 - i * 0.1, "step": i + 1} for i in range(20)]
    full = json.dumps({"global_step": 20, "log_history": hist})
    p = tmp_path / "trainer_state.json"
    p.write_text(full[: full.index('"step": 15') + 3])
    res = read_trainer_state(p)
    assert res.problems[0].kind == "truncated" and res.problems[0].offset is not None
    assert res.info.global_step == 20
    assert sorted(set(res.steps)) == list(range(1, 15))  # every complete entry before the cut


def test_load_run_output_dir_merges_and_inventories(tmp_path):
    cp = tmp_path / "checkpoint-10"
    cp.mkdir()
    write_state(cp / "trainer_state.json", [{"loss": 1.0, "step": 10}], global_step=10)
    cp20 = tmp_path / "checkpoint-20"
    cp20.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "training_args.bin"):
        (cp20 / name).write_bytes(b"x")
    run = load_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [10, 20]
    assert not run.checkpoints[1].has_trainer_state and run.checkpoints[1].has_full_model
    assert any(f.endswith("training_args.bin") for f in run.other_files)
    assert run.series("loss").to_dict() == {10: 1.0}


def test_most_complete_state_wins(tmp_path):
    for step in (5, 10):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        write_state(d / "trainer_state.json", [{"loss": float(s), "step": s} for s in range(1, step + 1)],
                    global_step=step)
    run = load_run(tmp_path)
    assert run.state.global_step == 10 and len(run.series("loss")) == 10
    assert len(run.states) == 2


def test_missing_path_and_nothing_readable(tmp_path):
    with pytest.raises(RunReadError, match="no such file"):
        load_run(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(RunReadError, match="no trainer_state.json"):
        load_run(tmp_path)


def test_canonical_tags():
    assert canonical_tag("train/loss") == "loss"
    assert canonical_tag("eval/loss") == "eval_loss"
    assert canonical_tag("train/learning_rate") == "learning_rate"
    assert canonical_tag("eval/audio_loss_cb0") == "eval_audio_loss_cb0"
    assert canonical_tag("lr") == "learning_rate"
    assert canonical_tag("custom/thing") == "custom/thing"


def test_console_log_messages(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "step 1\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "KeyError: \"The `metric_for_best_model` training argument is set to 'eval_loss', which is not found in the "
        "evaluation metrics. The available evaluation metrics are: ['eval_runtime']\"\n"
        "early stopping required metric_for_best_model, but did not find eval_loss so early stopping is disabled\n"
        "_pickle.UnpicklingError: Weights only load failed. blah\n")
    events, problems = read_log(log)
    kinds = [e.kind for e in events]
    assert "metric-keyerror" in kinds and "early-stopping-disabled" in kinds and "rng-unpickling" in kinds
    assert "traceback" in kinds
    tb = [e for e in events if e.kind == "traceback"][0]
    assert tb.line == 2 and tb.text.startswith("KeyError")


def test_discover_single_files(tmp_path):
    p = write_state(tmp_path / "trainer_state.json", [{"loss": 1.0, "step": 1}])
    assert discover(p).trainer_states == [p]


CORPUS_STATES = sorted((CORPUS / "trainer_state").glob("*.json"))
CORPUS_TB = sorted(p for p in (CORPUS / "tensorboard").iterdir() if p.is_dir()) if CORPUS.exists() else []


@pytest.mark.skipif(not CORPUS.exists(), reason="shared corpus not present")
@pytest.mark.parametrize("path", CORPUS_STATES + CORPUS_TB, ids=lambda p: p.name[:60])
def test_corpus_reads_without_traceback(path):
    """Every real file reads; what cannot be read is one clear message naming the file."""
    try:
        run = load_run(path)
    except RunReadError as e:
        msg = str(e)
        assert "\n" not in msg and path.name in msg
        return
    assert run.files_read
    for p in run.problems:
        assert p.file and p.message


def test_hf_unknown_epochs_sentinel_is_not_damage(tmp_path):
    """transformers writes num_train_epochs = sys.maxsize when max_steps is set and the dataset has no length
    (four corpus files do): that is HF's sentinel, not an out-of-range value."""
    import json as _json

    import higgs_diag

    p = tmp_path / "trainer_state.json"
    p.write_text(_json.dumps({"global_step": 2, "max_steps": 2, "num_train_epochs": 9223372036854775807,
                              "log_history": [{"loss": 1.0, "step": 1}, {"loss": 0.9, "step": 2}]}))
    run = higgs_diag.load_run(p)
    assert run.problems == [] and run.state.num_train_epochs is None
