"""higgs_diag.layout: the checkpoint folder names and the files that mean a model, said once."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_diag import layout
from higgs_diag.layout import (
    ADAPTER_FILES,
    CHECKPOINT_MARKERS,
    FULL_MODEL_FILES,
    PICKLE_WEIGHTS,
    checkpoint_name,
    checkpoint_step,
    checkpoint_step_of,
    has_adapter,
    has_checkpoint_folders,
    has_full_model,
    is_checkpoint_dir,
    is_checkpoint_name,
    is_event_file,
    is_rng_state,
    step_in_path,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, step", [
    ("checkpoint-500", 500), ("checkpoint-0", 0), ("checkpoint-007", 7), ("out/run/checkpoint-12", 12),
    (Path("/x/checkpoint-143361"), 143361), ("checkpoint-12/", 12),
    ("checkpoint-", None), ("checkpoint-12a", None), ("checkpoint-best", None), ("xcheckpoint-5", None),
    ("checkpoint-5.tar", None), ("last-checkpoint", None), ("checkpoint--1", None), ("", None),
    ("checkpoint-5/lora_adapters", None),
])
def test_checkpoint_step(name, step):
    assert checkpoint_step(name) == step


def test_checkpoint_name_round_trips():
    for step in (0, 1, 500, 143361):
        assert checkpoint_name(step) == f"checkpoint-{step}"
        assert checkpoint_step(checkpoint_name(step)) == step


@pytest.mark.parametrize("text, step", [
    ("out/checkpoint-1500", 1500), ("/data/run/checkpoint-3/lora_adapters", 3), ("checkpoint-40", 40),
    (Path("runs/checkpoint-9"), 9), ("out/final", None), ("last-checkpoint", None), (None, None), ("", None),
])
def test_step_in_path(text, step):
    assert step_in_path(text) == step


@pytest.mark.parametrize("name, yes", [
    ("checkpoint-5", True), ("last-checkpoint", True), ("a/b/checkpoint-10", True), ("out/last-checkpoint", True),
    ("checkpoint-best", False), ("checkpoints", False), ("checkpoint-", False), ("last-checkpoints", False),
    ("runs", False),
])
def test_is_checkpoint_name(name, yes):
    assert is_checkpoint_name(name) is yes


def test_checkpoint_step_of_looks_at_the_folder_then_its_parent():
    assert checkpoint_step_of(Path("out/checkpoint-7")) == 7
    assert checkpoint_step_of(Path("out/checkpoint-7/lora_adapters")) == 7
    assert checkpoint_step_of("out/checkpoint-7/lora_adapters") == 7
    assert checkpoint_step_of(Path("checkpoint-3/checkpoint-8")) == 8  # its own name first
    assert checkpoint_step_of(Path("out/last-checkpoint")) is None
    assert checkpoint_step_of(Path("out/checkpoint-7/a/b")) is None  # the grandparent does not count
    assert checkpoint_step_of(Path("final_model")) is None


@pytest.mark.parametrize("marker", CHECKPOINT_MARKERS)
def test_is_checkpoint_dir_true_for_each_marker(tmp_path, marker):
    d = tmp_path / "ck"
    d.mkdir()
    if marker == "lora_adapters":
        (d / marker).mkdir()
    else:
        (d / marker).write_bytes(b"{}")
    assert is_checkpoint_dir(d)
    assert is_checkpoint_dir(str(d))


def test_is_checkpoint_dir_false_without_a_marker(tmp_path):
    d = tmp_path / "checkpoint-5"
    d.mkdir()
    assert not is_checkpoint_dir(d)  # the name alone does not make a loadable checkpoint
    for name in ("trainer_state.json", "optimizer.pt", "rng_state.pth", "step-000005.pt", "model-00001-of-00002.safetensors"):
        (d / name).write_bytes(b"x")
    assert not is_checkpoint_dir(d)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert not is_checkpoint_dir(f)  # a file is not a folder
    assert not is_checkpoint_dir(tmp_path / "missing")


def test_checkpoint_markers_are_the_replay_cli_markers():
    # the set replay's command line has always accepted as "the first path is a checkpoint"
    assert CHECKPOINT_MARKERS == ("config.json", "model.safetensors", "model.safetensors.index.json",
                                  "adapter_config.json", "adapter_model.safetensors", "lora_adapters",
                                  "pytorch_model.bin", "adapter_model.bin")


def test_has_checkpoint_folders(tmp_path):
    assert not has_checkpoint_folders(tmp_path)
    assert not has_checkpoint_folders(tmp_path / "missing")
    (tmp_path / "checkpoint-3").write_text("a file, not a folder")
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "runs").mkdir()
    assert not has_checkpoint_folders(tmp_path)
    (tmp_path / "checkpoint-4").mkdir()
    assert has_checkpoint_folders(tmp_path)
    other = tmp_path / "other"
    (other / "last-checkpoint").mkdir(parents=True)
    assert has_checkpoint_folders(other)


@pytest.mark.parametrize("files, full, adapter", [
    (["model.safetensors", "config.json"], True, False),
    (["model.safetensors.index.json", "model-00001-of-00002.safetensors"], True, False),
    (["pytorch_model.bin"], True, False),
    (["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"], True, False),
    (["model-00001-of-00002.safetensors"], False, False),  # shards without their index
    (["adapter_model.safetensors", "adapter_config.json"], False, True),
    (["adapter_model.bin"], False, True),
    (["adapter_config.json"], False, False),  # a config without weights
    (["lora_adapters/adapter_config.json", "model.safetensors"], True, True),
    (["lora_adapters/model.safetensors"], False, True),  # nested: not the checkpoint's own full model
    (["trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"], False, False),
    ([], False, False),
])
def test_model_kind_from_file_names(files, full, adapter):
    assert has_full_model(files) is full
    assert has_adapter(files) is adapter
    assert has_full_model(iter(files)) is full  # any iterable of names


def test_file_groups():
    assert set(FULL_MODEL_FILES) == {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                     "pytorch_model.bin.index.json"}
    assert set(ADAPTER_FILES) == {"adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"}
    assert all(has_adapter([f]) for f in ADAPTER_FILES if f.startswith("adapter_model."))
    assert all(has_full_model([f]) for f in FULL_MODEL_FILES)
    # every pickle is a weight file that must never be loaded: none of them is safetensors
    assert PICKLE_WEIGHTS and not any("safetensors" in f for f in PICKLE_WEIGHTS)


@pytest.mark.parametrize("name, yes", [
    ("rng_state.pth", True), ("rng_state_0.pth", True), ("rng_state_15.pth", True),
    ("rng_state.pt", False), ("optimizer.pt", False), ("my_rng_state.pth", False),
])
def test_is_rng_state(name, yes):
    assert is_rng_state(name) is yes


def test_is_event_file():
    assert is_event_file("events.out.tfevents.1742826235.DESKTOP-41L2EO3.107869.0")
    assert is_event_file(Path("/a/runs/x/events.out.tfevents.1.h.2.0"))
    assert not is_event_file("trainer_state.json")
    assert not is_event_file("events.out.tfevents.d/trainer_state.json")


# ------------------------------------------------------------------------------------------------
# the modules that used to carry their own copy now ask layout
# ------------------------------------------------------------------------------------------------
def test_discover_uses_the_layout(tmp_path):
    from higgs_diag.run.discover import discover

    for name in ("checkpoint-20", "checkpoint-3", "last-checkpoint", "checkpoint-best", "checkpoints"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-3" / "rng_state_1.pth").write_bytes(b"x")
    files = discover(tmp_path)
    got = [(Path(c.path).name, c.step) for c in files.checkpoints]
    assert got == [("checkpoint-3", 3), ("checkpoint-20", 20), ("last-checkpoint", None)]
    by_name = {Path(c.path).name: c for c in files.checkpoints}
    assert by_name["checkpoint-3"].has_full_model and not by_name["checkpoint-3"].has_adapter
    assert by_name["checkpoint-20"].has_adapter and not by_name["checkpoint-20"].has_full_model
    assert by_name["checkpoint-3"].rng_state_files == ["rng_state_1.pth"]
    assert any(f.endswith("rng_state_1.pth") for f, _ in files.not_read)


def test_replay_step_and_run_root_use_the_layout(tmp_path):
    from higgs_diag.replay.checkpoint import step_of
    from higgs_diag.replay.logged import find_run_root

    out = tmp_path / "out"
    lora = out / "checkpoint-40" / "lora_adapters"
    lora.mkdir(parents=True)
    last = out / "last-checkpoint"
    last.mkdir()
    (last / "trainer_state.json").write_text('{"global_step": 55}')
    assert step_of(lora) == 40
    assert step_of(out / "checkpoint-40") == 40
    assert step_of(last) == 55  # no step in the name: its trainer_state.json says it
    # out/ holds checkpoint folders: it is the run root of all of them
    assert find_run_root(lora) == out.resolve()
    assert find_run_root(last) == out.resolve()
    # a folder that only holds a file named like a checkpoint is not a run root
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "checkpoint-1").write_text("not a folder")
    assert find_run_root(lone) is None
    (lone / "checkpoint-2").mkdir()
    assert find_run_root(lone) == lone.resolve()


def test_layout_is_stdlib_only():
    code = ("import sys; import higgs_diag.layout; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pandas', 'tensorboard')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))


def test_the_checkpoint_pattern_is_written_once_in_the_modules_that_use_layout():
    pattern = re.compile(r"checkpoint-\(\\d\+\)")
    files = [*sorted((REPO / "higgs_diag" / "run").glob("*.py")),
             REPO / "higgs_diag" / "replay" / "checkpoint.py", REPO / "higgs_diag" / "replay" / "logged.py"]
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text(encoding="utf-8"))]
    assert offenders == []
    assert pattern.search((REPO / "higgs_diag" / "layout.py").read_text(encoding="utf-8"))
    assert layout.CHECKPOINT_RE.pattern == r"^checkpoint-(\d+)$"
