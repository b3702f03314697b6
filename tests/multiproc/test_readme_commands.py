"""README's CPU commands, typed one after another in one folder, on their default output folders: each is a
run of its own (none resumes or collides with another), and running a command again after it finished starts
a new run rather than "training" nothing. (That the same command continues its own unfinished run is
test_resume's SIGTERM test.)"""
from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from tests.conftest import ROOT, TRAIN, free_port, read_metrics, train_env

STEPS = 3  # appended to every command to keep the test short; the folders and resume rules are the defaults'


# Run as printed, to their end: the SFT demo (the policy GRPO starts from) and the GRPO demo (its reward rises).
IN_FULL = ("train.output_dir=outputs/sft-demo", "task=grpo")


def readme_commands():
    """In document order: every `torchrun --nproc_per_node 2 launch/train.py ...` command of README.md, the
    `python tools/convert/mcore_to_hf.py ...` exports between them (the tiny model the later commands start
    from) and the `head -n N file > file` lines that cut data for them, continuation lines joined."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    found = re.findall(r"(?:torchrun --nproc_per_node 2 launch/train\.py|python tools/convert/mcore_to_hf\.py"
                       r"|head -n \d+ \S+ > \S+)[^\n&|]*", text)
    commands = [" ".join(c.split()) for c in dict.fromkeys(found)]
    return [c for c in commands if "<" not in c and "[--" not in c]  # not the usage lines with placeholders


def run(command: str, cwd):
    """A training command with STEPS steps on CPU (IN_FULL ones to their end); anything else (an export, a
    shell line) exactly as printed."""
    if command.startswith("head "):
        proc = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        return proc.stdout
    if command.startswith("python "):
        cmd = ["python", *shlex.split(command)[1:]]
        cmd[1] = str(ROOT / cmd[1])
    else:
        args = shlex.split(command)[4:]  # after "launch/train.py"
        steps = [] if any(key in command for key in IN_FULL) else [f"train.train_iters={STEPS}"]
        cmd = ["python", "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(TRAIN), *args, *steps, "train.device=cpu"]
    proc = subprocess.run(cmd, cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # No CUDA advice on a CPU run (megatron-core's TP/SP linear asks for CUDA_DEVICE_MAX_CONNECTIONS=1).
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in proc.stdout + proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def tied_hf(tmp_path_factory):
    """A tiny HF model with tied embeddings, as a user's own checkpoint folder."""
    from tests.multiproc.test_hf_load import _save_tiny

    folder = tmp_path_factory.mktemp("hub") / "my-tied-qwen3"
    _save_tiny("qwen3", folder, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, vocab_size=300)
    return folder


def test_readme_commands_run_top_to_bottom_in_one_folder(tmp_path, tied_hf):
    commands = readme_commands()
    assert len(commands) >= 9, commands  # demo, TP=2, SFT, the tiny model (SFT + export), DPO, KTO, RM, GRPO
    assert any(c.startswith("python tools/convert/mcore_to_hf.py") for c in commands)
    assert any(c.startswith("head -n") for c in commands)
    (tmp_path / "megatron_swift").symlink_to(ROOT / "megatron_swift")  # the repository's paths, as from its root
    folders, full = [], {}
    for command in [*commands, commands[0], f"{commands[0]} model.pretrained={tied_hf}"]:
        out = run(command, tmp_path)
        if not command.startswith("torchrun "):
            continue
        match = re.search(r"megatron-swift: run folder (\S+) \(new run\)", out)
        assert match, f"{command}: not a new run\n{out[-2000:]}"
        assert "resumed from" not in out and "nothing to train" not in out
        if any(key in command for key in IN_FULL):
            assert re.search(r"\ndone: \d+ steps", out), out[-2000:]
            full[command] = tmp_path / match.group(1)
        else:
            assert re.search(rf"step {STEPS}/{STEPS} ", out), out[-2000:]
        folders.append(match.group(1))
    assert len(set(folders)) == len(folders)
    # Folders say what ran: model (hf_<folder> for an HF start), objective, data, tuner, layout.
    names = [f.split("/")[1] for f in folders]
    assert names[0] == "qwen3-tiny-pt-demo_corpus-dp2" and "qwen3-tiny-pt-demo_corpus-tp2" in names
    assert "hf_tiny-qwen3-dpo-demo_prefs-dp2" in names and names[-1] == "hf_my-tied-qwen3-pt-demo_corpus-dp2"
    assert "hf_tiny-qwen3-rm-demo_prefs-tp2" in names and "hf_tiny-qwen3-grpo-prompts24-dp2" in names
    assert "initial weights from HF checkpoint" in out  # the last run loaded its own weights
    # outputs/runs.jsonl: a start and an end line per run, each with its command.
    index = [json.loads(line) for line in (tmp_path / "outputs" / "runs.jsonl").read_text().splitlines()]
    assert [r["event"] for r in index] == ["start", "end"] * len(folders)
    assert [r["run"] for r in index[::2]] == folders and all(r["status"] == "finished" for r in index[1::2])
    assert index[0]["command"] == "+model=qwen3" + f" train.train_iters={STEPS} train.device=cpu"
    assert index[0]["nproc"] == 2 and index[1]["step"] == STEPS
    # The GRPO demo learns from the SFT demo's model: its reward (the README's figure) rises.
    (grpo,) = [folder for command, folder in full.items() if "task=grpo" in command]
    rewards = [row["rewards/mean"] for row in read_metrics(grpo)]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert len(rewards) == 72 and last > first + 0.1, (first, last, rewards)
