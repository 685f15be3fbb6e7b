"""The limits higgs-diag applies to what it reads: one place, one number each, documented.

Every input is treated as possibly damaged or hostile (a cut-off copy, a file another tool wrote under our
name, a crafted file). Whatever a file says, higgs-diag never recurses, allocates or loops without one of
these bounds; a value or file outside them becomes a ``ReadProblem`` (a finding, HD001) or, for a file the
user named (a batch, a checkpoint), a one-line error naming the file and the limit. See "Hostile input" in
docs/design.md.

The numbers are far above anything a real Higgs Audio / HF Trainer run writes (the reference run of
``benchmarks/bench_analyze.py``: 143,361 steps, a 36 MB ``trainer_state.json``, a 47 MB event file).
"""
from __future__ import annotations

import io as _io
import os as _os
import pickletools as _pickletools
import re as _re
import stat as _stat

# ---- JSON (trainer_state.json, the args/model_config text summaries, safetensors headers) ------------------
# Nesting deeper than this is refused before the JSON parser sees it (a Trainer state nests 3 levels: the state,
# log_history, an entry; a model config 4). Python's parser would otherwise raise RecursionError.
MAX_JSON_DEPTH = 64
# An integer literal with more digits than this is out of range (Python refuses to convert more than 4,300
# digits, and any int above 2**63 overflows the int64 step column); it is read as "out of range", never as int.
MAX_INT_DIGITS = 30
# A key of log_history (a metric name) or a string field used in the report (best_model_checkpoint)
# longer than this is out of range: metric names are short (`train/audio_loss_cb7`).
MAX_NAME_CHARS = 512
# Step numbers (an entry's `step`, `global_step`, `max_steps`, the other integer fields of a Trainer state)
# outside [-MAX_STEP, MAX_STEP] are out of range: 10**15 steps at 1,000 steps/s would take 30,000 years.
MAX_STEP = 10 ** 15
# A number of the TrainingArguments or the model config (`args` / `model_config` text summaries) outside the
# int64 range, or NaN/Infinity there, is out of range and left out (a read problem names the key): checks turn
# these values into ints (steps, sizes) and numpy arrays. A real seed or size fits in int64.
MAX_CONFIG_NUMBER = 2 ** 63 - 1

# ---- file sizes --------------------------------------------------------------------------------------------
# trainer_state.json: a file of at most STATE_STREAM_ABOVE_BYTES is parsed whole (the parser keeps ~10 bytes of
# Python objects per byte of text while the columns are built); a larger one is split at log_history entry
# boundaries by a byte scan and parsed STATE_CHUNK_BYTES of entries at a time, each piece turned into columns
# and freed, so memory grows with the points kept (24 bytes each), not with the file. A 143k-step history with
# logging_steps=1 is 36 MB, parsed whole.
STATE_STREAM_ABOVE_BYTES = 64 * 1024 * 1024
STATE_CHUNK_BYTES = 8 * 1024 * 1024
# A larger file is not read (a read problem says so): 16x the 600 MB a 2.3M-step run writes.
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024 * 1024
# A file read in pieces whose structure is not a plain state (damaged, cut off, not an object with a
# log_history list) is parsed whole if it has at most this many bytes, so its problems and the entries salvaged
# are those of a small file; a larger one keeps the entries before the damage (or is not read when the damage is
# outside log_history). What lies outside log_history (the other fields) may take STATE_MAX_REST_BYTES, and one
# log_history entry STATE_MAX_ENTRY_BYTES (HF's are a few hundred bytes): beyond either, the structure is not a
# plain state.
MAX_STATE_WHOLE_PARSE_BYTES = 512 * 1024 * 1024
STATE_MAX_REST_BYTES = 64 * 1024 * 1024
STATE_MAX_ENTRY_BYTES = 64 * 1024 * 1024
# A text summary (`args`, `model_config`) longer than this is ignored (HF's are a few KB).
MAX_TEXT_SUMMARY_CHARS = 4 * 1024 * 1024
# TensorBoard event files have no size limit: they are read in chunks of this many bytes, so memory grows with
# the scalars kept, not with the file.
EVENT_READ_CHUNK_BYTES = 8 * 1024 * 1024  # (8 MiB reads the 47 MB reference file fastest)
# One TFRecord record longer than this (its length header is CRC-checked, so the length is what the writer
# wrote) stops the reading of the file: no scalar or text summary is that large.
MAX_EVENT_RECORD_BYTES = 256 * 1024 * 1024
# A safetensors header (JSON) longer than this is refused.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

# ---- batch files (replay) ----------------------------------------------------------------------------------
# A batch file larger than this is not loaded.
MAX_BATCH_FILE_BYTES = 2 * 1024 * 1024 * 1024
# The tensor data a batch file may hold once loaded (checked before anything is inflated: the zip entries'
# sizes and the storages the pickle declares). A real batch (8 x 4,096 tokens, 8 codebooks, audio features) is
# a few tens of MB.
MAX_BATCH_TENSOR_BYTES = 512 * 1024 * 1024
# Elements of one tensor of a batch (also for views: a 1-element storage seen through a huge shape).
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024
# The pickle inside a torch.save archive (data.pkl) is scanned for code before torch sees it: at most this many
# bytes (a batch dict's pickle is a few KB).
MAX_BATCH_PICKLE_BYTES = 16 * 1024 * 1024


# ---- opening a file the way every reader does ---------------------------------------------------------------
READ_CHUNK_BYTES = 16 * 1024 * 1024  # what a bounded whole-file read asks the OS for at a time


class NotReadable(Exception):
    """A file that is not read, with the reason in words (``str(e)``): not a regular file, too large, cannot
    be opened."""


def file_kind(mode: int) -> str:
    """'a FIFO', 'a directory', ... for a stat mode that is not a regular file."""
    for test, what in ((_stat.S_ISDIR, "a directory"), (_stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (_stat.S_ISCHR, "a character device"), (_stat.S_ISBLK, "a block device"),
                       (_stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path, max_bytes: int | None = None, what: str = "file"):
    """Open ``path`` for reading only if it is a regular file (a FIFO, device or socket is refused without
    blocking: it is opened non-blocking, then checked) of at most ``max_bytes`` bytes. Returns
    ``(binary file object, size)``; raises :class:`NotReadable` with the reason."""
    flags = _os.O_RDONLY | getattr(_os, "O_NONBLOCK", 0) | getattr(_os, "O_NOCTTY", 0) | getattr(_os, "O_BINARY", 0)
    try:
        fd = _os.open(path, flags)
    except OSError as e:
        raise NotReadable(f"cannot be opened: {e.strerror or e}") from None
    try:
        st = _os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise NotReadable(f"{file_kind(st.st_mode)}, not a regular file: not read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise NotReadable(f"{st.st_size:,} bytes, over the {max_bytes:,}-byte limit for a {what} "
                              f"(higgs_diag.limits): not read")
        if hasattr(_os, "set_blocking"):
            _os.set_blocking(fd, True)
        return _os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        _os.close(fd)
        raise


def read_bounded(fh, max_bytes: int, what: str = "file") -> bytes:
    """Everything ``fh`` holds, read in ``READ_CHUNK_BYTES`` pieces (memory grows with what is there, not with
    what the file system claims), refusing more than ``max_bytes`` (a file that grows while read)."""
    parts, total = [], 0
    while True:
        chunk = fh.read(min(READ_CHUNK_BYTES, max_bytes + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise NotReadable(f"more than {max_bytes:,} bytes (the limit for a {what}, higgs_diag.limits): "
                              f"not read")
    return b"".join(parts)


# ---- what a batch's pickle may call (scanned before torch.load sees it; nothing is executed) -------------------
# Globals a torch.save file of tensors may name ("module": "names"; any name for ``torch`` matching _TORCH_NAMES).
# Any other global is code the unpickler would call: the file is refused before torch sees it.
_PLAIN = "set frozenset slice complex bytearray int float str bytes bool list dict tuple"
_DATA_GLOBALS = {m: set(names.split()) for m, names in {
    "collections": "OrderedDict", "torch._tensor": "_rebuild_from_type_v2", "torch.nn.parameter": "Parameter",
    "torch._utils": "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter _rebuild_qtensor "
                    "_rebuild_parameter_with_state _rebuild_sparse_tensor _rebuild_nested_tensor "
                    "_rebuild_device_tensor_from_numpy _rebuild_meta_tensor_no_storage _rebuild_wrapper_subclass",
    "torch.storage": "UntypedStorage TypedStorage _load_from_bytes", "torch.serialization": "_get_layout",
    "builtins": _PLAIN, "__builtin__": _PLAIN, "_codecs": "encode"}.items()}
_TORCH_NAMES = _re.compile(r"(\w*Storage|Size|device|Tensor|dtype|layout|strided|sparse_coo|\w*_format|channels_last|"
                          r"(b?float|u?int|complex|qu?int)\d*(_\w+)?|half|double|long|short|bool|cfloat|cdouble)")
_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
                  "Bool": 1, "BFloat16": 2, "ComplexDouble": 16, "ComplexFloat": 8, "Untyped": 1}



def scan_pickles(data: bytes, several: bool) -> tuple[str | None, int]:
    """(the first global that is code, e.g. ``posix.system``, or None; the bytes of tensor data the storages
    declare) of the pickle(s) at the start of ``data`` (a legacy torch.save file is several pickles, then raw
    data). Nothing is executed: ``_pickletools.genops`` only decodes opcodes."""
    stream, memo, strings = _io.BytesIO(data), {}, ["", ""]  # strings: the last two pushed (for STACK_GLOBAL)
    last, last_int, declared, storage_type = None, 0, 0, ""
    for _ in range(5 if several else 1):
        try:
            for op, arg, _pos in _pickletools.genops(stream):
                name, value = op.name, None
                if "UNICODE" in name or "STRING" in name:
                    value = str(arg)
                elif name.endswith("GET"):
                    value = memo.get(arg)
                elif name.endswith("PUT") or name == "MEMOIZE":
                    memo[arg if name != "MEMOIZE" else len(memo)] = last
                elif name in ("GLOBAL", "INST", "STACK_GLOBAL"):
                    module, _, attr = str(arg).partition(" ") if arg is not None else strings
                    ok = _TORCH_NAMES.fullmatch(attr) if module == "torch" else attr in _DATA_GLOBALS.get(module, ())
                    if not ok:
                        return f"{module}.{attr}", declared
                    storage_type = attr
                elif "INT" in name or "LONG" in name:
                    last_int = arg if isinstance(arg, int) else 0
                elif name.endswith("PERSID"):  # ('storage', type, key, location, numel): numel was the last int
                    declared += max(last_int, 0) * _ELEMENT_BYTES.get(storage_type.replace("Storage", ""), 8)
                if isinstance(value, str):
                    strings = [strings[1], value]
                if not (name.endswith("PUT") or name == "MEMOIZE"):
                    last = value
        except (ValueError, EOFError, TypeError, KeyError, IndexError):  # not (or no more) pickle: raw data
            break
        if stream.tell() >= len(data):
            break
    return None, declared
