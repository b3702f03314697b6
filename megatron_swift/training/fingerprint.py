"""Fingerprints of data files: any change to a file's bytes changes its fingerprint, at the cost of one read.

A fingerprint is the file's size and the SHA-256 of all its bytes. Hashing reads the whole file, once:
about 1.5-2 GB/s per core with the CPU's SHA extensions (0.5 GB/s without), so a 100 GB corpus costs one
to three minutes the first time it is used. The result is cached per user (``$XDG_CACHE_HOME`` or
``~/.cache``, ``megatron_swift/fingerprints.json``) under the file's device, inode, size, modification time
and change time. The kernel sets the change time (ctime) on every write and no user call can set it back,
so an unchanged key means unchanged bytes, and later starts cost one ``stat`` per file. A file copied,
moved to another disk or rewritten in place gets a new key and is hashed again. Files are hashed in
parallel threads (hashlib releases the GIL on large blocks).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

_BLOCK = 8 << 20


def _cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "megatron_swift", "fingerprints.json")


def _key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def hash_file(path: str) -> str:
    """``<size>:<SHA-256 of every byte, first 16 hex digits>``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return f"{os.path.getsize(path)}:{digest.hexdigest()[:16]}"


def _load() -> Dict[str, str]:
    try:
        with open(_cache_path(), encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(cache: Dict[str, str]) -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, path)  # whole or not at all, even with several runs starting at once
    except OSError:  # a read-only home: hashed again next time, nothing else changes
        pass


def fingerprints(paths: List[str]) -> Dict[str, str]:
    """{absolute path: fingerprint} of the files (see the module docstring for the cost)."""
    cache = _load()
    keys = {p: _key(p) for p in paths}
    todo = [p for p in paths if keys[p] not in cache]
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            for p, fp in zip(todo, pool.map(hash_file, todo)):
                cache[keys[p]] = fp
        live, mine = set(keys.values()), {os.path.abspath(p) for p in paths}
        # Entries of these files under an older key (before an edit) go; other runs' files keep theirs.
        cache = {k: v for k, v in cache.items() if k in live or k.split("|")[0] not in mine}
        _store(cache)
    return {os.path.abspath(p): cache[keys[p]] for p in paths}
