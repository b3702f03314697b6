"""The FLOP formula, checked against a hand count for a small architecture."""
from megatron_swift.config.compose import compose
from megatron_swift.models.arch import resolve
from megatron_swift.training.flops import flops_per_step, flops_per_token


def test_dense_flops_by_hand():
    arch = resolve(compose(["+model=qwen3"]).model)  # tiny: 2 layers, h=64, f=128, 4 heads, 2 groups, d=16
    s, v = 32, 512
    q, kv = 4 * 16, 2 * 16
    per_layer = 64 * (q + 2 * kv) + q * 64 + 2 * s * q + 3 * 64 * 128
    expected = 6 * (2 * per_layer + 64 * v)
    assert flops_per_token(arch, s, v) == expected
    assert flops_per_step(arch, s, v, 8) == expected * s * 8


def test_moe_counts_only_routed_experts():
    arch = resolve(compose(["+model=qwen3_moe"]).model)  # 4 experts, top-2, expert width 32
    s, v = 32, 512
    q, kv = 4 * 16, 2 * 16
    per_layer = 64 * (q + 2 * kv) + q * 64 + 2 * s * q + 2 * 3 * 64 * 32 + 64 * 4
    assert flops_per_token(arch, s, v) == 6 * (2 * per_layer + 64 * v)


def test_vlm_adds_the_encoder_per_image():
    # tiny llava: CLIP h=32, f=64, 2 layers built, 56 px / 14 = 16 patches + the class token; language h=64.
    arch = resolve(compose(["+model=llava"]).model)
    s, v = 128, 384
    tokens, h_v, h = 17, 32, 64
    encoder = 2 * (4 * h_v * h_v + 2 * tokens * h_v + 2 * h_v * 64) * tokens
    projector = 16 * (h_v * h + h * h)  # the class token is dropped (vision_select=default)
    text = flops_per_step(arch, s, v, 8)
    assert flops_per_step(arch, s, v, 8, images_per_row=1.5) == text + 1.5 * 8 * 2 * (encoder + 3 * projector)
    assert flops_per_step(arch, s, v, 8, 1.5, train_vision=True) == text + 1.5 * 8 * 2 * (3 * encoder + 3 * projector)


def test_deepseek_counts_latent_attention_dense_first_layers_and_shared_experts():
    # tiny: 3 layers (1 dense), h=64, f=128, 4 heads; q LoRA 32, KV LoRA 16, nope/rope/v head dims 16/8/16;
    # 8 experts of width 32, top-2, one shared expert
    arch = resolve(compose(["+model=deepseek"]).model)
    s, v = 32, 512
    query = 64 * 32 + 32 * 4 * (16 + 8)  # down to the query LoRA, up to every head's nope + rope
    kv = 64 * (16 + 8) + 16 * 4 * (16 + 16)  # down to the latent and the shared rope key; up to keys and values
    attention = query + kv + s * 4 * (24 + 16) + 4 * 16 * 64  # scores over 24 features, values over 16; output
    dense = 3 * 64 * 128
    moe = 2 * 3 * 64 * 32 + 3 * 64 * 32 + 64 * 8  # routed top-2, the shared expert, the router
    assert flops_per_token(arch, s, v) == 6 * (3 * attention + dense + 2 * moe + 64 * v)
    # One MTP layer (as a V3 checkpoint stores): its [embedding; hidden] projection, an MLA + MoE layer like the
    # last decoder layer, and the output head once more.
    import dataclasses

    with_mtp = dataclasses.replace(arch, mtp_num_layers=1)
    mtp = 2 * 64 * 64 + attention + moe + 64 * v
    assert flops_per_token(with_mtp, s, v) == 6 * (3 * attention + dense + 2 * moe + 64 * v + mtp)
