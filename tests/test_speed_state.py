"""The trainer_state.json reader tries the fast parser before its UTF-8 and Git LFS checks (msgspec checks UTF-8
itself): files that are not UTF-8, carry a BOM, are LFS pointers or are otherwise odd still read exactly as the
old reader (tests/_trainer_state_old.py) read them; and a group's values taken as one flat list of the entries'
values (every key kept) give the old block's values and problems."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer_state_fast import same  # noqa: E402

ENTRY = {"epoch": 0.5, "grad_norm": 1.25, "learning_rate": 1e-05, "loss": 2.5, "step": 1}
STATE = json.dumps({"global_step": 12, "log_history": [dict(ENTRY, step=i) for i in range(1, 13)]}, indent=2)
LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12965\n"

CASES = {
    "plain": STATE.encode(),
    "bom": b"\xef\xbb\xbf" + STATE.encode(),
    "non-ascii": STATE.replace('"global_step"', '"note": "\u00e9\u4e2d\U0001f600", "global_step"').encode(),
    "invalid-utf8-in-string": STATE.replace('"global_step"', '"note": "XX", "global_step"').encode()
    .replace(b"XX", b"\xff\xfe"),
    "invalid-utf8-in-key": STATE.encode().replace(b'"loss"', b'"lo\xc3\x28s"', 3),
    "surrogate-bytes": STATE.replace('"global_step"', '"note": "XX", "global_step"').encode()
    .replace(b"XX", b"\xed\xa0\x80"),
    "lone-surrogate-escape": STATE.replace('"global_step"', '"note": "\\ud800", "global_step"').encode(),
    "lfs": LFS.encode(),
    "bom-lfs": b"\xef\xbb\xbf" + LFS.encode(),
    "nan-literals": STATE.replace('"loss": 2.5', '"loss": NaN', 5).replace('"grad_norm": 1.25', '"grad_norm": -Infinity',
                                                                          2).encode(),
    "cut-off": STATE.encode()[:-200],
    "empty": b"  \n",
    "strings": STATE.replace('"loss": 2.5', '"loss": "2.5"', 4).replace('"epoch": 0.5', '"epoch": "x"', 3).encode(),
    # a one-item list is not a number (the tuple block took [1.5] as 1.5 for a one-key group; the old reader did not)
    "bool-and-big-int": STATE.replace('"loss": 2.5', '"loss": true', 2).replace('"grad_norm": 1.25',
                                                                             '"grad_norm": ' + "9" * 40, 2).encode(),
    "nested-list": STATE.replace('"loss": 2.5', '"loss": [2.5]').encode(),
    "one-key-list": json.dumps({"log_history": [{"loss": [1.5]} for _ in range(20)]}).encode(),
    "long-key": json.dumps({"log_history": [dict(ENTRY, step=i, **{"k" * 600: 1.0}) for i in range(20)]}).encode(),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_odd_files_read_as_the_old_reader_read_them(tmp_path, name):
    path = tmp_path / "trainer_state.json"
    path.write_bytes(CASES[name])
    same(path)


def test_used_codes_and_lazy_metrics_are_what_counting_gives():
    """``metric_used`` (tracked while reading) is the codes that have points, as counting them gives; ``metrics``
    (made when asked for) is the name of every point."""
    import numpy as np

    from test_trainer_state_fast import FILES

    from higgs_diag.run.trainer_state import read_trainer_state

    paths = list(FILES)
    seen = 0
    for path in paths:
        res = read_trainer_state(path)
        if res.metric_codes is None:
            continue
        seen += 1
        counted = np.flatnonzero(np.bincount(res.metric_codes, minlength=len(res.metric_names)))
        assert np.array_equal(res.metric_used, counted), path
        assert "metrics" not in res.__dict__
        names = [res.metric_names[c] for c in res.metric_codes.tolist()]
        assert list(res.metrics) == names and res.metrics is res.metrics, path
    assert seen >= 3
    assert not hasattr(read_trainer_state(paths[0]), "no_such_field")
