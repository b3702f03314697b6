"""Exported weights honour the umask (issue 27, item 7): safetensors alone writes every file 0600."""
import os

import torch
from safetensors.torch import load_file, save_file

from megatron_swift.convert.safetensors_io import current_umask, save


def test_saved_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        save({"w": torch.arange(3.0)}, str(tmp_path / "a.safetensors"))
        save_file({"w": torch.arange(3.0)}, str(tmp_path / "plain.safetensors"))
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "plain.safetensors").stat().st_mode & 0o777) == oct(0o600)  # the reason for save()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["w"], torch.arange(3.0))
