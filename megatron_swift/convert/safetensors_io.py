"""Writing safetensors files that others on a shared cluster can read.

safetensors (0.4+) writes through a private temporary file and renames it, so every file it writes has
mode 0600 whatever the umask (the other files of an export are 0644 under umask 0022): the next user of a
shared checkpoint folder could not load the weights. ``save`` writes and then gives the file the mode
any new file gets under this process's umask.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from safetensors.torch import save_file


def save(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
