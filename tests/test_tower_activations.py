"""A held tower's activation memory and FLOPs as the planner and the progress line count them
(families/qwen2_5_vl.py): against what autograd really saves through transformers' Qwen2.5-VL tower
(plan.measure.SavedTensors), the grid transformers' image processor gives at data.max_pixels, and torch's
FlopCounterMode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from megatron_swift.models.families.qwen2_5_vl import FAMILY, _vision_module_class, tower_features, vision_config
from megatron_swift.models.held_tower import build_held_tower
from megatron_swift.plan.measure import SavedTensors


class _Arch:
    """What the family's counts read: the tower's vision_config and the LM width."""

    def __init__(self, **vision):
        self.vision_hf = dict(FAMILY.sizes["tiny"].vision_hf, **vision)
        self.hidden_size = 64


# 3 blocks, the middle one on full attention; 56-px windows (16 patches)
ARCH = _Arch(depth=3, fullatt_block_indexes=[1])


def _tower(attention: str, dtype, train_tower: bool, train_merger: bool):
    config = vision_config(ARCH.vision_hf)
    tower = build_held_tower(lambda a: _vision_module_class()._from_config(config, attn_implementation=a),
                             tower_features, attention, "cpu").to(dtype)
    for name, p in tower.named_parameters():
        p.requires_grad_(train_merger if name.startswith("hf.merger.") else train_tower)
    return tower


def _pixels(sizes, max_pixels=10 ** 6):
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    out = processor(images=[np.zeros((h, w, 3), np.uint8) for h, w in sizes], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# A square image whose sides are whole windows; two images, one cut into partial windows (84 x 56 px).
@pytest.mark.parametrize("sizes", [[(112, 112)], [(112, 224), (84, 56)]], ids=["one", "two-partial"])
@pytest.mark.parametrize("attention,dtype,train_tower,train_merger", [
    ("local", torch.float32, True, True), ("local", torch.bfloat16, True, False), ("sdpa", torch.bfloat16, True, True),
    ("sdpa", torch.float32, False, True)])
def test_tower_activation_bytes_equal_what_autograd_saves(sizes, attention, dtype, train_tower, train_merger):
    """tower_activation_bytes (from the grids alone) equals the bytes of the distinct storages autograd keeps for
    backward through transformers' module (parameters apart): eager and SDPA, fp32 and bf16, tower and merger
    trained or frozen."""
    tower = _tower(attention, dtype, train_tower, train_merger)
    pixels, grid = _pixels(sizes)
    with SavedTensors(tower.parameters()) as saved:
        tower(pixel_values=pixels, image_grid_thw=grid)
    planned = FAMILY.tower_activation_bytes(ARCH, grid.tolist(), train_tower, train_merger, attention == "local",
                                            torch.finfo(dtype).bits // 8)
    assert planned == saved.bytes > 0
    assert FAMILY.tower_activation_bytes(ARCH, grid.tolist(), False, False, attention == "local", 4) == 0


# Qwen3-VL: DeepStack mergers after block 0 and after the last block (whose output the main merger keeps too),
# or after block 1.
@pytest.mark.parametrize("deepstack", [[0, 2], [1]])
@pytest.mark.parametrize("attention,dtype,train_tower,train_merger", [
    ("local", torch.bfloat16, True, True), ("sdpa", torch.float32, True, False), ("sdpa", torch.bfloat16, False, True)])
def test_qwen3_vl_tower_activation_bytes_equal_what_autograd_saves(deepstack, attention, dtype, train_tower,
                                                                   train_merger):
    """The same for Qwen3-VL's tower (LayerNorms, learned positions, full attention in every block, DeepStack)
    on two images of different sizes (16-px patches)."""
    from megatron_swift.models.families import qwen3_vl

    arch = _Arch()
    arch.vision_hf = dict(qwen3_vl.FAMILY.sizes["tiny"].vision_hf, deepstack_visual_indexes=deepstack)
    config = qwen3_vl.vision_config(arch.vision_hf)
    tower = build_held_tower(lambda a: qwen3_vl._vision_module_class()._from_config(config, attn_implementation=a),
                             qwen3_vl.tower_features, attention, "cpu").to(dtype)
    for name, p in tower.named_parameters():
        p.requires_grad_(train_merger if "merger" in name else train_tower)
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=10 ** 6, patch_size=16)
    out = processor(images=[np.zeros((128, 256, 3), np.uint8), np.zeros((96, 64, 3), np.uint8)], return_tensors="pt")
    with SavedTensors(tower.parameters()) as saved:
        tower(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    planned = qwen3_vl.FAMILY.tower_activation_bytes(arch, out["image_grid_thw"].tolist(), train_tower, train_merger,
                                                     attention == "local", torch.finfo(dtype).bits // 8)
    assert planned == saved.bytes > 0


@pytest.mark.parametrize("tokens_side", [(4, 4), (5, 7)])
def test_largest_image_grid_is_the_processors(tokens_side):
    """The planner's image at data.max_pixels = U merged tokens: an image of exactly those sides gets that grid
    from transformers' processor, and no aspect ratio gets more patches."""
    rows, cols = tokens_side
    max_pixels = rows * cols * 28 * 28
    t, h, w = FAMILY.tower_image_grid(ARCH, max_pixels)
    assert t == 1 and h * w == 4 * rows * cols
    for size in [(28 * rows, 28 * cols), (1000, 1000), (300, 2000), (2000, 500)]:
        _, grid = _pixels([size], max_pixels)
        assert int(grid.prod()) <= h * w, (size, grid.tolist())
    _, grid = _pixels([(28 * rows, 28 * cols)], max_pixels)
    assert int(grid.prod()) == h * w
    assert FAMILY.tower_image_grid(ARCH, max_pixels, max_tokens=6) == (1, 4, 6)  # a row of 6 image tokens


def test_tower_flops_with_the_image_size_equal_torch_flop_counter():
    """With the image's token count known the full-attention block attends over the whole image: the forward
    FLOPs per image token equal FlopCounterMode's over transformers' module (eager: attention as matmuls) on a
    224 x 112 image (whole 56-px windows, 128 patches), and exceed the lower bound that counts it as windows."""
    from torch.utils.flop_counter import FlopCounterMode

    tower = _tower("local", torch.float32, False, False)
    pixels, grid = _pixels([(112, 224)])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = tower(pixel_values=pixels, image_grid_thw=grid)
    tokens = len(features)
    frozen, trained = (FAMILY.tower_flops_per_token(ARCH, t, tokens) for t in (False, True))
    tower_flops = (trained - frozen) / 2  # frozen: 2 x (tower + 3 merger), trained: 2 x (3 tower + 3 merger)
    merger_flops = (frozen - tower_flops) / 3
    assert counter.get_total_flops() / tokens == pytest.approx(tower_flops + merger_flops, rel=1e-9)
    assert FAMILY.tower_flops_per_token(ARCH, True) < trained


def test_step_flops_count_each_image_at_its_size():
    """flops_per_step with the data's image sizes ({tokens: images per row}) against a hand count for the 7B
    tower: per image token 4 patches through the patch embedding, 32 blocks (projections, gated MLP) and the
    merger; scores and values over 64-patch windows in 28 blocks and over the image's 4 x T patches in the 4
    full-attention blocks."""
    from omegaconf import OmegaConf

    from megatron_swift.models.arch import resolve
    from megatron_swift.training.flops import flops_per_step

    arch = resolve(OmegaConf.create(dict(family="qwen2_5_vl", size="7b", pretrained=None, llm=None)))
    sizes = {1000: 0.5, 250: 2.0}  # per row: half an image of 1000 tokens, two of 250
    base = flops_per_step(arch, 4096, 152064, 8)
    got = flops_per_step(arch, 4096, 152064, 8, 2.5, True, 1000.0, sizes) - base
    h, f, out = 1280, 3420, 3584
    want = 0.0
    for tokens, count in sizes.items():
        patches = 4 * tokens
        forward = 4 * (3 * 2 * 14 * 14 * h + 32 * (4 * h * h + 3 * h * f) + 2 * h * (28 * 64 + 4 * patches))
        merger = (4 * h) ** 2 + 4 * h * out
        want += 2 * 3 * (forward + merger) * tokens * count * 8
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("norm,qk_norm,attention,dtype,train_tower,train_merger", [
    ("layer_norm", True, "eager", torch.bfloat16, True, True), ("rms_norm", False, "sdpa", torch.float32, True, False),
    ("layer_norm", False, "sdpa", torch.bfloat16, False, True)])
def test_internvl_tower_activation_bytes_equal_what_autograd_saves(norm, qk_norm, attention, dtype, train_tower,
                                                                   train_merger):
    """The same for InternVL's InternViT and projector (LayerNorm or RMSNorm, with or without QK norm, layer
    scale, the class token, pixel shuffle) on 3 tiles, and the planner's tiles under data.max_pixels."""
    import dataclasses

    from omegaconf import OmegaConf

    from megatron_swift.models.arch import resolve
    from megatron_swift.models.families.internvl import tower_config
    from megatron_swift.models.internvl_tower import build_internvl_tower, internvl_features

    tiny = resolve(OmegaConf.create(dict(family="internvl", size="tiny", pretrained=None, llm=None)))
    arch = dataclasses.replace(tiny, vision_hf=dict(tiny.vision_hf, norm_type=norm, use_qk_norm=qk_norm))
    tower = build_internvl_tower(tower_config(arch), attention).to(dtype)
    for name, p in tower.named_parameters():
        p.requires_grad_(train_merger if name.startswith("multi_modal_projector.") else train_tower)
    side = arch.vision_hf["image_size"][0]
    with SavedTensors(tower.parameters()) as saved:
        internvl_features(tower, torch.randn(3, 3, side, side).to(dtype))
    grid = arch.family.tower_image_grid(arch, 2 * side * side)  # two tiles and the thumbnail
    assert grid == (3, side // 14, side // 14)
    planned = arch.family.tower_activation_bytes(arch, [grid], train_tower, train_merger, attention == "eager",
                                                 torch.finfo(dtype).bits // 8)
    assert planned == saved.bytes > 0


def test_qwen3_vl_tower_flops_with_the_image_size_equal_torch_flop_counter():
    """Qwen3-VL attends over the whole image in every block: with the image's token count its forward FLOPs per
    image token (tower, merger and DeepStack mergers) equal FlopCounterMode's over transformers' module."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_swift.models.families import qwen3_vl

    arch = _Arch()
    arch.vision_hf = dict(qwen3_vl.FAMILY.sizes["tiny"].vision_hf)
    config = qwen3_vl.vision_config(arch.vision_hf)
    tower = build_held_tower(lambda a: qwen3_vl._vision_module_class()._from_config(config, attn_implementation=a),
                             qwen3_vl.tower_features, "local", "cpu")
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=10 ** 6, patch_size=16)
    out = processor(images=[np.zeros((128, 192, 3), np.uint8)], return_tensors="pt")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        main, _ = tower(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    tokens = len(main)
    frozen, trained = (qwen3_vl.FAMILY.tower_flops_per_token(arch, t, tokens) for t in (False, True))
    tower_flops = (trained - frozen) / 2
    assert counter.get_total_flops() / tokens == pytest.approx(tower_flops + (frozen - tower_flops) / 3, rel=1e-9)


def test_planner_step_time_counts_the_tower_on_every_tp_rank():
    """The planner's step time adds the held tower's FLOPs for its images (plan.search.step_time), once per TP
    rank: the tower is replicated, so TP does not divide its work."""
    import dataclasses

    from omegaconf import OmegaConf

    from megatron_swift.models.arch import resolve
    from megatron_swift.plan.memory import Layout
    from megatron_swift.plan.search import MFU, step_time
    from megatron_swift.training.flops import flops_per_step

    arch = resolve(OmegaConf.create(dict(family="qwen2_5_vl", size="7b", pretrained=None, llm=None)))
    grid = arch.family.tower_image_grid(arch, 1003520)  # 1280 tokens: 35 x 36 merged
    assert arch.family.tower_image_tokens(arch, grid) == 1260
    plain = Layout(tp=2, dp=4, num_microbatches=8, train_vision=True)
    held = dataclasses.replace(plain, tower_images=(grid,))
    text = flops_per_step(arch, 4096, 152064, 64)
    tower = flops_per_step(arch, 4096, 152064, 64, 1.0, True, 1260.0, {1260: 1.0}) - text
    extra = step_time(arch, 152064, held, 4096, 64, 989.0) - step_time(arch, 152064, plain, 4096, 64, 989.0)
    factor = 1 + 0.05 * (2 - 1)  # step_time's TP communication factor
    assert extra == pytest.approx(2 * tower / (8 * 989e12 * MFU) * factor, rel=1e-9)
