"""The machine-readable report: ``Diagnosis.to_dict()`` as strict JSON (the report contract)."""
from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any

from ..diagnosis import Diagnosis
from ._common import _UNSAFE, _escape


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts: NaN/Inf floats become the
    strings ``"NaN"``/``"Infinity"``/``"-Infinity"``, numpy scalars plain numbers, tuples and sets
    lists, paths and anything else unknown strings; dict keys strings."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):  # a lone surrogate (a file name's undecodable byte) is shown as \\xNN
        return _UNSAFE.sub(_escape, obj) if _UNSAFE.search(obj) else obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return float(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, PurePath):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy scalars (np.int64 is not an int)
    if callable(item) and getattr(obj, "shape", None) == ():
        return jsonable(item())
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return jsonable(tolist())
    return str(obj)


def render_json(diag: Diagnosis) -> str:
    """The report as JSON (indent 2), schema ``higgs-diag.report/1``; never a bare NaN."""
    return json.dumps(jsonable(diag.to_dict()), indent=2, allow_nan=False) + "\n"
