"""CPO, SimPO and ORPO against TRL's own functions (its CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss,
called unbound on a stub holding the attributes they read), and the tasks' NLL term against torch's
cross-entropy."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # a test dependency (setup.py [test])
from trl.experimental.orpo.orpo_trainer import ORPOTrainer

from megatron_swift.training.reference_free_losses import cpo_loss, orpo_loss, simpo_loss

CPU = SimpleNamespace(device=torch.device("cpu"))


def _logps(n=16, seed=0, mean=False):
    g = torch.Generator().manual_seed(seed)
    scale = 1.5 if mean else 30.0  # averaged log-probs are small; summed ones large
    chosen = -torch.rand(n, generator=g, dtype=torch.float64) * scale - 1e-3
    rejected = -torch.rand(n, generator=g, dtype=torch.float64) * scale - 1e-3
    return chosen.float(), rejected.float()


def _trl_cpo(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.0):
    stub = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                           simpo_gamma=simpo_gamma, accelerator=CPU)
    return lambda c, r: CPOTrainer.cpo_loss(stub, c, r)


def _close(a, b):
    assert torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.05, 0.2), (1.0, 0.4)])
def test_cpo_equals_trl_sigmoid(beta, eps):
    chosen, rejected = _logps(seed=int(beta * 100))
    out = cpo_loss(chosen, rejected, beta, eps)
    losses, rc, rr = _trl_cpo("sigmoid", beta, eps)(chosen, rejected)
    _close(out["losses"], losses)
    _close(out["rewards/chosen"], rc)
    _close(out["rewards/rejected"], rr)
    assert out["rewards/accuracies"].tolist() == (rc > rr).float().tolist()


@pytest.mark.parametrize("beta,ratio,eps", [(2.0, 0.5, 0.0), (2.5, 0.3, 0.0), (10.0, 0.0, 0.0), (1.0, 1.6, 0.1)])
def test_simpo_equals_trl_simpo(beta, ratio, eps):
    chosen, rejected = _logps(seed=int(beta * 10 + ratio * 100), mean=True)
    out = simpo_loss(chosen, rejected, beta, ratio, eps)
    # TRL's simpo_gamma is the margin itself: gamma = gamma_beta_ratio * beta.
    losses, rc, rr = _trl_cpo("simpo", beta, eps, simpo_gamma=ratio * beta)(chosen, rejected)
    _close(out["losses"], losses)
    _close(out["rewards/chosen"], rc)
    _close(out["rewards/rejected"], rr)


@pytest.mark.parametrize("lam", [0.1, 0.25, 1.0, 2.0])
def test_orpo_equals_trl_odds_ratio_loss(lam):
    chosen, rejected = _logps(seed=int(lam * 100), mean=True)
    # both branches of log(1 - exp(x)): near 0 and far below -log 2
    chosen[0], rejected[0], chosen[1], rejected[1] = -1e-4, -20.0, -0.69, -0.70
    out = orpo_loss(chosen, rejected, lam)
    stub = SimpleNamespace(beta=lam, accelerator=CPU)
    terms, rc, rr, ratio_mean, log_odds_mean = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    _close(out["losses"], -terms)  # TRL's loss is nll - terms.mean(): our term is its negative
    _close(out["log_odds_ratio"].mean(), ratio_mean)
    _close(out["log_odds_chosen"].mean(), log_odds_mean)
    _close(out["rewards/chosen"], rc)
    _close(out["rewards/rejected"], rr)


def _batch(logits, labels):
    """The tasks' loss_func inputs: per-token CE [rows, seq] and the loss mask."""
    mask = (labels != -100)
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
    return SimpleNamespace(loss_mask=mask.float()), ce


@pytest.mark.parametrize("task,kw", [("cpo", dict(beta=0.2, alpha=0.7, label_smoothing=0.1)),
                                     ("simpo", dict(beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0, alpha=0.3)),
                                     ("orpo", dict(lambda_=0.5))])
def test_task_loss_is_trls_with_the_nll_of_each_chosen_reply(task, kw):
    """One pair per micro-batch, where TRL's token-mean NLL over the micro-batch is the pair's mean NLL: the
    task's pair loss equals TRL's total loss computed from logits (its get_batch_logps and cross-entropy)."""
    from megatron_swift.tasks import task_class

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :2], labels[1, :3] = -100, -100  # prompts carry no loss; the sides differ in length
    batch, ce = _batch(logits, labels)
    loss, pairs, report = task_class(task)(SimpleNamespace(**kw)).loss_func(batch, ce)
    assert pairs.item() == 1

    trl = ORPOTrainer if task == "orpo" else CPOTrainer
    logps = _trl_logps(trl, logits, labels, averaged=task != "cpo")
    nll = F.cross_entropy(logits[0][labels[0] != -100], labels[0][labels[0] != -100])
    if task == "orpo":
        stub = SimpleNamespace(beta=kw["lambda_"], accelerator=CPU)
        want = nll - ORPOTrainer.odds_ratio_loss(stub, logps[:1], logps[1:])[0].mean()
    else:
        loss_type = "sigmoid" if task == "cpo" else "simpo"
        gamma = kw.get("gamma_beta_ratio", 0.0) * kw["beta"]
        terms = _trl_cpo(loss_type, kw["beta"], kw["label_smoothing"], gamma)(logps[:1], logps[1:])[0]
        want = terms.mean() + kw["alpha"] * nll
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert report["nll_loss"][0].item() == pytest.approx(nll.item(), abs=1e-6)


def _trl_logps(trl, logits, labels, averaged):
    """TRL's get_batch_logps on our (already aligned) logits/labels: it drops the last logit and the first
    label, so pad one step on each side."""
    padded_logits = torch.cat([logits, torch.zeros(2, 1, logits.shape[-1])], dim=1)
    padded_labels = torch.cat([torch.full((2, 1), -100), labels], dim=1)
    return trl.get_batch_logps(padded_logits, padded_labels, average_log_prob=averaged)


@pytest.mark.parametrize("overrides,line", [
    (["task=simpo", "task.beta=0"], "task.beta=0.0 must be > 0"),
    (["task=cpo", "task.label_smoothing=0.5"], "task.label_smoothing=0.5 must be in [0, 0.5)"),
    (["task=cpo", "task.alpha=-1"], "task.alpha=-1.0 must be >= 0"),
    (["task=orpo", "task.lambda_=-0.1"], "task.lambda_=-0.1 must be >= 0"),
    (["task=orpo", "data.packing=true"], "task=orpo does not support data.packing or data.streaming yet"),
])
def test_bad_settings_are_one_line_naming_the_key(overrides, line):
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=qwen3", "data=prefs", *overrides]), 1)
    assert e.value.problems == [line]


def test_no_starting_weights_needed():
    """Unlike DPO (its reference is the starting weights), these train from any weights, random included."""
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import validate

    for task in ("cpo", "simpo", "orpo"):
        validate(compose(["+model=qwen3", "data=prefs", f"task={task}"]), 1)
