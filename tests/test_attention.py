"""The sdpa core attention computes what megatron-core's own DotProductAttention computes (causal, GQA,
packed-row masks, gradients), and the seam puts the chosen module into the layer spec."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_swift.models import attention
from megatron_swift.models.sdpa import SDPAttention


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/conftest.py


def config(heads=4, groups=2, dropout=0.0):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                             kv_channels=16, attention_dropout=dropout, use_cpu_initialization=True)


def inputs(s=24, b=2, heads=4, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, 16, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, 16, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, 16, generator=g, requires_grad=True)
    return q, k, v


def both(cfg, q, k, v, mask=None):
    """Outputs and input gradients of megatron-core's module and the sdpa one on the same inputs."""
    results = []
    for cls in (DotProductAttention, SDPAttention):
        module = cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = module(*leaves, attention_mask=mask)
        out.pow(2).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    return results


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)])
def test_causal_attention_and_its_gradients_equal_megatron_cores(heads, groups):
    (ref, ref_grads), (out, grads) = both(config(heads, groups), *inputs(heads=heads, groups=groups))
    assert out.shape == ref.shape == (24, 2, heads * 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_packed_rows_mask_equals_megatron_cores_and_keeps_samples_apart():
    segments = torch.tensor([[0] * 10 + [1] * 9 + [-1] * 5, [0] * 24])
    mask = attention.block_causal_mask(segments)
    q, k, v = inputs()
    (ref, ref_grads), (out, grads) = both(config(), q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # The second sample of row 0 does not see the first: changing sample 0's keys leaves it unchanged.
    k2 = k.detach().clone()
    k2[:10, 0] += 5.0
    module = SDPAttention(config(), 1, AttnMaskType.causal, "self")
    changed = module(q, k2, v, attention_mask=mask)
    assert torch.equal(changed[10:19, 0], out[10:19, 0]) and not torch.allclose(changed[:10, 0], out[:10, 0])


def test_dropout_is_applied_in_training_only():
    module = SDPAttention(config(dropout=0.5), 1, AttnMaskType.causal, "self")
    q, k, v = (t.detach() for t in inputs())
    module.eval()
    plain = module(q, k, v, attention_mask=None)
    assert torch.equal(plain, module(q, k, v, attention_mask=None))
    module.train()
    dropped = module(q, k, v, attention_mask=None)
    assert not torch.allclose(dropped, plain)


def test_the_seam_puts_the_backend_into_the_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(config(), use_transformer_engine=False)
    attention.use_core_attention(spec, "sdpa")
    assert all(layer.submodules.self_attention.submodules.core_attention is SDPAttention
               for layer in spec.layer_specs)
    attention.use_core_attention(spec, "local")
    assert spec.layer_specs[0].submodules.self_attention.submodules.core_attention is DotProductAttention
    assert attention.resolve("auto", te_available=False) == "sdpa"
    assert attention.resolve("auto", te_available=True) == "te"
    assert attention.packed_format("sdpa") == "mask" and attention.packed_format("te") == "thd"


def test_varlen_reads_sample_bounds_back_from_packed_masks_and_refuses_other_masks():
    from megatron_swift.models import varlen

    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    cu, longest = varlen.bounds(attention.block_causal_mask(segments))
    assert cu.tolist() == [0, 3, 5, 6, 8, 9, 16] and cu.dtype == torch.int32 and longest == 7
    causal_padding = ~torch.ones(8, 8, dtype=torch.bool).tril()  # causal, plus a padded key column
    causal_padding[:, 6] = True
    assert varlen.bounds(causal_padding.expand(2, 1, 8, 8).clone()) is None
    # On CPU the varlen kernel is never used: SDPA with the mask is.
    q, k, v = inputs(s=8)
    assert varlen.attend(q, k, v, attention.block_causal_mask(segments), 0.25) is None
