"""Preference tasks on megatron-core.

DPO: log 2 at the start under every layout, learns a learnable preference, reference frozen, precomputed
reference equal to live. KTO: the closed-form start value, then desirable rewards rise and undesirable fall.
RM: learns the pairs, and the exported HF sequence-classification model scores rows as Megatron does.
CPO, SimPO, ORPO and (off-policy) GKD: TP=2 and PP=2 x DP=2 give the one-rank run; CPO, SimPO, ORPO also under
CP=2 (ORPO with a LoRA student too) and EP=2 on a tiny Qwen3-MoE; GKD on the student's own samples against its
own weights is 0.
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import transformers  # a test dependency (setup.py [test]): missing, the suite must fail, not skip

from tests.conftest import ROOT, launch_cmd, read_metrics, run_train, train_env

WORKER = ROOT / "tests" / "multiproc" / "dpo_worker.py"
RM_WORKER = ROOT / "tests" / "multiproc" / "rm_worker.py"


def _base(hf, out, task="dpo", data="prefs"):
    # The bundled arithmetic preference set, byte tokenizer; the HF folder gives the starting weights.
    return ["+model=qwen3", f"model.pretrained={hf}", f"data={data}", "data.tokenizer=byte", f"task={task}",
            "train.seq_length=96", "train.precision=fp32", "train.device=cpu", "logging.tensorboard=false",
            f"train.output_dir={out}"]


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.pp=2"])])
def test_policy_equal_to_reference_gives_log_2(tmp_path, tiny_hf, nproc, layout):
    run_train(nproc, [*_base(tiny_hf, tmp_path / "run"), "train.train_iters=1", *layout])
    (first,) = read_metrics(tmp_path / "run")
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == 0.0


@pytest.mark.parametrize("tuner", [[], ["tuner=lora", "parallel.tp=2", "train.lr=1e-2"]], ids=["full", "lora-tp2"])
def test_dpo_learns_the_preference_and_leaves_the_reference_unchanged(tmp_path, tiny_hf, tuner):
    # With LoRA the reference is the policy with its adapters disabled (no second copy of the weights).
    result = tmp_path / "result.json"
    overrides = [*_base(tiny_hf, tmp_path / "run"), "train.train_iters=30", "train.lr=1e-3", "train.max_epochs=null",
                 *tuner]
    proc = subprocess.run(launch_cmd(2, [str(result), *overrides], script=WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = read_metrics(tmp_path / "run")
    late = [r["rewards/accuracies"] for r in rows[-5:]]
    assert sum(late) / len(late) > 0.9, late
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    checked = json.loads(result.read_text())
    assert checked["reference_unchanged"] and checked["reference_params"] > 0


def test_precomputed_reference_gives_the_same_run(tmp_path, tiny_hf):
    base = [*_base(tiny_hf, None)[:-1], "train.train_iters=3", "train.lr=1e-3"]
    live, pre = tmp_path / "live", tmp_path / "pre"
    run_train(2, [*base, f"train.output_dir={live}"])
    run_train(2, [*base, f"train.output_dir={pre}", "task.precompute_ref=true"])
    assert (pre / "ref_logps_train.pt").exists()
    live_rows, pre_rows = read_metrics(live), read_metrics(pre)
    assert [r["iteration"] for r in live_rows] == [r["iteration"] for r in pre_rows] == [1, 2, 3]
    for a, b in zip(live_rows, pre_rows):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert abs(a[key] - b[key]) < 1e-5, (a["iteration"], key, a[key], b[key])
        # the same gradients too, not only the same losses
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a["iteration"], a["grad_norm"],
                                                                           b["grad_norm"])


def test_kto_starts_at_its_closed_form_value_and_separates_the_labels(tmp_path, tiny_hf):
    # Policy = reference: every ratio and the KL estimate are 0, so each example's loss is w * (1 - sigmoid(0)).
    run_train(2, [*_base(tiny_hf, tmp_path / "run", "kto", "kto"), "train.train_iters=20", "train.lr=1e-3",
                  "train.max_epochs=null", "task.desirable_weight=1.0", "task.undesirable_weight=1.0"])
    rows = read_metrics(tmp_path / "run")
    assert abs(rows[0]["loss"] - 0.5) < 1e-6 and rows[0]["kl"] == 0.0
    late = rows[-5:]
    assert all(r["rewards/chosen"] > 0 > r["rewards/rejected"] for r in late), late
    assert sum(r["loss"] for r in late) / 5 < 0.4
    # The KL estimate (clamped at 0, so never negative) follows the policy away from the reference: a KL taken
    # from the wrong rows, or never updated, would stay 0.
    assert max(r["kl"] for r in rows[1:]) > 0.1, [r["kl"] for r in rows]


def test_reward_model_learns_and_exports_as_hf_sequence_classification(tmp_path, tiny_hf):
    import torch

    result, run = tmp_path / "result.json", tmp_path / "run"
    overrides = [*_base(tiny_hf, run, "rm"), "train.train_iters=20", "train.lr=1e-3", "train.max_epochs=null",
                 "parallel.tp=2"]
    proc = subprocess.run(launch_cmd(2, [str(result), *overrides], script=RM_WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = read_metrics(run)
    assert rows[-1]["rewards/accuracies"] > 0.9 and rows[-1]["loss"] < rows[0]["loss"]

    (export,) = (run / "hf").iterdir()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(export).float().eval()
    assert type(model).__name__ == "Qwen3ForSequenceClassification" and model.config.num_labels == 1
    scored = json.loads(result.read_text())
    with torch.no_grad():
        hf = [model(torch.tensor([ids])).logits[0, 0].item() for ids in scored["tokens"]]
    assert len(hf) == len(scored["scores"]) == 8  # the first 4 pairs: their chosen rows, then their rejected rows
    assert max(abs(a - b) for a, b in zip(hf, scored["scores"])) < 1e-4, (hf, scored["scores"])

    # The export starts a new reward run: its head is loaded (score.weight), not drawn again.
    again = tmp_path / "again"
    run_train(2, [*_base(export, again, "rm"), "train.train_iters=1", "train.lr=0", "train.min_lr=0"])
    (first,) = read_metrics(again)
    assert first["rewards/accuracies"] > 0.9


@pytest.mark.parametrize("task,data,figure", [("dpo", "prefs", "rewards/margins"), ("kto", "kto", "kl"),
                                              ("rm", "prefs", "rewards/margins")])
def test_context_parallel_gives_the_one_rank_run(tmp_path, tiny_hf, task, data, figure):
    """cp=2 (Ulysses): sequence sums over both CP ranks, the reward at whichever rank holds the last token,
    pairs counted once: the same losses, figures and gradient norms as one rank, from the same weights."""
    base = [*_base(tiny_hf, None, task, data)[:-1], "train.train_iters=3", "train.lr=1e-3"]
    one, cp2 = tmp_path / "one", tmp_path / "cp2"
    run_train(1, [*base, f"train.output_dir={one}"])
    run_train(2, [*base, f"train.output_dir={cp2}", "parallel.cp=2"])
    a_rows, b_rows = read_metrics(one), read_metrics(cp2)
    assert [r["iteration"] for r in a_rows] == [r["iteration"] for r in b_rows] == [1, 2, 3]
    for a, b in zip(a_rows, b_rows):
        for key in ("loss", figure):
            assert abs(a[key] - b[key]) < 1e-5, (a["iteration"], key, a[key], b[key])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a["iteration"], a["grad_norm"],
                                                                           b["grad_norm"])
    assert a_rows[-1]["loss"] != a_rows[0]["loss"]  # it trained


REFERENCE_FREE = ("cpo", "simpo", "orpo")
LORA_FREE = ("orpo",)
# Each task's defaults: CPO's NLL weight 1, SimPO's margin, ORPO's lambda (the formulas' other settings are
# checked against TRL in tests/test_reference_free_losses.py).
FREE_SETTINGS = ["train.train_iters=3", "train.lr=1e-3", "train.global_batch_size=4", "train.micro_batch_size=1",
                 "train.save_at_end=false"]


# GKD rides along on the SFT rows: off-policy (lmbda 0: sampled completions depend on how rows are grouped),
# the teacher a random model of its own (the student starts from tiny_hf), so the divergence is far from 0.
GKD = ["data=sft", "train.seq_length=128", "data.truncation=drop", "task.lmbda=0", "task.beta=0.3",
       "task.temperature=0.8"]


def _gkd_item(teacher, *own):
    return "@".join(["gkd", *GKD, f"task.teacher.model={teacher}", "task.teacher.tokenizer=byte", *own])


def _train_each_free_task(tmp, tiny_hf, teacher, nproc, layout, extra=()):
    """One torchrun job training CPO, SimPO, ORPO and GKD (unless ``teacher`` is None) in turn (dpo_worker
    --tasks), then the ``extra`` items (their own train.output_dir); per-task metrics rows."""
    out = tmp / "runs"
    overrides = [o for o in _base(tiny_hf, None) if not o.startswith(("task=", "train.output_dir="))]
    overrides += [*FREE_SETTINGS, *layout]
    items = [*REFERENCE_FREE, *([_gkd_item(teacher)] if teacher else []), *extra]
    proc = subprocess.run(launch_cmd(nproc, [str(tmp / "unused.json"), f"--tasks={','.join(items)}", str(out),
                                             *overrides], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {task: read_metrics(out / task) for task in (i.split("@")[0] for i in items)}


def _same_reference_free_runs(one_rank, got):
    """CPO, SimPO, ORPO: the same losses, figures and gradient norms as the one-rank run, and they train."""
    for task in REFERENCE_FREE:
        want, rows = one_rank[task], got[task]
        assert [r["iteration"] for r in rows] == [r["iteration"] for r in want] == [1, 2, 3], task
        for a, b in zip(want, rows):
            for key in ("loss", "rewards/margins", "rewards/chosen", "nll_loss", "logps/rejected"):
                assert abs(a[key] - b[key]) < 1e-5, (task, a["iteration"], key, a[key], b[key])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (task, a["grad_norm"], b["grad_norm"])
        assert want[0]["rewards/chosen"] != 0.0 and want[-1]["loss"] < want[0]["loss"], (task, want)


@pytest.fixture(scope="module")
def teacher_hf(tmp_path_factory):
    """Another random tiny Qwen3, narrower and shallower, with tiny_hf's vocabulary: GKD's teacher."""
    from tests.multiproc.test_hf_load import _save_tiny

    folder = tmp_path_factory.mktemp("teacher")
    _save_tiny("qwen3", folder, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    return folder


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory):
    """A random tiny Qwen3-MoE (6 experts, top 2, 2 layers): the reference-free tasks under EP=2."""
    from tests.multiproc.test_hf_load import _MOE, _save_tiny

    folder = tmp_path_factory.mktemp("moe")
    _save_tiny("qwen3_moe", folder, **{**_MOE, "norm_topk_prob": True, "num_hidden_layers": 2})
    return folder


def _moe_items(moe_hf, out, *layout):
    """CPO, SimPO, ORPO items training the MoE model (riding along in another job; output ``out/<task>-moe``)."""
    return ["@".join([task, "+model=qwen3_moe", f"model.pretrained={moe_hf}", *layout,
                      f"train.output_dir={out / (task + '-moe')}"]) for task in REFERENCE_FREE]


def _moe_rows(out):
    return {task: read_metrics(out / (task + "-moe")) for task in REFERENCE_FREE}


@pytest.fixture(scope="module")
def free_one_rank(tmp_path_factory, tiny_hf, teacher_hf, moe_hf):
    # and GKD fully on-policy with the student's own starting weights as the teacher (output folder "self")
    on_policy = "@".join(["gkd", *GKD[:3], "task.lmbda=1", "task.max_new_tokens=12", "train.train_iters=1",
                          f"task.teacher.model={tiny_hf}", "task.teacher.tokenizer=byte",
                          f"train.output_dir={tmp_path_factory.getbasetemp() / 'free1-self'}"])
    # and with seq_kd: the data's replies replaced by the teacher's greedy ones
    seq_kd = _gkd_item(teacher_hf, "task.seq_kd=true", "task.max_new_tokens=12",
                       f"train.output_dir={tmp_path_factory.getbasetemp() / 'free1-seq_kd'}")
    # and the three reference-free tasks on the MoE model (key "moe": the one-rank run EP=2 must give)
    moe_out = tmp_path_factory.mktemp("free1-moe")
    rows = _train_each_free_task(tmp_path_factory.mktemp("free1"), tiny_hf, teacher_hf, 1, [],
                                 [on_policy, seq_kd, *_moe_items(moe_hf, moe_out)])
    rows["moe"] = _moe_rows(moe_out)
    rows["self"] = read_metrics(tmp_path_factory.getbasetemp() / "free1-self")
    rows["seq_kd"] = read_metrics(tmp_path_factory.getbasetemp() / "free1-seq_kd")
    return rows


def test_gkd_on_the_students_own_samples_against_itself_is_zero(free_one_rank):
    """lmbda 1: every completion is the student's own, sampled by the rollout engine; a teacher with the
    student's weights then gives divergence 0 (closed form), every sample counted on-policy."""
    (first,) = free_one_rank["self"]
    assert first["on_policy"] == 1.0 and abs(first["loss"]) < 1e-6, first
    assert free_one_rank["gkd"][0]["on_policy"] == 0.0  # lmbda 0: the data's replies


@pytest.mark.parametrize("nproc,layout", [(2, ["parallel.tp=2"]),
                                          (4, ["parallel.pp=2", "parallel.distributed_optimizer=true"]),
                                          (2, ["parallel.cp=2"])],
                         ids=["tp2", "pp2-dp2-distopt", "cp2-lora-and-moe-ep2"])
def test_reference_free_tasks_and_gkd_give_the_one_rank_run_under_each_layout(tmp_path, tiny_hf, teacher_hf, moe_hf,
                                                                              free_one_rank, nproc, layout):
    """CPO, SimPO, ORPO: 3 steps under TP=2, and PP=2 x DP=2 with the distributed optimizer (one 4-rank job:
    a launch less), report the one-rank losses, figures and gradient norms within 1e-5, and they train (no
    reference: from the start the rewards differ from 0, unlike DPO's)."""
    # Under TP=2 the teacher also runs on a layout of its own: TP=1 beside the student's TP=2, and TP=2 beside
    # a student on TP=1 x DP=2 (its group gathers both ranks' rows; logits go back to each rank's shard).
    # Also under TP=2: seq_kd (the teacher's greedy replies, generated on TP=2), and a LoRA student (its adapters
    # start at 0: the first step is the full model's).
    # Under CP=2 (GKD refuses it: one line, tested elsewhere) ORPO also trains a LoRA student (the adapters'
    # path is the tasks' shared one: one run of the three, the one with both NLL and pair terms), and, in
    # the same job, the MoE model with its experts split over the two ranks (EP=2 x DP=2, no CP).
    own = {"teacher-tp1": ["task.teacher.tp=1"], "student-tp1": ["parallel.tp=1", "task.teacher.tp=2"],
           "seq_kd": ["task.seq_kd=true", "task.max_new_tokens=12"], "lora": ["tuner=lora", "train.lr=1e-2"]}
    cp = layout == ["parallel.cp=2"]
    extra = [_gkd_item(teacher_hf, *o, f"train.output_dir={tmp_path / name}") for name, o in own.items()] \
        if layout == ["parallel.tp=2"] else []
    if cp:
        own = {f"{task}-lora": [] for task in LORA_FREE}
        extra = ["@".join([task, "tuner=lora", "train.lr=1e-2", f"train.output_dir={tmp_path / (task + '-lora')}"])
                 for task in LORA_FREE] + _moe_items(moe_hf, tmp_path, "parallel.cp=1", "parallel.ep=2")
    got = _train_each_free_task(tmp_path, tiny_hf, None if cp else teacher_hf, nproc, layout, extra)
    got.update({name: read_metrics(tmp_path / name) for name in own if extra})
    _same_reference_free_runs(free_one_rank, got)
    assert "log_odds_ratio" in got["orpo"][0] and "log_odds_chosen" in got["orpo"][0]
    # GKD: the divergence (its loss), vocabulary-parallel under TP=2, equals the one-rank run's
    for name in ("gkd", "teacher-tp1", "student-tp1", "seq_kd"):
        want, rows = free_one_rank["seq_kd" if name == "seq_kd" else "gkd"], got.get(name)
        if rows is None:
            continue
        assert [r["iteration"] for r in rows] == [r["iteration"] for r in want] == [1, 2, 3], name
        for a, b in zip(want, rows):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (name, a["iteration"], a["loss"], b["loss"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (name, a["grad_norm"], b["grad_norm"])
    assert ("student-tp1" in got) == (layout == ["parallel.tp=2"]) and ("gkd" in got) != cp
    if cp:
        _same_reference_free_runs(free_one_rank["moe"], _moe_rows(tmp_path))
    for task in LORA_FREE if cp else ():  # LoRA adapters start at 0: the first step is the full model's
        full, lora = free_one_rank[task], got[f"{task}-lora"]
        assert abs(lora[0]["loss"] - full[0]["loss"]) < 1e-5, (task, lora[0], full[0])
        assert lora[-1]["loss"] < lora[0]["loss"] and abs(lora[1]["loss"] - full[1]["loss"]) > 1e-4, (task, lora)
    if "lora" in got:
        full, lora = free_one_rank["gkd"], got["lora"]
        assert abs(lora[0]["loss"] - full[0]["loss"]) < 1e-5, (lora[0], full[0])
        assert lora[-1]["loss"] < lora[0]["loss"] and abs(lora[1]["loss"] - full[1]["loss"]) > 1e-4, lora
    # seq_kd trains on other completions than the data's replies
    assert abs(free_one_rank["seq_kd"][0]["loss"] - free_one_rank["gkd"][0]["loss"]) > 1e-4
    assert want[0]["loss"] > 1e-3 and want[-1]["loss"] < want[0]["loss"], want  # random models: close, not equal

