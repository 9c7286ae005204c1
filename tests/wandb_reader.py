"""Reading an offline W&B run back (no sync, no server), for the tests: the ``.wandb`` file is a
LevelDB-style log of protobuf ``Record`` messages."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

_HEADER = b":W&B"
_BLOCK = 32768
_REC_HEADER = 7  # crc32 (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(path: str | Path) -> Iterator:
    """Yield the ``wandb_internal_pb2.Record`` messages of a ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    pos, pending = 7, b""
    while pos + _REC_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _REC_HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _REC_HEADER : pos + _REC_HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos} (file truncated or corrupt)")
        pos += _REC_HEADER + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def read_wandb_run(path: str | Path) -> dict:
    """History rows (``{key: value}`` with ``_step``), config and logged file paths of an offline run.

    ``path``: the ``run-<id>.wandb`` file or its ``offline-run-*`` folder.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise FileNotFoundError(f"no run-*.wandb file in {path}")
        path = found[0]
    history, config, files, run = [], {}, [], {}
    for rec in iter_wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                keys = list(item.nested_key) or [item.key]
                target = row
                for k in keys[:-1]:
                    target = target.setdefault(k, {})
                target[keys[-1]] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            run = {"id": rec.run.run_id, "project": rec.run.project, "group": rec.run.run_group,
                   "name": rec.run.display_name}
            for item in rec.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "files":
            files.extend(f.path for f in rec.files.files)
    return {"file": path, "history": history, "config": config, "files": files, "run": run}
