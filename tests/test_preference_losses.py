"""Preference losses against values computed by hand from given log-probabilities."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_swift.training.preference_losses import dpo_loss, kto_kl_estimate, kto_loss, reward_pair_loss

PC, PR, RC, RR = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
    torch.tensor([-3.5, -3.0])


def _log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_sigmoid_with_label_smoothing(eps):
    beta = 0.5
    out = dpo_loss(PC, PR, RC, RR, beta, label_smoothing=eps)
    # pair 0: (-3 - -4) - (-3.5 - -3.5) = 1 ; pair 1: (-5 - -2) - (-4 - -3) = -2
    for i, margin in enumerate([1.0, -2.0]):
        z = beta * margin
        want = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        assert out["losses"][i].item() == pytest.approx(want, abs=1e-6)
    assert out["rewards/chosen"].tolist() == pytest.approx([0.25, -0.5])  # 0.5 * (-3 - -3.5), 0.5 * (-5 - -4)
    assert out["rewards/rejected"].tolist() == pytest.approx([-0.25, 0.5])  # 0.5 * (-4 - -3.5), 0.5 * (-2 - -3)
    assert out["rewards/margins"].tolist() == pytest.approx([0.5, -1.0])
    assert out["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_dpo_at_reference_is_log_2():
    out = dpo_loss(PC, PR, PC.clone(), PR.clone(), beta=0.1)
    assert out["losses"].tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert out["rewards/accuracies"].tolist() == [0.0, 0.0]


def test_ipo():
    beta = 0.25  # 1 / (2 beta) = 2
    out = dpo_loss(PC, PR, RC, RR, beta, loss_type="ipo")
    assert out["losses"].tolist() == pytest.approx([(1 - 2) ** 2, (-2 - 2) ** 2])


def test_kto_with_weights_and_kl():
    policy, ref = torch.tensor([-2.0, -6.0, -1.0]), torch.tensor([-3.0, -5.0, -1.5])
    desirable = torch.tensor([True, False, True])
    kl = kto_kl_estimate(policy, ref)
    assert kl.item() == pytest.approx(max(0.0, ((1.0) + (-1.0) + 0.5) / 3))
    beta, wd, wu = 0.1, 1.0, 1.5
    out = kto_loss(policy, ref, desirable, kl, beta, wd, wu)
    k = kl.item()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [wd * (1 - sig(beta * (1.0 - k))), wu * (1 - sig(beta * (k - -1.0))), wd * (1 - sig(beta * (0.5 - k)))]
    assert out["losses"].tolist() == pytest.approx(want, abs=1e-7)
    assert out["rewards"].tolist() == pytest.approx([0.1, -0.1, 0.05])
    assert kto_kl_estimate(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0  # clamped


def test_reward_pair_loss_with_margin():
    out = reward_pair_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]))
    assert out["losses"].tolist() == pytest.approx([-_log_sigmoid(0.5), -_log_sigmoid(-1.0)])
    assert out["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        dpo_loss(PC, PR, RC, RR, 0.1, loss_type="hinge2")


def _task(**kw):
    from types import SimpleNamespace

    from megatron_swift.tasks.dpo import DPOTask

    cfg = dict(beta=0.5, label_smoothing=0.0, loss_type="sigmoid", sft_weight=0.0)
    cfg.update(kw)
    return DPOTask(SimpleNamespace(**cfg), reference=[], seq_length=4, micro_batch_size=2)


def _pair_batch():
    from megatron_swift.data.sampler import Batch

    # A micro-batch of two pairs: rows (chosen 0, chosen 1, rejected 0, rejected 1) of 4 positions, per-token CE
    # and which positions carry loss. Two pairs, so a count of micro-batches (1) and of pairs (2) differ.
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    batch = Batch(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long), mask,
                  torch.arange(4).expand(4, 4))
    batch.ref_logps = torch.tensor([-2.0, -1.0, -2.0, -2.0])
    ce = torch.tensor([[9.0, 0.5, 0.5, 9.0], [9.0, 9.0, 1.5, 0.5], [9.0, 1.0, 1.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    # policy log-probs: chosen -1.0 (2 tokens) and -2.0 (2 tokens); rejected -3.0 (3 tokens) and -1.0 (4 tokens)
    return batch, ce


def test_dpo_task_loss_sums_over_completion_tokens_and_counts_pairs():
    batch, ce = _pair_batch()
    loss, pairs, report = _task(sft_weight=0.2).loss_func(batch, ce)
    margins = [(-1.0 - -3.0) - (-2.0 - -2.0), (-2.0 - -1.0) - (-1.0 - -2.0)]  # 2 and -2
    sft = [1.0 / 2, 2.0 / 2]  # sft_weight times each chosen row's NLL per token
    want = sum(-_log_sigmoid(0.5 * m) + 0.2 * s for m, s in zip(margins, sft))
    assert loss.item() == pytest.approx(want, abs=1e-6) and pairs.item() == 2
    # [sum over the micro-batch's pairs, pairs]
    assert report["logps/chosen"].tolist() == [-3.0, 2.0] and report["logps/rejected"].tolist() == [-4.0, 2.0]
    # rewards 0.5 * (policy - reference): chosen 0.5, -0.5; rejected -0.5, 0.5
    assert report["rewards/chosen"].tolist() == [0.0, 2.0] and report["rewards/rejected"].tolist() == [0.0, 2.0]
    assert report["rewards/margins"].tolist() == [0.0, 2.0]  # 1.0 + -1.0
    assert report["rewards/accuracies"].tolist() == [1.0, 2.0]
    assert report["loss"][0].item() == pytest.approx(want, abs=1e-6) and report["loss"][1].item() == 2


def test_dpo_task_ipo_uses_length_averaged_log_probs():
    batch, ce = _pair_batch()
    loss, pairs, _ = _task(loss_type="ipo", beta=0.25).loss_func(batch, ce)
    margins = [(-1.0 / 2 - -3.0 / 3) - (-2.0 / 2 - -2.0 / 3), (-2.0 / 2 - -1.0 / 4) - (-1.0 / 2 - -2.0 / 4)]
    assert loss.item() == pytest.approx(sum((m - 2.0) ** 2 for m in margins), abs=1e-6) and pairs.item() == 2


def test_kto_task_loss_uses_the_kl_rows_and_splits_reports_by_label(monkeypatch):
    from types import SimpleNamespace

    from megatron_swift.tasks import kto

    monkeypatch.setattr(kto.ps, "get_data_parallel_group", lambda: None)  # one process: no gathering
    task = kto.KTOTask(SimpleNamespace(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0), reference=[],
                       seq_length=4, micro_batch_size=2)
    # Rows: 2 examples (desirable, undesirable), then their 2 KL rows; all 4 positions carry loss.
    from megatron_swift.data.sampler import Batch

    batch = Batch(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long),
                        torch.ones(4, 2), torch.arange(2).expand(4, 2))
    ce = torch.tensor([[0.5, 0.5], [2.0, 2.0], [1.0, 1.0], [1.5, 1.5]])  # policy log-probs -1, -4, -2, -3
    batch.ref_logps = torch.tensor([-2.0, -3.0, -3.0, -3.0])
    batch.desirable = torch.tensor([True, False])
    loss, examples, report = task.loss_func(batch, ce)
    kl = ((-2.0 - -3.0) + (-3.0 - -3.0)) / 2  # the KL rows' mean log-ratio: 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = 1.0 * (1 - sig(0.5 * ((-1.0 - -2.0) - kl))) + 2.0 * (1 - sig(0.5 * (kl - (-4.0 - -3.0))))
    assert loss.item() == pytest.approx(want, abs=1e-6) and examples.item() == 2
    assert report["kl"].tolist() == [pytest.approx(kl), 1.0]
    assert report["rewards/chosen"].tolist() == pytest.approx([0.5, 1.0])  # 0.5 * (-1 - -2), one desirable
    assert report["rewards/rejected"].tolist() == pytest.approx([-0.5, 1.0])


def test_reward_task_scores_the_last_real_token_with_margin_and_centring():
    from types import SimpleNamespace

    from megatron_swift.data.sampler import Batch
    from megatron_swift.tasks.rm import RewardTask

    task = RewardTask(SimpleNamespace(center_rewards_coefficient=0.1))
    batch = Batch(torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5),
                  torch.arange(5).expand(4, 5), lengths=torch.tensor([3, 5, 2, 4]), margin=torch.tensor([0.5, 0.0]))
    scores = torch.full((4, 5, 1), 99.0)  # any value not at a row's last real token must be ignored
    for row, value in enumerate([2.0, 0.0, 1.0, 1.0]):
        scores[row, batch.lengths[row] - 1, 0] = value
    loss, pairs, report = task.loss_func(batch, scores)
    want = (-_log_sigmoid(2.0 - 1.0 - 0.5) + 0.1 * (2.0 + 1.0) ** 2) + (-_log_sigmoid(0.0 - 1.0) + 0.1 * 1.0 ** 2)
    assert loss.item() == pytest.approx(want, abs=1e-6) and pairs.item() == 2
    assert report["rewards/accuracies"].tolist() == [1.0, 2.0]
    assert report["rewards/margins"].tolist() == pytest.approx([1.0 + -1.0, 2.0])
