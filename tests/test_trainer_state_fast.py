"""The state-file reader's fast path (msgspec, columnar flatten) and its chunked path (large files read in pieces)
give what the old reader gave (tests/_trainer_state_old.py, the reader before them, kept verbatim): the same steps,
metric names, values bit for bit (NaN and Inf included), fields and problems."""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from higgs_diag.run import state_columns, state_stream
from higgs_diag.run.trainer_state import read_trainer_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _trainer_state_old as old  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "trainer_state"
FILES = (sorted(CORPUS.glob("*.json")) + sorted((ROOT / "tests" / "fuzz_corpus" / "trainer_state").glob("*.json"))
         + sorted((ROOT / "fixtures").rglob("trainer_state.json")))
# a file too large to parse whole that is not a plain state is not read (documented in limits.py): these are
ODD_WHEN_HUGE = {"Mandar032004__QnA_Minor_Project__trainer_state.json",  # no log_history, only global_step
                 "Observer-18__nlp__trainer_state.json",  # LFS pointers
                 "hansung-prism-lab__industry-academia-2025-whisper-stt__output__trainer_state.json",
                 "deep-nesting.json", "deep-nesting-cut-off.json"}  # nesting over the limit


def key(r):
    return (repr(r.info), [p.__dict__ for p in r.problems], r.non_numeric, r.out_of_range,
            r.n_out_of_range, r.long_keys, np.asarray(r.steps, dtype=np.int64).tobytes(),
            [str(m) for m in r.metrics], np.asarray(r.values, dtype=np.float64).tobytes())


def same(path, **kw):
    a, b = key(old.read_trainer_state(path)), key(read_trainer_state(path, **kw))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, (path, i, str(x)[:400], str(y)[:400])


def chunked(path, chunk, whole_ok=False):
    return read_trainer_state(path, stream_above=0, chunk_bytes=chunk, whole_limit=10 ** 12 if whole_ok else 0)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.parent.name[:12] + "/" + p.stem[:40])
def test_fast_path_matches_old_reader(path):
    same(path)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.parent.name[:12] + "/" + p.stem[:40])
def test_chunked_path_matches_whole_file(path):
    whole = key(read_trainer_state(path))
    assert key(chunked(path, 300, whole_ok=True)) == whole  # not a plain state: parsed whole instead
    if path.name in ODD_WHEN_HUGE:
        r = chunked(path, 300)
        assert r.info is None and r.problems[0].fatal and r.problems[0].message.startswith("not read: ")
        return
    for chunk in (97, 4096):
        assert key(chunked(path, chunk)) == whole, chunk


def _history(rnd: random.Random, n: int, weird: bool, nulls: bool = False) -> list:
    """(``nulls``: null values, which the old reader turned into NaN points in key groups of 8+ entries.)"""
    hist = []
    null = [None] if nulls else []
    for i in range(n):
        if i % 50 == 49:
            e = {"epoch": i / 10, "eval_loss": rnd.choice([0.5, float("nan"), "0.25"] + null), "step": i}
        else:
            e = {"loss": rnd.random(), "grad_norm": rnd.choice([1.0, float("inf"), -float("inf"), float("nan")]),
                 "learning_rate": 1e-5, "epoch": i / 100, "step": i}
        if weird and rnd.random() < 0.05:
            e[rnd.choice(["loss", "step", "lr", "x"])] = rnd.choice(
                ["oops", "1e-3", True, [1, [2]], {"a": "NaN"}, 10 ** 40, -10 ** 29, 2 ** 70, 1e300, "Infinity",
                 "x" * 600, " 7 ", 5.5] + null)
        if weird and rnd.random() < 0.02:
            e.pop("step", None)
        if weird and rnd.random() < 0.01:
            e = rnd.choice([[1, 2], "text", 3, None])  # (a null entry is non-numeric in both readers)
        if weird and rnd.random() < 0.02 and isinstance(e, dict):
            e = dict(reversed(list(e.items())))  # same keys, another order
        hist.append(e)
    return hist


def _write(path: Path, hist, indent=2, **fields) -> Path:
    state = {"best_metric": fields.pop("best_metric", None), "global_step": len(hist), "log_history": hist,
             "max_steps": 10 ** 4, "logging_steps": 1, **fields}
    path.write_text(json.dumps(state, indent=indent))  # json.dumps writes NaN / Infinity / -Infinity literals
    return path


@pytest.mark.parametrize("seed", range(16))
def test_random_histories_fast_and_chunked(tmp_path, seed):
    rnd = random.Random(seed)
    nulls = seed >= 12  # the chunked path against the whole-file path only (see test_null_in_a_large_group...)
    p = _write(tmp_path / "trainer_state.json", _history(rnd, rnd.choice([5, 60, 700]), seed % 3 != 0, nulls),
               indent=rnd.choice([None, 2]), best_metric=rnd.choice([None, float("nan"), 0.5]),
               num_train_epochs=rnd.choice([3, float("inf")]))
    if not nulls:
        same(p)
    assert key(chunked(p, rnd.choice([64, 500, 3000]))) == key(read_trainer_state(p))


def test_nan_infinity_literals_and_look_alike_strings(tmp_path):
    hist = [{"loss": float("nan"), "grad_norm": float("inf"), "note": "NaN at step 1, Infinity", "step": 1},
            {"loss": -float("inf"), "grad_norm": 2.0, "note": 'say "NaN"', "step": 2}] * 20
    p = _write(tmp_path / "a.json", hist, best_metric=float("nan"))
    same(p)
    r = read_trainer_state(p)
    assert math.isnan(r.info.best_metric) and np.isnan(r.values[0]) and np.isposinf(r.values[1])
    assert key(chunked(p, 128)) == key(r)
    q = _write(tmp_path / "b.json", [{"loss": "NaN", "step": 1}, {"loss": float("nan"), "step": 2}],
               best_model_checkpoint="NaN")  # a real "NaN" string: the exact parser reads the file
    same(q)
    assert read_trainer_state(q).info.best_model_checkpoint == "NaN"


def test_quoting_only_outside_strings():
    raw = b'{"a": NaN, "b": "x NaN \\" Infinity", "c": [-Infinity, Infinity]}'
    data = state_columns.fast_loads(raw)
    assert math.isnan(data["a"]) and data["b"] == 'x NaN " Infinity' and data["c"] == ["-Infinity", "Infinity"]


def test_cut_off_files_salvage_the_same_entries_and_problem(tmp_path):
    rnd = random.Random(7)
    full = json.dumps({"global_step": 90, "log_history": _history(rnd, 90, weird=False), "max_steps": 90,
                       "logging_steps": 1, "stateful_callbacks": {"x": {"y": [1, 2]}}}, indent=2)
    body = full.index('"log_history"')
    for cut in sorted(rnd.sample(range(body, len(full)), 60)) + [len(full) - 1, len(full) - 30]:
        p = tmp_path / f"cut{cut}.json"
        p.write_text(full[:cut])
        same(p)
        expect = key(read_trainer_state(p))
        for chunk in (50, 700):
            assert key(chunked(p, chunk)) == expect, (cut, chunk)


def test_damaged_entry_in_the_middle(tmp_path):
    hist = [{"loss": 1.0 + i, "step": i} for i in range(200)]
    text = json.dumps({"global_step": 200, "log_history": hist, "max_steps": 200}, indent=2)
    at = text.index('"step": 120')
    p = tmp_path / "trainer_state.json"
    p.write_text(text[:at] + '"step": 12x0' + text[at + 11:])
    same(p)
    r = chunked(p, 256)
    assert key(r) == key(read_trainer_state(p)) and r.problems[0].kind == "truncated"
    assert "the 120 log_history entries before it were used" in r.problems[0].message


def test_escapes_and_brackets_in_strings_across_blocks(tmp_path):
    names = ['a\\"]},[{', "b\\\\", 'c"\\\\\\"[', "d]"]
    hist = [{"loss": float(i), "tag": names[i % 4] * (i % 7), f"k{names[i % 4]}": 1.0, "step": i} for i in range(150)]
    p = _write(tmp_path / "trainer_state.json", hist, best_model_checkpoint='out\\"[')
    same(p)
    for chunk in (1, 2, 3, 5, 64, 333):
        assert key(chunked(p, chunk)) == key(read_trainer_state(p)), chunk


def test_null_in_a_large_group_is_not_a_point(tmp_path):
    """The old reader turned null into a NaN point when the entry's key tuple had 8 or more entries (numpy's
    float conversion of None) and counted it as non-numeric otherwise: now always non-numeric."""
    for n in (5, 10):
        hist = [{"eval_loss": None if i == 3 else 0.5, "step": i} for i in range(n)]
        r = read_trainer_state(_write(tmp_path / f"{n}.json", hist))
        assert r.non_numeric == 1 and len(r.values) == n - 1 and not np.isnan(r.values).any()
        assert key(chunked(tmp_path / f"{n}.json", 64)) == key(r)


def test_big_integers_and_steps_as_old(tmp_path):
    hist = [{"loss": 10 ** 29 if i == 5 else 1.0, "x": 10 ** 30 if i == 6 else 2, "step": 2 ** 63 if i == 7 else i}
            for i in range(20)]
    p = _write(tmp_path / "trainer_state.json", hist, best_metric=10 ** 31)
    same(p)
    r = read_trainer_state(p)
    assert "x <a 31-digit integer>" in str(r.problems) and "best_metric <a 32-digit integer>" in str(r.problems)
    assert key(chunked(p, 100)) == key(r)


def test_large_file_is_read_in_pieces(tmp_path, monkeypatch):
    """Over the threshold the chunked reader runs (not the whole-file parse) and frees each piece."""
    hist = [{"loss": 1.0 / (i + 1), "step": i} for i in range(3000)]
    p = _write(tmp_path / "trainer_state.json", hist)
    calls = []
    real = state_stream._parse_piece
    monkeypatch.setattr(state_stream, "_parse_piece", lambda piece: calls.append(len(piece)) or real(piece))
    r = read_trainer_state(p, stream_above=1000, chunk_bytes=4096)
    assert len(calls) > 10 and max(calls) < 4096 + 200
    assert key(r) == key(old.read_trainer_state(p))
