"""Helpers the CLI tests share: a CliRunner with stdout and stderr apart, and a digest of a folder tree (to show
that a command left a run directory untouched)."""
import hashlib
from pathlib import Path

from click.testing import CliRunner


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()


def tree_digest(path: Path) -> str:
    """Names, bytes and modification times of everything under ``path``."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()
