"""Console logs as a first-class source (higgs_diag/run/console.py's table, run/logs.py's reader) and the rules
about how a run ended (HD010 stopped early, HD011 batch object, HD012 PEFT `labels`; HD004/HD005/HD104/HD702).

Real logs: the committed fixtures (fixtures/runs, fixtures/replay, fixtures/community: a real HF Trainer with
tqdm on, real tracebacks) and two crashes produced here by the real Trainer on the tiny HiggsAudioModel
(`_CRASH_SCRIPT`). Hand-written logs only where a layout is needed that no fixture has (gradient
accumulation, two ranks, a FIFO, a cut segment), modelled on the real ones.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import higgs_diag
from higgs_diag.checks import load_all
from higgs_diag.diagnosis import Severity
from higgs_diag.run import console as C
from higgs_diag.run import logs as L
from higgs_diag.run.discover import RunReadError
from higgs_diag.run.load import load_run
from higgs_diag.run.model import Run, SCALAR_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "fixtures" / "runs"
REPLAY = ROOT / "fixtures" / "replay"
COMMUNITY = ROOT / "fixtures" / "community"
NEW = ("HD010", "HD011", "HD012")

load_all()


def community(name: str) -> Path:
    p = COMMUNITY / name
    if not (p / "train.log").is_file():
        pytest.skip(f"{p} not generated yet (python fixtures/make_community_runs.py --only {name})")
    return p


def codes(diag) -> list[str]:
    return [f.code for f in diag.findings]


def points(res, metric) -> dict[int, float]:
    return {int(s): v for s, m, v in zip(res.steps, res.metrics, res.values) if m == metric}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


# ---- the format table --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", C.FORMATS, ids=[f.name for f in C.FORMATS])
def test_every_format_reads_its_example(fmt):
    ex = fmt.example.lstrip("\r")
    assert fmt.pattern.search(ex), fmt.name
    if fmt.kind not in ("progress", "rank", "exception"):
        assert C.QUICK.search(ex), f"{fmt.name}: the reader's quick filter would skip its example"


def test_component_examples_give_their_canonical_metric():
    assert C.component(C.BY_NAME["codebook-loss"].example) == ("audio_loss_cb3", 2.8644)
    assert C.component(C.BY_NAME["audio-loss"].example) == ("audio_loss", 2.8953)
    assert C.component(C.BY_NAME["llm-loss"].example) == ("text_loss", 4.0558)
    assert C.component("Audio loss computation: num_audio_tokens=56, num_codebooks=4") is None
    assert C.parse_step_losses("Text=3.1004, Audio=2.7012, Total=5.8016") == {
        "text_loss": 3.1004, "audio_loss": 2.7012, "loss": 5.8016}
    m = C.VAL_LOSS.search(C.BY_NAME["val-loss"].example)
    assert m.group(1) == "25" and float(m.group(2)) == 5.912


def test_values_as_printed():
    assert C.parse_value("2.31") == 2.31 and C.parse_value("4.9e-05") == 4.9e-05
    assert np.isnan(C.parse_value("nan")) and C.parse_value("inf") == np.inf and C.parse_value("-inf") == -np.inf
    assert C.parse_value("np.float64(0.5)") == 0.5 and C.parse_value("numpy.float32(1.5)") == 1.5
    assert C.parse_value("tensor(2.3)") == 2.3
    assert C.parse_value("tensor(2.3, device='cuda:0', grad_fn=<AddBackward0>)") == 2.3
    assert C.parse_value("'cosine'") is None and C.parse_value("[1, 2]") is None
    d = C.parse_log_dict("{'loss': nan, 'grad_norm': inf, 'learning_rate': np.float64(4.9e-05), "
                         "'audio_loss': tensor(2.3, device='cuda:0'), 'note': 'x', 'epoch': 0.12}")
    assert set(d) == {"loss", "grad_norm", "learning_rate", "audio_loss", "epoch"}
    assert np.isnan(d["loss"]) and d["grad_norm"] == np.inf and d["audio_loss"] == 2.3
    assert C.parse_log_dict("{'learning_rate': 5e-05, 'batch_size': 4}") is None  # a config print, no epoch


def test_markdown_table_has_one_row_per_format():
    rows = C.markdown_table().splitlines()
    assert len(rows) == 2 + len(C.FORMATS)
    assert all(f"`{f.name}`" in C.markdown_table() for f in C.FORMATS)


# ---- streaming ----------------------------------------------------------------------------------------------
def test_segments_split_carriage_returns_across_chunks(monkeypatch):
    monkeypatch.setattr(L, "CHUNK", 7)
    data = b"a\r\nbb\rccc\r\rdddd\neeeee"
    got = list(L.segments(io.BytesIO(data)))
    assert [(n, first, seg) for n, first, seg, cut in got] == [
        (1, True, b"a"), (2, True, b"bb"), (2, False, b"ccc"), (2, False, b""), (2, False, b"dddd"),
        (3, True, b"eeeee")]


def test_a_segment_longer_than_the_cap_is_cut_and_reading_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "CHUNK", 4096)
    log = write(tmp_path / "train.log", "x" * 200_000 + "\r  6%|▌         | 10/168 [00:00<00:01, 89.07it/s]"
                "\r{'loss': 6.8009, 'grad_norm': 3.9, 'learning_rate': 0.001, 'epoch': 0.12}\n"
                "\r  6%|▌         | 10/168 [00:00<00:01, 89.07it/s]\n")
    res = L.read_console(log)
    assert res.info.cut_segments == 1
    assert points(res, "loss") == {10: 6.8009}


def test_one_line_of_many_bar_updates_streams(tmp_path):
    n = 60_000  # tqdm writes every update on one line when nothing else is printed: ~4 MB without a newline
    text = "".join(f"\r {i * 100 // n:2d}%|█▏        | {i}/{n} [00:03<00:21,  6.80it/s]" for i in range(n))
    res = L.read_console(write(tmp_path / "train.log", text))
    assert res.info.lines == 1 and res.info.last_step == n - 1 and res.info.max_steps == n


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "train.log"
    os.mkfifo(fifo)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("res", L.read_console(fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    (p,) = out["res"].problems
    assert p.fatal and p.message.startswith("a FIFO (named pipe), not a regular file")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 2, "log_history": [
        {"loss": 1.0, "step": 1}, {"loss": 0.9, "step": 2}]}))
    t = threading.Thread(target=lambda: out.setdefault("diag", higgs_diag.analyze(tmp_path)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "analyze blocked on a FIFO"
    assert any(f.code == "HD001" and "train.log" in f.title for f in out["diag"].findings)  # discover refused it


def test_a_log_over_the_size_limit_is_skipped_with_a_problem(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(RUNS / "crashed" / "train.log", run / "train.log")
    monkeypatch.setattr(C, "MAX_LOG_BYTES", 1000)
    with pytest.raises(RunReadError, match="limit for a console log"):  # nothing else in the folder
        load_run(run)
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": [{"loss": 1.0, "step": 1}]}))
    diag = higgs_diag.analyze(run)
    hd001 = [f for f in diag.findings if f.code == "HD001"]
    assert hd001 and any("MAX_LOG_BYTES" in e for e in hd001[0].evidence)


# ---- steps of printed values on real tqdm logs ---------------------------------------------------------------
def test_components_take_the_step_the_bar_reaches_next_and_skip_evaluation():
    """Real log: LoRA community run, loss components printed at every forward, tqdm on, eval every 50 steps."""
    run_dir = REPLAY / "labels-are-inputs-unshifted-lora"
    res = L.read_console(run_dir / "train.log")
    text = points(res, "text_loss")
    assert sorted(text) == list(range(1, 151))  # one value per step, none invented by the 3 x 4 eval forwards
    assert text[1] == 4.0558  # the forward printed after `0/150`, before the bar reached 1
    assert text[51] == 3.5273  # after the evaluation at step 50 (its forwards printed 3.5265, 3.5263, ...)
    assert points(res, "audio_loss_cb3")[1] == 2.8644
    state = json.loads((run_dir / "checkpoint-150" / "trainer_state.json").read_text())
    logged = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert points(res, "loss") == logged  # the printed dicts land on the steps the Trainer logged them at
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert points(res, "eval_loss") == evals
    run = load_run(run_dir)
    src = run.scalars.groupby("metric", observed=True)["source"].agg(lambda s: set(s))
    assert src["audio_loss"] == {"console"}  # only the console has the components
    assert run.series("audio_loss").index.tolist() == list(range(1, 151))
    assert run.series("loss").to_dict() == logged  # same points in three sources: the state file is read


def test_throttled_bar_places_dicts_on_the_step_tqdm_redraws_after_them():
    """Real log: the bar is drawn at 9/168 (tqdm redraws at most every 0.1 s), then the step-10 dict, then 10/168."""
    res = L.read_console(community("eval-crash-batch-object") / "train.log")
    assert points(res, "loss") == {10: 6.8009, 20: 6.1325}
    assert res.info.last_step == 20 and res.info.max_steps == 168


def test_fast_run_components_land_on_drawn_steps_only():
    run_dir = community("total-loss-console-collapse")
    res = L.read_console(run_dir / "train.log")
    audio = points(res, "audio_loss")
    steps = sorted(audio)
    assert steps[-1] == 400 and all(0 < s <= 400 for s in steps)
    assert len(audio) < 400  # tqdm skipped drawing many steps: no value is invented for them
    logged = {}
    for p in run_dir.glob("checkpoint-*/trainer_state.json"):
        logged.update({e["step"]: e["loss"] for e in json.loads(p.read_text())["log_history"] if "loss" in e})
    assert points(res, "loss") == logged
    assert res.info.completed


def test_gradient_accumulation_is_averaged_per_step(tmp_path):
    """Modelled on the real log's layout: forwards print, then the bar moves; with 2 forwards per step."""
    bar = "\r{p:3d}%|█         | {n}/4 [00:01<00:01,  2.00it/s]"
    fw = "LLM loss computed: {t}\nAudio loss computed: {a}\n"
    log = (bar.format(p=0, n=0) + fw.format(t=4.0, a=3.0) + fw.format(t=2.0, a=1.0)
           + bar.format(p=25, n=1) + fw.format(t=1.0, a=1.0) + fw.format(t=3.0, a=3.0)
           + fw.format(t=10.0, a=10.0) + fw.format(t=20.0, a=20.0)
           + bar.format(p=75, n=3)  # tqdm did not draw step 2: 4 forwards, 2 steps -> the last 2 are step 3's
           + "\r" + " " * 40 + "\r{'loss': 15.5, 'grad_norm': 1.0, 'learning_rate': 0.1, 'epoch': 0.75}\n"
           + bar.format(p=75, n=3) + fw.format(t=7.0, a=7.0))  # step 4 never completed: no value
    res = L.read_console(write(tmp_path / "train.log", log))
    assert points(res, "text_loss") == {1: 3.0, 3: 15.0}
    assert points(res, "audio_loss") == {1: 2.0, 3: 15.0}
    assert points(res, "loss") == {3: 15.5}
    assert res.info.last_step == 3 and not res.info.completed


def test_ranks_are_never_mixed(tmp_path):
    lines = ["[rank0]:\r  0%|          | 0/2 [00:00<?, ?it/s]"]  # the Trainer draws its bar before any forward
    for step in (1, 2):
        for rank, base in ((0, 1.0), (1, 5.0)):
            lines.append(f"[rank{rank}]:LLM loss computed: {base + step}")
            lines.append(f"[rank{rank}]:Codebook 0 loss: {base + step + 0.5}")
        lines.append(f"[rank0]:\r{step * 50:3d}%|█████     | {step}/2 [00:01<00:01,  1.00it/s]")
    lines += ["[rank1]:Traceback (most recent call last):", "[rank0]:LLM loss computed: 9.0",
              '[rank1]:  File "train.py", line 3, in <module>', "[rank1]:RuntimeError: NCCL timeout"]
    res = L.read_console(write(tmp_path / "train.log", "\n".join(lines) + "\n"))
    assert points(res, "text_loss") == {1: 2.0, 2: 3.0}  # rank 0's values, rank 1's (6.0, 7.0) left out
    assert points(res, "audio_loss_cb0") == {1: 2.5, 2: 3.5}
    (tb,) = [e for e in res.events if e.kind == "traceback"]
    assert tb.rank == 1 and tb.text == "RuntimeError: NCCL timeout"
    assert res.info.ranks == (0, 1) and res.info.last_line.startswith("[rank1]: RuntimeError")
    torchrun = "\n".join(line.replace("[rank", "[default") for line in lines) + "\n"
    assert points(L.read_console(write(tmp_path / "b.log", torchrun)), "text_loss") == {1: 2.0, 2: 3.0}


def test_interleaved_ranks_fixture_keeps_rank0():
    """Real torchrun --tee log: `[default0]:`/`[default1]:` prefixes, rank 1's lines appended after rank 0's bar."""
    run_dir = community("interleaved-ranks")
    res = L.read_console(run_dir / "train.log")
    assert res.info.ranks == (0, 1) and res.info.max_steps == 20 and res.info.last_step == 20 and res.info.completed
    raw = (run_dir / "train.log").read_text(errors="replace")
    printed = {r: [float(v) for v in re.findall(rf"\[default{r}\]:LLM loss computed: ([\d.]+)", raw)] for r in (0, 1)}
    text = points(res, "text_loss")
    assert text[1] == printed[0][0] != printed[1][0]  # step 1 is rank 0's first forward, not rank 1's
    assert not set(text.values()) & (set(printed[1]) - set(printed[0]))
    state = json.loads((run_dir / "checkpoint-20" / "trainer_state.json").read_text())
    logged = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    loss = points(res, "loss")  # stdout and stderr are tailed separately: a dict's step may lag by a step
    assert sorted(loss.values(), reverse=True) == sorted(logged.values(), reverse=True)
    assert all(min(abs(s - t) for t in logged) <= 1 for s in loss)
    assert load_run(run_dir).series("loss").to_dict() == logged  # on equal counts the state file is read


def test_custom_loop_step_lines(tmp_path):
    run_dir = community("custom-loop-console-only")
    res = L.read_console(run_dir / "train.log")
    loss = points(res, "loss")
    assert loss and all(s % 10 == 0 for s in loss)
    assert all(s % 25 == 0 for s in points(res, "eval_loss"))
    assert res.info.max_steps is None  # its tqdm bars ("Epoch 1/3: ...") count micro-batches, not steps


# ---- a folder with only a console log -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["custom-loop-console-only", "total-loss-console-collapse"])
def test_a_console_log_alone_is_analyzable(tmp_path, name):
    shutil.copy(community(name) / "train.log", tmp_path / "train.log")
    run = load_run(tmp_path)
    assert set(run.scalars["source"].astype(str)) == {"console"} and run.has("loss")
    diag = higgs_diag.analyze(tmp_path)
    assert not set(NEW) & set(codes(diag))  # both ended normally (the custom loop prints no summary: no max_steps)
    if name == "total-loss-console-collapse":  # the same rules judge console series: the copy-task collapse
        assert "HD204" in codes(diag)


def test_series_prefers_files_over_the_console_on_ties():
    rows = []
    for src, v in (("console", 1.0), ("tensorboard", 2.0), ("trainer_state", 3.0)):
        rows += [(s, "loss", v, src, np.nan, f"{src}.x", 0) for s in (1, 2)]
    run = Run(root=".", scalars=pd.DataFrame(rows, columns=SCALAR_COLUMNS))
    assert run.series("loss").tolist() == [3.0, 3.0]
    run = Run(root=".", scalars=pd.DataFrame([r for r in rows if r[3] != "trainer_state"], columns=SCALAR_COLUMNS))
    assert run.series("loss").tolist() == [2.0, 2.0]
    more = rows + [(3, "loss", 1.0, "console", np.nan, "console.x", 0)]
    assert Run(root=".", scalars=pd.DataFrame(more, columns=SCALAR_COLUMNS)).series("loss").tolist() == [1.0] * 3


# ---- the early-stop rule and the crashes with a rule of their own -----------------------------------------------
def test_sigterm_run_is_stopped_early_not_healthy():
    diag = higgs_diag.analyze(community("sigterm-midrun"))
    assert diag.verdict != "healthy"
    (f,) = diag.by_code("HD010")
    assert f.severity == Severity.WARNING and f.title.startswith("Training stopped early at step 129 of 768")
    ev = " ".join(f.evidence)
    assert "129/768" in ev and "no exception" in ev and "checkpoint-100" in ev
    assert "HD004" not in codes(diag)


@pytest.mark.parametrize("scenario,cause", [("crashed", "HD004"), ("eval-loss-missing", "HD102"),
                                            ("resume-unpickling", "HD702"), ("no-loss-returned", "HD104")])
def test_a_crash_is_an_early_stop_explained_by_its_own_rule(scenario, cause):
    diag = higgs_diag.analyze(RUNS / scenario)
    (f,) = diag.by_code("HD010")
    assert f.severity == Severity.CRITICAL and f.caused_by == cause
    assert any(e.startswith("exception:") for e in f.evidence)
    assert diag.findings[0].code != "HD010"  # the cause leads the report


def test_resumed_crash_is_history_once_a_later_session_completed():
    diag = higgs_diag.analyze(RUNS / "resumed")
    assert "HD005" in codes(diag) and not set(NEW) & set(codes(diag))


@pytest.mark.parametrize("path", [RUNS / "healthy", RUNS / "healthy-lora", REPLAY / "healthy-steps",
                                  REPLAY / "healthy-resumed", REPLAY / "labels-are-inputs-unshifted-lora"])
def test_runs_that_finished_are_quiet(path):
    diag = higgs_diag.analyze(path)
    assert not {"HD004", *NEW} & set(codes(diag))


def test_batch_object_without_get_fixture():
    diag = higgs_diag.analyze(community("eval-crash-batch-object"))
    assert codes(diag)[0] == "HD011" and "HD004" not in codes(diag)
    f = diag.by_code("HD011")[0]
    assert "ExtendedHiggsAudioBatchInput" in f.title and any("prediction_step" in e for e in f.evidence)
    assert diag.by_code("HD010")[0].caused_by == "HD011"


# ---- crashes produced here by the real Trainer ------------------------------------------------------------------
_CRASH_SCRIPT = r'''
import sys
from dataclasses import make_dataclass
from pathlib import Path
root, scenario, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
sys.path[:0] = [str(root / "fixtures"), str(root)]
import torch
import torch.distributed.tensor  # noqa: F401  (peft on this CPU torch build)
import make_runs as M
from transformers import Trainer, TrainingArguments
from higgs_diag.losses import higgs_audio_loss
torch.set_num_threads(1)
torch.manual_seed(M.SEED)
train, evald = M.data(n_train=64, n_eval=8)
args = TrainingArguments(output_dir=str(out), report_to=[], logging_steps=2, per_device_train_batch_size=4,
                         per_device_eval_batch_size=4, max_steps=12, eval_strategy="steps", eval_steps=6,
                         save_strategy="no", use_cpu=True, disable_tqdm=False, dataloader_num_workers=0,
                         remove_unused_columns=False, learning_rate=1e-3)

class LossTrainer(Trainer):  # computes the shifted loss on the base model (training works)
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        batch = inputs if isinstance(inputs, dict) else vars(inputs)
        outputs = base(**batch)
        loss = higgs_audio_loss(outputs, batch["label_audio_ids"]).loss
        return (loss, outputs) if return_outputs else loss

collate = M.collate
if scenario == "peft-labels":  # LoRA with task_type CAUSAL_LM: the evaluation calls the PEFT model
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(M.tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
else:  # the collator returns a dataclass like boson's HiggsAudioBatchInput
    model = M.tiny_model()
    def collate(samples):
        d = M.collate(samples)
        return make_dataclass("HiggsAudioBatchInput", list(d))(**d)
LossTrainer(model=model, args=args, train_dataset=train, eval_dataset=evald, data_collator=collate).train()
'''


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory):
    """Real console logs of two crashes (python's own traceback, tqdm on), like `python train.py > train.log 2>&1`."""
    base = tmp_path_factory.mktemp("crashes")
    script = base / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = {}
    for name in ("peft-labels", "batch-dataclass"):
        (base / name).mkdir()
        log = open(base / name / "train.log", "wb")
        procs[name] = (subprocess.Popen([sys.executable, str(script), str(ROOT), name, str(base / name / "out")],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base), log)
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=600)
        log.close()
        assert code != 0, f"{name}: the training was expected to crash; see {base / name / 'train.log'}"
        shutil.rmtree(base / name / "out", ignore_errors=True)
    return base


def test_peft_causal_lm_labels(crash_runs):
    diag = higgs_diag.analyze(crash_runs / "peft-labels")
    assert codes(diag)[0] == "HD012" and "HD004" not in codes(diag)
    f = diag.by_code("HD012")[0]
    assert any("unexpected keyword argument 'labels'" in e for e in f.evidence)
    assert any("peft" in e and "prediction_step" in e for e in f.evidence)
    stop = diag.by_code("HD010")[0]
    assert stop.caused_by == "HD012" and stop.title.startswith("Training stopped early at step 6 of 12")


def test_batch_dataclass_without_len(crash_runs):
    diag = higgs_diag.analyze(crash_runs / "batch-dataclass")
    assert codes(diag)[0] == "HD011"
    f = diag.by_code("HD011")[0]
    assert "`HiggsAudioBatchInput`" in f.title and "len(inputs)" in f.title
    assert any("_prepare_inputs" in e for e in f.evidence)
    assert diag.by_code("HD010")[0].caused_by == "HD011"
