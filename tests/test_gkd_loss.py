"""GKD's generalised JSD (training/gkd_loss.py) against TRL's GKDTrainer.generalized_jsd_loss and
torch.nn.functional.kl_div, values and the student's gradient, on full-vocabulary logits; padded columns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gkd.gkd_trainer import GKDTrainer  # a test dependency (setup.py [test])

from megatron_swift.training.gkd_loss import generalized_jsd, masked_mean


def _inputs(seed, vocab=37):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 5, vocab, generator=g) * 2).requires_grad_()
    teacher = torch.randn(3, 5, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (3, 5), generator=g)
    labels[0, :2], labels[2, :4] = -100, -100  # prompt positions carry no loss
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_equals_trl_generalized_jsd_loss_and_its_gradient(beta, temperature):
    student, teacher, labels = _inputs(int(beta * 10 + temperature * 100))
    want = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (want_grad,) = torch.autograd.grad(want, student)
    got = masked_mean(generalized_jsd(student, teacher, beta, temperature), labels != -100)
    (got_grad,) = torch.autograd.grad(got, student)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(got_grad, want_grad, atol=1e-6, rtol=0), (got_grad - want_grad).abs().max()
    assert got.item() > 0  # a real divergence (random logits differ)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_end_points_are_kl_div(beta):
    student, teacher = (x.detach().double() for x in _inputs(7)[:2])  # float64: rounding stays far below 1e-6
    s, t = F.log_softmax(student / 0.9, -1), F.log_softmax(teacher / 0.9, -1)
    # kl_div(input, target) = KL(target || input): beta 0 is KL(teacher || student), beta 1 KL(student || teacher)
    args = (s, t) if beta == 0 else (t, s)
    want = F.kl_div(*args, reduction="none", log_target=True).sum(-1)
    got = generalized_jsd(student, teacher, beta, 0.9)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_padding_columns_add_nothing(beta):
    """The padded vocabulary's -inf logits (models/vocab_mask.py): same divergence and gradient, no nan."""
    student, teacher, _ = _inputs(11)
    pad = torch.full((3, 5, 3), float("-inf"))
    padded = torch.cat([student, pad], -1)
    got = generalized_jsd(padded, torch.cat([teacher, pad], -1), beta).sum()
    (grad,) = torch.autograd.grad(got, student)
    want = generalized_jsd(student, teacher, beta).sum()
    (want_grad,) = torch.autograd.grad(want, student)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), abs=1e-5)
    assert torch.allclose(grad, want_grad, atol=1e-6, rtol=0)


def _gkd_problems(overrides):
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=qwen3", "data=sft", "data.tokenizer=byte", "task=gkd", *overrides]), 1)
    return e.value.problems


def test_gkd_without_a_teacher_is_one_line():
    assert _gkd_problems([]) == ["task=gkd needs a teacher: set task.teacher.model=<HF folder> (a checkpoint with "
                                 "the student's tokenizer)"]


def test_a_teacher_with_another_tokenizer_is_one_line(tmp_path):
    from tests.conftest import bpe_tokenizer

    import transformers

    transformers.Qwen3Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp_path)
    # (the BPE stops at 278 tokens on so little text)
    bpe_tokenizer(["twelve plus thirty is forty-two"], ["<|endoftext|>"], vocab_size=300).save(
        str(tmp_path / "tokenizer.json"))
    problems = _gkd_problems([f"task.teacher.model={tmp_path}"])
    assert problems == [f"task.teacher.model={tmp_path}: the teacher's tokenizer ({tmp_path}, 278 tokens) is not "
                        "the student's (byte, 259 tokens); GKD needs one tokenizer"], problems
    # the same folder read with the student's tokenizer passes that check; other settings are named one by one
    problems = _gkd_problems([f"task.teacher.model={tmp_path}", "task.teacher.tokenizer=byte", "task.teacher.tp=4",
                              "task.seq_kd=true", "task.beta=1.5", "task.lmbda=-0.1", "task.temperature=0"])
    assert problems == ["task.teacher.tp=4: the teacher's 4 attention heads and 2 key-value heads must divide by its "
                        "tensor-parallel size; set task.teacher.tp to a divisor of both",
                        "task.teacher.tp=4 differs from parallel.tp=1: task.seq_kd (the teacher writing completions) "
                        "runs the teacher on the student's layout; leave task.teacher.tp out",
                        "task.lmbda=-0.1 must be in [0, 1]",
                        "task.beta=1.5 must be in [0, 1]", "task.temperature=0.0 must be > 0"], problems


def test_context_parallel_and_packing_are_refused_one_line_each(tmp_path):
    """The reference-free tasks run under CP=2 (tests/multiproc/test_preference_train.py); GKD names the key."""
    import transformers

    transformers.Qwen3Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp_path)
    problems = _gkd_problems([f"task.teacher.model={tmp_path}", "task.teacher.tokenizer=byte", "parallel.cp=2",
                              "data.packing=true"])
    assert "task=gkd does not support parallel.cp > 1 yet (its completions are written per row)" in problems
    assert "task=gkd reads conversation rows (data=sft) without data.packing or data.streaming" in problems
