"""Atomic file and folder writes: build beside the target, then rename over it.

A crash or Ctrl-C mid-write leaves either the old file/folder or the new one, never a torn one.
Temp names start with a dot (``.<name>.<random>.tmp``, ``.<name>.tmp-…``), so listings of the
real outputs (``step-*``, ``*.png``) never see them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

STALE_TMP_SECONDS = 3600  # temp files a killed writer left behind are removed after this long


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in the target's folder; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_save_image(image, path: str | Path, **save_kw) -> Path:
    path = Path(path)
    fmt = save_kw.pop("format", None) or {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kw)
    return path


def _old_name(final: Path) -> Path:
    return final.parent / f".{final.name}.old-{os.getpid()}"


@contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = True, tmp: str | Path | None = None,
               keep_existing: Callable[[Path], bool] | None = None):
    """Yield an empty temp folder beside ``final``; when the block succeeds it becomes ``final``.

    The previous ``final`` (if any) is renamed to ``.<name>.old-<pid>`` first and deleted after
    the swap, so a kill between the two renames loses nothing (:func:`recover_dir` puts it back).
    ``overwrite=False`` refuses an existing ``final`` up front; ``keep_existing(final)`` returning
    True (e.g. another process built the same thing meanwhile) keeps it and drops the new copy.
    ``tmp`` fixes the temp folder's name (every DDP rank must know where rank 0 writes).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    if tmp is None:
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    else:
        work = Path(tmp)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        yield work
        if final.exists() and keep_existing is not None and keep_existing(final):
            return
        old = _old_name(final)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def publish_files(staging: Path, dest: Path, *, last: str, replace: list[Path] = ()) -> list[Path]:
    """Move every file of ``staging`` into ``dest`` (renames: no new disk space), ``last`` at the end.

    ``dest/last`` and the ``replace`` files go first, so a run stopped half-way leaves ``dest``
    without ``last`` (visibly incomplete) instead of a ``last`` that describes other files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for old in [dest / last, *replace]:
        if old.exists():
            old.unlink()
    names = sorted(p.name for p in staging.iterdir() if p.is_file())
    moved = []
    for name in [n for n in names if n != last] + ([last] if last in names else []):
        os.replace(staging / name, dest / name)
        moved.append(dest / name)
    return moved


def recover_dir(final: str | Path) -> None:
    """Tidy up after an :func:`atomic_dir` killed mid-swap: a complete ``.<name>.old-*`` is put
    back when ``final`` is missing; half-built temp folders and old copies are removed."""
    final = Path(final)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    if not final.exists() and olds:
        os.replace(olds.pop(), final)
    for p in [*final.parent.glob(f".{final.name}.tmp-*"), *olds]:
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_tmp(*folders: Path, older_than: float = STALE_TMP_SECONDS) -> None:
    """Temp files a killed :func:`atomic_path` writer left behind (``.<name>.<random>.tmp``)."""
    now = time.time()
    for folder in folders:
        for p in Path(folder).glob(".*.tmp"):
            try:
                if p.is_file() and now - p.stat().st_mtime > older_than:
                    p.unlink()
            except OSError:
                pass  # another process finished or removed it


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with reproducible bytes: safetensors writes the metadata in
    hash-map order, which differs from process to process, so the same tensors would give files of
    different sha256. Here the header's metadata is sorted (tensor data and offsets unchanged)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (images, LoRA files, manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
