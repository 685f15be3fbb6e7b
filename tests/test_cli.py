"""The CLI contract: formats, exit codes, one-line errors, read-only run directories, generated docs."""
from __future__ import annotations

import json
import os
from pathlib import Path


from higgs_diag.checks import load_all
from higgs_diag.checks.docgen import render as render_docs
from higgs_diag.cli import main
from _cli_util import runner, tree_digest  # tests/_cli_util.py

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "fixtures" / "runs"
FAULTY = RUNS / "eval-loss-missing"
HEALTHY = RUNS / "healthy"





def test_json_on_stdout_only_and_exit_code_1_on_critical():
    r = runner().invoke(main, ["analyze", str(FAULTY), "--format", "json"])
    assert r.exit_code == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "higgs-diag.report/1" and doc["verdict"] == "critical"


def test_fail_on_levels():
    assert runner().invoke(main, ["analyze", str(FAULTY), "--fail-on", "never"]).exit_code == 0
    assert runner().invoke(main, ["analyze", str(HEALTHY), "--fail-on", "warning"]).exit_code == 0
    assert runner().invoke(main, ["analyze", str(FAULTY), "--fail-on", "critical"]).exit_code == 1


def test_missing_dir_is_one_line_exit_2(tmp_path):
    r = runner().invoke(main, ["analyze", str(tmp_path / "nope")])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_lfs_pointer_only_is_one_line_exit_2(tmp_path):
    p = tmp_path / "trainer_state.json"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 10\n")
    r = runner().invoke(main, ["analyze", str(p)])
    assert r.exit_code == 2 and "Git LFS pointer" in r.stderr and "trainer_state.json" in r.stderr


def test_bad_threshold_is_usage_error():
    r = runner().invoke(main, ["analyze", str(HEALTHY), "--set", "no_such=1"])
    assert r.exit_code == 2 and "unknown threshold" in r.stderr


def test_spike_history_longer_than_its_window_is_a_usage_error_not_an_internal_error():
    # a trailing window of 3 steps can never hold 10 steps of history (pandas raised inside the spike rule: exit 3)
    r = runner().invoke(main, ["analyze", str(HEALTHY), "--set", "grad_spike_window=3",
                               "--set", "grad_spike_min_history=10"])
    assert r.exit_code == 2 and "grad_spike_min_history" in r.stderr and "internal error" not in r.stderr
    ok = runner().invoke(main, ["analyze", str(HEALTHY), "--set", "grad_spike_window=3",
                                "--set", "grad_spike_min_history=3"])
    assert ok.exit_code in (0, 1)


def test_threshold_override_changes_the_result():
    base = runner().invoke(main, ["analyze", str(RUNS / "audio-labels-unshifted"), "--format", "json"])
    loose = runner().invoke(main, ["analyze", str(RUNS / "audio-labels-unshifted"), "--format", "json",
                                   "--set", "audio_loss_warning=1e-9", "--set", "audio_loss_critical=1e-10",
                                   "--set", "collapse_fraction=1e-9"])
    codes = lambda r: {f["code"] for f in json.loads(r.stdout)["findings"]}
    assert "HD201" in codes(base) and "HD201" not in codes(loose)


def test_output_dir_written_and_run_dir_untouched(tmp_path):
    before = tree_digest(FAULTY)
    out = tmp_path / "report"
    r = runner().invoke(main, ["analyze", str(FAULTY), "--output", str(out), "--fail-on", "never"])
    assert r.exit_code == 0, r.stderr
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert list((out / "plots").glob("*.png"))
    assert tree_digest(FAULTY) == before


def test_text_report_has_no_color_when_not_a_tty():
    r = runner().invoke(main, ["analyze", str(FAULTY)], env={"NO_COLOR": "1"})
    assert "\x1b[" not in r.stdout and "HD101" in r.stdout


def test_checks_and_explain():
    r = runner().invoke(main, ["checks"])
    assert r.exit_code == 0
    for code in load_all():
        assert code in r.stdout
    r = runner().invoke(main, ["explain", "hd101"])
    assert r.exit_code == 0 and "label_names" in r.stdout
    assert runner().invoke(main, ["explain", "HD999"]).exit_code == 2


def test_every_check_documents_itself():
    for code, c in load_all().items():
        for section in ("What it detects:", "Why it happens:", "Example:", "Fix:"):
            assert section in c.doc, f"{code} lacks {section!r}"
        assert c.why and c.fix, code


def test_docs_checks_md_is_current():
    committed = (ROOT / "docs" / "checks.md").read_text(encoding="utf-8")
    assert committed == render_docs(), "docs/checks.md is stale: run `make docs`"


def test_analyze_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, higgs_diag; higgs_diag.analyze(sys.argv[1]); "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(FAULTY)], capture_output=True, text=True,
                       env={**os.environ, "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_nothing_usable_is_exit_2_even_with_a_log_and_checkpoint_folder(tmp_path):
    """Garbage files, a log without any known message and an empty checkpoint folder: nothing a diagnosis can
    use, so no 'healthy' verdict: one line naming what could not be read, exit 2."""
    import os as _os

    (tmp_path / "trainer_state.json").write_text("nonsense")
    (tmp_path / "events.out.tfevents.1.host.1.0").write_bytes(_os.urandom(300))
    (tmp_path / "foo.log").write_bytes(b"just some console noise\n" * 5)
    (tmp_path / "checkpoint-5").mkdir()
    r = runner().invoke(main, ["analyze", str(tmp_path)])
    assert r.exit_code == 2, r.stdout
    assert r.stderr.count("\n") == 1 and "trainer_state.json" in r.stderr


def test_unreadable_data_file_is_a_warning_not_healthy(tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(HEALTHY, run)
    (run / "trainer_state.json").write_text('{"global_step": 3, "log_history": [')  # cut off before any entry
    (run / "checkpoint-250" / "trainer_state.json").unlink()
    r = runner().invoke(main, ["analyze", str(run), "--format", "json"])
    doc = json.loads(r.stdout)
    hd001 = [f for f in doc["findings"] if f["code"] == "HD001"]
    assert hd001 and hd001[0]["severity"] == "warning" and r.exit_code == 1


def test_analyze_replay_without_batches_still_reports_the_logs(tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(FAULTY, run)
    r = runner().invoke(main, ["analyze", str(run), "--replay", "--format", "json"])
    doc = json.loads(r.stdout)
    assert doc["findings"][0]["code"] == "HD101" and "no batch files" in doc["summary"]["replay"]["skipped"]
    assert any(f["code"] == "HD810" and f["severity"] == "info" for f in doc["findings"])
    assert "replay skipped" in r.stderr and r.exit_code == 1
    r = runner().invoke(main, ["analyze", str(run), "--batches", str(tmp_path / "nope.pt"), "--format", "json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["findings"][0]["code"] == "HD101"


def test_internal_error_is_one_line_and_exit_3(monkeypatch):
    """A bug of ours (any unexpected exception) is not a diagnosis: one line naming the command and the run,
    exit 3; --debug shows the traceback."""
    import higgs_diag.api

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(higgs_diag.api, "analyze", broken)
    r = runner().invoke(main, ["analyze", str(FAULTY)])
    assert r.exit_code == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error while running analyze on" in lines[0] and "RuntimeError: boom" in lines[0]
    assert "--debug" in lines[0] and "Traceback" not in r.stderr
    r = runner().invoke(main, ["--debug", "analyze", str(FAULTY)])
    assert isinstance(r.exception, RuntimeError)
