"""Files and folders written so that a crash leaves the old version or the new one, never half of either.

A leaf module like errors.py: every layer may import it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def file(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write (its own: concurrent writers never share one; named
    `.NAME.*.tmp{suffix}`); when the block ends it replaces `target`. On an error it is removed instead."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_figure(fig: Any, path: Path) -> Path:
    """A pyplot figure laid out, saved as PNG and closed (the caller has picked matplotlib's backend)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with file(path, suffix=".png") as tmp:  # the suffix tells matplotlib the format
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


@contextmanager
def folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to fill; when the block ends it replaces `target` (an
    existing one is moved aside and removed only after the swap). On an error it is removed instead."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
