"""GRPO end to end: the rollout engine against transformers, learning a toy reward, the loss at lr=0 against
the hand-computed value, exact resume in the middle of a generation, and the errors an operator meets."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, launch_cmd, read_metrics, run_train, train_env

WORKER = ROOT / "tests" / "multiproc" / "rollout_worker.py"
PLUGIN = ROOT / "tests" / "fixtures" / "vowel_reward.py"
PROMPTS = [[72, 101, 108, 108, 111], [7, 8], [200, 13, 250, 31, 90, 91, 92, 93], [65, 66, 67]]
MAX_NEW = 10
BASE = ["+model=qwen3", "train.device=cpu", "train.precision=fp32", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.multiproc.test_hf_load import _save_tiny

    folder = tmp_path_factory.mktemp("hf")
    _save_tiny("qwen3", folder, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    return folder


def _hf_greedy(folder, stop=None):
    """transformers' own greedy generation, one prompt at a time (the ground truth)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                             eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
        out.append(ids[:ids.index(stop) + 1] if stop in ids else ids)
    return out


MOE = dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, num_experts=6, num_experts_per_tok=2,
           moe_intermediate_size=24, norm_topk_prob=True)
# (name, ranks, overrides, batchings): left-padded prompts with a mask (sdpa, local), or unpadded (TE's way);
# wide: 20 prompts in a batch, prefilled 3 rows per forward, decoded with the skinny products of
# backend.no_grad_paths. One launch runs a layout's batchings in turn.
LAYOUTS = {"qwen3": [("tp1", 1, [], "padded,unpadded"), ("tp2", 2, ["parallel.tp=2"], "padded,wide"),
                     ("pp2", 2, ["parallel.pp=2"], "padded,wide"),
                     ("tp2-local", 2, ["parallel.tp=2", "model.attention_backend=local"], "padded")],
           # Ranks with other prompts that end at other steps: expert layers exchange tokens across them.
           "qwen3_moe": [("ep2", 2, ["parallel.ep=2"], "padded,split")],
           # YaRN with DeepSeek's mscale (models/rope.py): the engine's rotated keys carry transformers' frequencies
           # and attention factor, left padding shifting every position.
           "qwen3-yarn": [("tp2", 2, ["parallel.tp=2"], "padded")],
           # Multi-head latent attention (DeepSeek-V2-style with YaRN, dense then MoE layers): megatron-core's MLA
           # caches its up-projected keys (RoPE applied at their positions) and values; one rank (TP=2 x EP=2 and
           # PP=2: test_hf_load's DeepSeek logits)
           "deepseek": [("tp1", 1, [], "padded")]}


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_greedy_rollouts_equal_transformers_under_each_layout(family, hf_dir, tmp_path):
    # Prompts of different lengths in one batch (left padding); the same completions at every layout.
    if family == "qwen3":
        folder = hf_dir
    else:
        from tests.multiproc.test_hf_load import DEEPSEEK, ROPE_MODELS, _save_tiny

        folder = tmp_path / "hf"
        kind, extra = {"qwen3_moe": (family, MOE), "deepseek": DEEPSEEK["v2"]}.get(family) or ROPE_MODELS["yarn-qwen3"][1:]
        _save_tiny(kind, folder, **extra)
    expected_free = _hf_greedy(folder)
    if family == "qwen3-yarn":  # the attention factor alone changes transformers' completions
        unit = dict(extra, rope_scaling=dict(extra["rope_scaling"], attention_factor=1.0))
        _save_tiny(kind, tmp_path / "hf-af1", **unit)
        assert _hf_greedy(tmp_path / "hf-af1") != expected_free
    stop = expected_free[0][3]  # a token the first prompt's completion reaches: that completion ends early
    expected = _hf_greedy(folder, stop)
    assert len(expected[0]) <= 4 and any(len(c) == MAX_NEW for c in expected)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    for name, nproc, layout, batchings in LAYOUTS[family]:
        out = tmp_path / name
        overrides = [*BASE, f"+model={family.split('-')[0]}", f"model.pretrained={folder}", "data.tokenizer=byte",
                     "train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1",
                     f"train.output_dir={tmp_path / name}", *layout]
        overrides.remove("+model=qwen3")
        cmd = launch_cmd(nproc, [str(tmp_path / "prompts.json"), str(out), str(MAX_NEW), str(stop), batchings,
                                 *overrides], script=WORKER)
        proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for batching in batchings.split(","):
            if batching == "split":
                parts = [json.loads(Path(f"{out}.split.{rank}.json").read_text()) for rank in (0, 1)]
                got = {key: parts[0][key] + parts[1][key] for key in ("token_ids", "stopped")}
            else:
                got = json.loads(Path(f"{out}.{batching}.json").read_text())
            want = expected * 5 if batching == "wide" else expected
            assert got["token_ids"] == want, (name, batching)
            assert got["stopped"] == [c[-1] == stop for c in want], (name, batching)


def _grpo(tmp_path, name, nproc, extra, check=True, completion=8):
    out = tmp_path / name
    overrides = [*BASE, "task=grpo", "data=prompts", f"task.reward_plugins=[{PLUGIN}]", "task.rewards=[vowels]",
                 f"task.max_completion_length={completion}", "train.seq_length=64", f"train.output_dir={out}", *extra]
    proc = run_train(nproc, overrides, timeout=600, check=check)
    return out, proc


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"]], ids=["dp2", "tp2"])
def test_grpo_learns_a_toy_reward(tmp_path, layout):
    out, _ = _grpo(tmp_path, "run", 2, ["task.num_generations=8", "train.global_batch_size=32",
                                        "train.micro_batch_size=8", "task.beta=0", "train.lr=2e-2",
                                        "train.lr_warmup_iters=0", "train.lr_decay_style=constant",
                                        "train.train_iters=20", *layout])
    rewards = [m["rewards/mean"] for m in read_metrics(out)]
    assert rewards[0] < 0.3 and max(rewards[-3:]) > 0.8 and min(rewards[-3:]) > 0.6, rewards


def test_lr0_ratio_one_kl_zero_and_loss_from_the_logged_advantages(hf_dir, tmp_path):
    # bnpo: the token mean of each micro-batch, averaged over micro-batches. Three rows per micro-batch and four
    # completions per prompt: micro-batches straddle groups, whose advantages sum to zero only as a whole.
    out, _ = _grpo(tmp_path, "run", 1, [f"model.pretrained={hf_dir}", "data.tokenizer=byte", "train.lr=0",
                                        "train.min_lr=0", "task.beta=0.04", "task.loss_type=bnpo",
                                        "task.num_generations=4", "train.global_batch_size=12",
                                        "train.micro_batch_size=3", "task.log_completions=12", "train.train_iters=2",
                                        "task.rewards=[ascii]", "logging.wandb.project=grpo-test",
                                        # A seed whose completions end at different lengths in both steps.
                                        "logging.wandb.mode=offline", "train.seed=3"], completion=16)
    metrics = read_metrics(out)
    _check_wandb(out, [m["rewards/mean"] for m in metrics])
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    nonzero = []
    for step, m in enumerate(metrics):
        assert m["policy/ratio"] == pytest.approx(1.0, abs=1e-6) and m["policy/kl"] == pytest.approx(0.0, abs=1e-6)
        mine = [r for r in rows if r["generation"] == step]
        assert len(mine) == 12
        # Ratio 1 and KL 0: each token's loss is -A of its completion.
        per_batch = [sum(-r["advantage"] * r["completion_tokens"] for r in pair)
                     / sum(r["completion_tokens"] for r in pair) for pair in (mine[k:k + 3] for k in range(0, 12, 3))]
        expected = sum(per_batch) / len(per_batch)
        nonzero.append(abs(expected) > 1e-4)  # zero when every completion has the same length
        assert m["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), (m["loss"], expected)
    assert all(nonzero)


def _check_wandb(out, rewards):
    """The reward curve and a table of completions per generation reach WandB (offline run file)."""
    import glob

    from tests.wandb_records import read_history

    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = read_history(run_file)
    assert [row["train/rewards/mean"] for row in history if "train/rewards/mean" in row] == pytest.approx(rewards)
    # A table is logged as a file reference, flattened into the row: train/completions/{_type,nrows,...}.
    tables = [row for row in history if "train/completions/_type" in row]
    assert len(tables) == len(rewards)
    assert all(t["train/completions/_type"] == "table-file" and t["train/completions/nrows"] == 12 for t in tables)


def test_resume_in_the_middle_of_a_generation_is_exact(tmp_path):
    # Dynamic sampling: where the prompt stream stands is state too (it moves faster than the steps).
    common = ["task.dynamic_sampling=true", "task.num_generations=4", "train.global_batch_size=8", "train.micro_batch_size=4",
              "task.steps_per_generation=2", "task.beta=0", "train.lr=1e-2", "train.lr_warmup_iters=0",
              "train.lr_decay_style=constant", "task.temperature=1.0"]
    whole, _ = _grpo(tmp_path, "whole", 1, [*common, "train.train_iters=4"])
    part, _ = _grpo(tmp_path, "part", 1, [*common, "train.train_iters=3"])
    _grpo(tmp_path, "part", 1, [*common, "train.train_iters=4"])
    a, b = read_metrics(whole), read_metrics(part)
    assert [m["iteration"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "rewards/mean", "policy/ratio", "policy/entropy"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    # The second step of a generation compares against the log-probs at generation time.
    assert a[1]["policy/ratio"] != 1.0 and a[3]["policy/ratio"] != 1.0


def test_dynamic_sampling_trains_on_groups_with_a_reward_spread(tmp_path):
    out, _ = _grpo(tmp_path, "run", 2, ["task.dynamic_sampling=true", "task.max_resample=3", "task.num_generations=4",
                                        "train.global_batch_size=16", "train.micro_batch_size=4", "task.beta=0",
                                        "task.log_completions=8", "train.train_iters=3", "task.rewards=[vowels]",
                                        "task.max_completion_length=8"])
    metrics = read_metrics(out)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for step, m in enumerate(metrics):
        assert 1 <= m["dynamic/attempts"] <= 4
        groups = [rows[k:k + 4] for k in range(8 * step, 8 * step + 8, 4)]  # the last rank's 2 groups
        spread = [max(r["reward"] for r in g) > min(r["reward"] for r in g) for g in groups]
        if m["dynamic/kept_groups"] == 1.0:
            assert all(spread), groups
        else:  # ran out of rounds: the kept groups come first, then ones without spread
            assert m["dynamic/attempts"] == 4
    # A random model rarely writes vowels: about half the groups score all 0, so rounds were drawn again.
    assert any(m["dynamic/attempts"] > 1 and m["dynamic/kept_groups"] == 1.0 for m in metrics)


def test_bad_prompt_row_and_bad_settings_are_one_line_each(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    _, proc = _grpo(tmp_path, "bad", 1, [f"data.path=[{bad}]", "task.num_generations=2", "task.beta=0",
                                         "train.global_batch_size=2", "train.micro_batch_size=2"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-swift: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and f"{bad}:2:" in errors[0], proc.stderr[-2000:]
    broken = tmp_path / "broken.py"
    broken.write_text("from megatron_swift.rewards import reward\n\nx = undefined_name\n")
    _, proc = _grpo(tmp_path, "bad2", 1, [f"task.reward_plugins=[{broken}]", "task.num_generations=1",
                                          "train.global_batch_size=3"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-swift: error:")]
    assert proc.returncode != 0
    assert any(f"{broken}:3: NameError" in e for e in errors), proc.stderr[-2000:]
    assert any("task.num_generations=1" in e for e in errors), errors


def test_rewards_that_cannot_run_are_one_line_each(tmp_path):
    def errors_of(name, extra):
        _, proc = _grpo(tmp_path, name, 1, ["task.beta=0", "task.num_generations=2", "train.global_batch_size=2",
                                            "train.micro_batch_size=2", "train.train_iters=1", *extra], check=False)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("megatron-swift: error:")]
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "solution": "1"}\n{"prompt": "b"}\n')
    line = errors_of("nosol", [f"data.path=[{prompts}]", "task.rewards=[accuracy]"])
    assert f"{prompts}:2: row has no 'solution', which the accuracy reward" in line
    line = errors_of("buffer", ["task.rewards=[soft_overlong]", "task.overlong_buffer=64"])
    assert "task.overlong_buffer=64 must be in [1, task.max_completion_length=8]" in line
    plugin = tmp_path / "boom.py"
    plugin.write_text("from megatron_swift.rewards import reward\n\n@reward('boom')\n"
                      "def boom(prompts, completions, **columns):\n    raise ValueError('no luck')\n")
    line = errors_of("boom", [f"task.reward_plugins=[{plugin}]", "task.rewards=[boom]",
                              "data.shuffle=false"])  # the first generation's prompt is the file's first row
    assert "demo_prompts.jsonl:1: reward 'boom'" in line and "ValueError: no luck" in line, line


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random Qwen3 judge with its own BPE tokenizer (digits in its vocabulary) and ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.multiproc.test_hf_load import _save_tiny

    folder = tmp_path_factory.mktemp("judge")
    _save_tiny("qwen3", folder, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Score: 7. The answer 42 is right, 3 is wrong; rate 0 to 10."] * 40, trainer)
    tok.save(str(folder / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml, "eos_token": "<|im_end|>"}))
    # The end-of-turn row of the output layer: a little more than the row of "w", so that the random judge
    # ends its reply where it would write "w" ("42w..." becomes "42", a score of 2), and runs into
    # task.judge.max_new_tokens elsewhere (cut off: never a score).
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    head = weights["lm_head.weight"]
    head[tok.token_to_id("<|im_end|>")] = 1.05 * head[tok.token_to_id("w")]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_judge_model_replies_are_parsed_and_malformed_ones_counted(judge_dir, tmp_path):
    import re

    out, _ = _grpo(tmp_path, "run", 2, ["parallel.tp=2", "task.rewards=[judge]", f"task.judge.model={judge_dir}",
                                        "task.judge.max_new_tokens=6", "task.judge.pattern='(\\d)\\D*$'",
                                        "task.beta=0", "task.num_generations=4",
                                        "train.global_batch_size=8", "train.micro_batch_size=4",
                                        "task.log_completions=8", "train.train_iters=2"])
    metrics = read_metrics(out)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    unparsable = 0
    for row in rows:  # what the random judge writes decides the mix
        lines = [line for line in row["judge_reply"].splitlines() if line.strip()]
        found = re.findall(r"(\d)\D*$", lines[-1].strip()) if lines and not row["judge_truncated"] else []
        expected = float(found[-1]) / 10 if found else 0.0
        unparsable += not found
        assert row["rewards/judge"] == pytest.approx(expected), row
    assert 0 < unparsable < len(rows), rows
    logged = sum(m["judge/malformed"] * 8 for m in metrics)
    assert logged == pytest.approx(unparsable)


def test_evaluation_is_the_mean_reward_of_greedy_completions(hf_dir, tmp_path):
    """At lr=0 the policy is the HF model: its evaluation must score transformers' own greedy completions."""
    from transformers import AutoModelForCausalLM

    from megatron_swift.data.prompts import prompt_source
    from megatron_swift.data.tokenizer import ByteTokenizer

    held_out = tmp_path / "held_out.jsonl"  # 5 prompts over 2 DP ranks: one rank repeats one, not counted
    held_out.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 3}?"}) + "\n" for i in range(5)))
    out, _ = _grpo(tmp_path, "run", 2, [f"model.pretrained={hf_dir}", "data.tokenizer=byte", "train.lr=0",
                                        "train.min_lr=0", "task.beta=0", "task.num_generations=2",
                                        "train.global_batch_size=4", "train.micro_batch_size=2",
                                        "train.train_iters=2", "train.eval_interval=2", f"data.eval_path=[{held_out}]",
                                        "task.rewards=[ascii]"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in rows if "eval_reward" in r]
    cfg = OmegaConf.create({"template": None, "on_error": "error", "truncation": "error"})
    prompts = prompt_source([str(held_out)], cfg, ByteTokenizer(), 64, None, 8)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    texts, lengths = [], []
    for ids in prompts.ids:
        new = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=256,
                             pad_token_id=0)[0, len(ids):].tolist()
        new = new[:new.index(256) + 1] if 256 in new else new
        texts.append(ByteTokenizer().decode([t for t in new if t != 256]))
        lengths.append(len(new))
    expected = [sum(ord(c) < 128 for c in text) / max(len(text), 1) for text in texts]  # the plugin's "ascii"
    assert evaluation["iteration"] == 2
    assert evaluation["eval_reward"] == pytest.approx(sum(expected) / 5, abs=1e-6)
    assert evaluation["eval_rewards/ascii"] == pytest.approx(sum(expected) / 5, abs=1e-6)
    assert evaluation["eval_completion_length"] == pytest.approx(sum(lengths) / 5)


def test_a_run_from_scratch_keeps_its_initial_weights_as_the_reference(tmp_path):
    """task=grpo with task.beta > 0 and no model.pretrained (issue 27, item 3): the reference is a copy of the
    initial weights, so the KL is exactly 0 at the first step and grows once the policy has moved."""
    out, _ = _grpo(tmp_path, "run", 2, ["task.beta=0.04", "task.num_generations=4", "train.global_batch_size=8",
                                        "train.micro_batch_size=4", "train.lr=5e-3", "train.lr_warmup_iters=0",
                                        "train.train_iters=2"])
    kl = [m["policy/kl"] for m in read_metrics(out)]
    assert kl[0] == 0.0 and kl[1] > 0.0, kl
