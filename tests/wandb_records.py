"""Read a WandB offline ``.wandb`` file back (test-side).

wandb >= 0.19 no longer ships a Python reader, so this follows the documented
on-disk format: a 7-byte header (":W&B", magic, version) then LevelDB-log
blocks of 32 KiB, each record ``crc32c(4) length(2) type(1) data``, with types
FULL=1, FIRST=2, MIDDLE=3, LAST=4; payloads are ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
from typing import Dict, List

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes) -> List[bytes]:
    assert data[:4] == b":W&B", "not a wandb run file"
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    return out


def read_history(path: str) -> List[Dict[str, float]]:
    """The logged history rows, as {key: value}, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    with open(path, "rb") as f:
        data = f.read()
    for payload in _payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def read_config(path: str) -> Dict[str, object]:
    """The run config as logged (top-level keys to decoded values)."""
    from wandb.proto import wandb_internal_pb2 as pb

    config = {}
    with open(path, "rb") as f:
        data = f.read()
    for payload in _payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in updates:
            config[item.key] = json.loads(item.value_json)
    return config
