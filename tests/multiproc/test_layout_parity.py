"""A layout changes where computation happens, never what is computed.

Each layout starts from one checkpoint of initial weights (written by a
1-process run with train.train_iters=0 and loaded with model.load, so
megatron-core reshards it), trains 3 steps on the same global batches with
dropout off in fp32, and must report the same per-step losses as the run with
every parallel size 1, within 1e-5.
"""
from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_train

STEPS = 3
COMMON = ["train.precision=fp32", f"train.train_iters={STEPS}", "train.global_batch_size=8",
          "train.micro_batch_size=1", "train.seq_length=32", "train.save_at_end=false",
          "train.lr=1e-3", "train.lr_warmup_iters=1",
          # One padded vocabulary for TP=1 and TP=2 so the embedding shapes agree.
          "model.make_vocab_size_divisible_by=256", "logging.tensorboard=false"]
DENSE = ["+model=qwen3", "model.num_layers=4"]
# With the router's load-balancing loss (megatron-core's Switch form, reported as moe_aux_loss).
MOE = ["+model=qwen3_moe", "model.num_layers=2", "model.moe_aux_loss_coeff=0.01"]


def _init_and_baseline(tmp, model):
    init = tmp / "init"
    run_train(1, [*model, *COMMON, "train.train_iters=0", "train.save_at_end=true", f"train.output_dir={init}"])
    base = tmp / "base"
    run_train(1, [*model, *COMMON, f"model.load={init}", f"train.output_dir={base}"])
    return init, read_metrics(base)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _init_and_baseline(tmp_path_factory.mktemp("dense"), DENSE)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _init_and_baseline(tmp_path_factory.mktemp("moe"), MOE)


def _check(tmp_path, model, init, baseline, layout, nproc=2):
    out = tmp_path / "run"
    start = [f"model.load={init}"] if init else []  # else model.pretrained in ``model``
    run_train(nproc, [*model, *COMMON, *layout, *start, f"train.output_dir={out}"])
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in baseline] == list(range(1, STEPS + 1))
    assert rows[0]["loss"] > 1.0  # a real cross-entropy, not an empty batch
    for step, (got, want) in enumerate(zip(rows, baseline), start=1):
        assert abs(got["loss"] - want["loss"]) < 1e-5, f"step {step}: {layout} loss {got['loss']} vs {want['loss']}"
        # The gradient norm too: a gradient counted twice (or once too few) over TP/PP/DP ranks shows here.
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), \
            f"step {step}: {layout} grad norm {got['grad_norm']} vs all-ones {want['grad_norm']}"
        for key in ("mtp_loss", "moe_aux_loss"):  # the losses reported on their own, where the model has them
            assert (key in got) == (key in want), (step, key)
            if key in want:
                assert abs(got[key] - want[key]) < 1e-5, f"step {step}: {layout} {key} {got[key]} vs {want[key]}"
    assert rows[-1]["loss"] < rows[0]["loss"]  # and it trains


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sp=true"],
    ["parallel.pp=2"],
    ["parallel.pp=2", "parallel.vpp=2"],
    ["parallel.distributed_optimizer=true"],
    ["parallel.cp=2"],
], ids=["tp2", "tp2-sp", "pp2", "pp2-vpp2", "dp2-distopt", "cp2-a2a"])
def test_dense_layout_matches_single_rank(tmp_path, dense, layout):
    init, baseline = dense
    _check(tmp_path, DENSE, init, baseline, layout)


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2", "parallel.cp=2"],  # 1 query group per TP rank: K/V repeated for the CP ranks
    ["parallel.pp=2", "parallel.cp=2"],
], ids=["tp2-cp2", "pp2-cp2"])
def test_context_parallel_with_tp_or_pp_on_four_ranks_matches_single_rank(tmp_path, dense, layout):
    init, baseline = dense
    _check(tmp_path, DENSE, init, baseline, layout, nproc=4)


def test_moe_expert_parallel_matches_single_rank(tmp_path, moe):
    init, baseline = moe
    # A router near uniform at initialisation (weights of std 0.02): E * sum_i f_i * P_i is close to E * E / E^2 = 1
    # (a figure summed over micro-batches, layers or DP ranks instead of averaged would be a multiple of it).
    assert 0.95 < baseline[0]["moe_aux_loss"] < 1.2, baseline[0]
    _check(tmp_path, MOE, init, baseline, ["parallel.ep=2"])


# DeepSeek-V3 style (families/deepseek.py): MLA with a query LoRA, one dense first layer, then a shared expert and
# 8 routed ones under sigmoid routing with the expert bias updated every step (aux-loss-free balancing), and one
# multi-token-prediction layer whose loss is part of the backward.
DEEPSEEK = ["+model=deepseek", "model.moe_expert_bias_update_rate=0.01", "model.mtp_loss_weight=0.3",
            "model.moe_aux_loss_coeff=0.01"]
BIAS_RATE = 0.01


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """The HF folder (random weights, MTP layer stored as model.layers.4) and the one-rank run's rows and export."""
    from tests.multiproc.test_hf_load import DEEPSEEK_MTP, save_tiny_nextn_mtp

    root = tmp_path_factory.mktemp("deepseek")
    save_tiny_nextn_mtp("deepseek_v3", root / "hf", dict(DEEPSEEK_MTP, num_hidden_layers=4))
    model = [*DEEPSEEK, f"model.pretrained={root / 'hf'}"]
    base = root / "base"
    run_train(1, [*model, *COMMON, "train.save_at_end=true", "train.save_hf=true", f"train.output_dir={base}"])
    return model, read_metrics(base), root


def test_deepseek_v3_with_mtp_and_expert_bias_matches_single_rank_on_tp_pp_ep_dp(tmp_path, deepseek):
    """8 ranks: TP=2 with SP, PP=2 (the MTP layer on the last stage), EP=2 and DP=2 with the distributed optimizer;
    loss, MTP loss, load-balancing loss and grad norm per step equal the one-rank run's. Without the workarounds
    TP=2+SP alone moved the grad norm at step 1 by 4e-6 relative (MLA's rotary key, models/mla_rope_grad.py) and
    by 3e-4 (the load-balancing loss's token count, models/moe_aux_scale.py)."""
    from safetensors.torch import load_file

    model, baseline, root = deepseek
    _check(tmp_path, model, None, baseline, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "parallel.ep=2",
                                             "parallel.etp=1", "parallel.distributed_optimizer=true"], nproc=8)
    assert all(row["mtp_loss"] > 1.0 for row in baseline)
    # The expert bias really moved: after 3 steps each entry is the checkpoint's plus k x rate, |k| <= 3.
    before = load_file(root / "hf" / "model.safetensors")
    after = load_file(next((root / "base" / "hf").iterdir()) / "model.safetensors")
    names = [k for k in before if k.endswith("e_score_correction_bias")]
    assert len(names) == 4  # 3 routed decoder layers and the MTP layer
    for name in names:
        steps = (after[name].double() - before[name].double()) / BIAS_RATE
        assert (steps - steps.round()).abs().max() < 1e-4 and steps.round().abs().max() <= 3, (name, steps)
        assert steps.abs().max() >= 1, name


# OLMo 2 (families/olmo2.py): norms after attention and MLP, and a q/k norm over whole projections whose weight
# is split over TP with the heads (models/post_norm.py).
@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    """A 2-layer OLMo 2 saved by transformers (random norm weights) and the one-rank run's rows."""
    from tests.multiproc.test_hf_load import _save_tiny

    root = tmp_path_factory.mktemp("olmo2")
    _save_tiny("olmo2", root / "hf", num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = ["+model=olmo2", f"model.pretrained={root / 'hf'}"]
    run_train(1, [*model, *COMMON, f"train.output_dir={root / 'base'}"])
    return model, read_metrics(root / "base")


def test_olmo2_tp2_sp_matches_single_rank(tmp_path, olmo2):
    """Without models/post_norm.py's _keep_split_norm_grads, megatron-core 0.16.1 summed the TP-split q/k norm
    weights' gradients over TP: this run's grad norm was 7.5e-5 off (relative) at step 3."""
    model, baseline = olmo2
    _check(tmp_path, model, None, baseline, ["parallel.tp=2", "parallel.sp=true"])


def test_bf16_mixed_precision_tracks_fp32(tmp_path, dense):
    """bf16 params (Float16Module) with fp32 main params: same first loss as fp32 to bf16 accuracy."""
    init, baseline = dense
    out = tmp_path / "bf16"
    run_train(1, [*DENSE, *COMMON, "train.precision=bf16", f"model.load={init}", f"train.output_dir={out}"])
    losses = [r["loss"] for r in read_metrics(out)]
    assert abs(losses[0] - baseline[0]["loss"]) < 2e-2
    assert losses[0] != baseline[0]["loss"]  # it really ran in bf16
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("nproc,layout", [(2, ["parallel.cp=2"]), (4, ["parallel.cp=2"])],
                         ids=["dp2-to-cp2", "dp2-to-cp2xdp2"])
def test_resume_under_another_context_parallel_split_continues_the_run(tmp_path, dense, nproc, layout):
    """A checkpoint of a DP=2 run (distributed optimizer) continued with cp=2 on 2 ranks (DP x CP stays 2) or
    on 4 ranks (DP x CP 2 -> 4: megatron-core reshards the optimizer state): the later steps are the
    uninterrupted single-rank run's, Adam moments included."""
    import shutil

    init, baseline = dense
    first = tmp_path / "first"
    common = [*DENSE, *COMMON, "parallel.distributed_optimizer=true", f"model.load={init}"]
    run_train(2, [*common, "train.train_iters=1", "train.save_at_end=true", f"train.output_dir={first}"])
    out = tmp_path / "resumed"
    shutil.copytree(first, out)
    proc = run_train(nproc, [*common, *layout, f"train.output_dir={out}"])
    assert "resumed from" in proc.stdout, proc.stdout[-2000:]
    rows = [r for r in read_metrics(out) if r["iteration"] > 1]
    assert [r["iteration"] for r in rows] == list(range(2, STEPS + 1))
    for got, want in zip(rows, baseline[1:]):
        assert abs(got["loss"] - want["loss"]) < 1e-5, (got["iteration"], got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
