"""Qwen2.5-VL image rows (data/vl_sft.py with families/qwen2_5_vl.qwen_vision_data): token ids, pixel values and
grids equal transformers' Qwen2_5_VLProcessor's on real photographs of two sizes; positions equal
get_rope_index's, per sample in packed rows; truncation never cuts an image. Video rows (data/videos.py):
tests/test_qwen2_5_vl_video.py."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.test_vl_data import CHATML, _cfg, _row, _write, folders  # noqa: F401 (fixture)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
START, END, PAD = 3, 4, 5
MIN, MAX = 28 * 28 * 4, 28 * 28 * 24
TAG = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen(folders):  # noqa: F811
    """A Qwen-style tokenizer (its vision specials), the Qwen2-VL image processor, the tiny architecture with
    those token ids, and transformers' processor over the same pieces."""
    import transformers

    from megatron_swift.data.tokenizer import HFTokenizer
    from megatron_swift.models import families
    from megatron_swift.models.arch import Arch
    from megatron_swift.models.families.qwen2_5_vl import qwen_vision_data
    from tests.conftest import bpe_tokenizer

    root = folders / "qwen"
    tok = bpe_tokenizer(["What is in the picture? A temple, a flower and the sky.",
                         "system user assistant says hello"], SPECIALS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.save_pretrained(str(root / "tok"))
    (root / "tok" / "chat_template.jinja").write_text(CHATML)
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=MIN, max_pixels=MAX)
    family = families.get("qwen2_5_vl")
    size = dataclasses.asdict(family.size("tiny"))
    size.update(image_token_id=PAD, kv_channels=16, vocab_size=400, family_options=dict(
        size["family_options"], vision_start_token_id=START, vision_end_token_id=END, video_token_id=6))
    arch = Arch(family=family, **size)
    # transformers' processor; its constructor insists on a video processor, which needs torchvision (not a
    # dependency): the attributes its __init__ sets are set here, its __call__ (what is compared) is its own.
    cls = transformers.Qwen2_5_VLProcessor
    processor = cls.__new__(cls)
    processor.image_processor, processor.tokenizer, processor.video_processor = image_processor, fast, None
    processor.chat_template = None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id, processor.video_token_id = PAD, 6
    return HFTokenizer(str(root / "tok")), qwen_vision_data(image_processor, arch), processor, arch


# flower.jpg cropped to a portrait: the two photographs give different grids and token counts
ROWS = [_row("<image>\nWhat is in the picture?", "A temple.", "And here?<image>", "A flower.",
             images=["img/china.jpg", "img/portrait.png"]),
        _row("<image>What is in the picture?", "A flower.", images=["img/portrait.png"])]


def _source(folders, qwen, rows, seq_length=400, **cfg):  # noqa: F811
    from PIL import Image

    from megatron_swift.data.vl_sft import vl_sft_source

    portrait = folders / "img" / "portrait.png"
    if not portrait.exists():
        Image.open(folders / "img" / "flower.jpg").convert("RGB").crop((200, 0, 440, 427)).save(portrait)
    tok, vision = qwen[0], qwen[1]
    path = _write(folders / "q.jsonl", rows)
    return vl_sft_source([path], _cfg(**cfg), tok, seq_length, None, str(folders / "qwen" / "tok"), vision)


def _expected(folders, processor, row):  # noqa: F811
    from transformers.image_utils import load_image

    text = processor.tokenizer.apply_chat_template(row["messages"], tokenize=False, chat_template=CHATML)
    text = text.replace("<image>", TAG)
    photos = [load_image(str(folders / name)) for name in row["images"]]
    return processor(images=photos, text=[text], return_tensors="pt")


def test_ids_pixels_grids_and_positions_equal_transformers(folders, qwen):  # noqa: F811
    import transformers

    from megatron_swift.models.families.qwen2_5_vl import hf_config

    rows = _source(folders, qwen, ROWS[:1])
    expected = _expected(folders, qwen[2], ROWS[0])
    ids, grid = expected["input_ids"][0], expected["image_grid_thw"]
    row = rows[0]
    assert row["tokens"][:len(ids)].tolist() == ids.tolist()
    counts = (grid.prod(-1) // 4).tolist()
    assert counts[0] != counts[1] and (ids == PAD).sum() == sum(counts)
    media = row["images"]
    assert torch.equal(torch.cat([m["pixel_values"] for m in media]), expected["pixel_values"])
    assert torch.equal(torch.cat([m["image_grid_thw"] for m in media]), grid)
    # get_rope_index of a real (tiny) model is the ground truth for the three streams
    model = transformers.Qwen2_5_VLModel(hf_config(qwen[3]))
    want, _ = model.get_rope_index(ids[None], mm_token_type_ids=(ids[None] == PAD).long(), image_grid_thw=grid)
    assert np.array_equal(row["positions"][:, :len(ids)], want[:, 0].numpy())
    # the loss never lands on image tokens; image_index numbers them in order
    assert not row["loss_mask"][np.asarray(row["tokens"]) == PAD].any()
    assert row["image_index"][np.asarray(row["tokens"]) == PAD].tolist() == list(range(sum(counts)))


def test_packed_rows_carry_per_sample_positions_and_collate(folders, qwen):  # noqa: F811
    unpacked = _source(folders, qwen, ROWS, seq_length=400)
    packed = _source(folders, qwen, ROWS, seq_length=400, packing=True)
    assert len(packed) == 1 and len(unpacked) == 2
    lengths = [len(ids) for ids in packed.samples.ids]
    row = packed[0]
    at = 0
    for i in packed.rows[0]:  # each sample's streams are its own, as computed alone
        alone = unpacked[i]["positions"][:, :lengths[i]]
        assert np.array_equal(row["positions"][:, at:at + lengths[i]], alone)
        at += lengths[i]
    batch = unpacked.collate([unpacked[0], unpacked[1]])
    assert batch.position_ids.shape == (3, 2, 400)
    assert batch.media["image_grid_thw"].shape == (3, 3)
    features = int(batch.media["image_grid_thw"].prod(-1).sum()) // 4
    placed = batch.image_index[batch.image_index >= 0]
    assert torch.equal(placed, torch.arange(features))


def test_truncation_never_cuts_an_image(folders, qwen):  # noqa: F811
    whole = _source(folders, qwen, ROWS[:1])
    start = int(whole.samples.starts[0][1])  # the second image's first token
    cut = _source(folders, qwen, ROWS[:1] + ROWS[1:], seq_length=start + 3, truncation="truncate")
    assert cut.description.count("dropped") and "1 dropped" in cut.description  # the row the cut would split


def test_video_rows_on_a_model_without_video_are_refused(folders, qwen):  # noqa: F811
    from megatron_swift.data.errors import DataError

    row = dict(_row("<video>What happens?", "A dance."), videos=["clip.mp4"])
    with pytest.raises(DataError, match=r"q\.jsonl:1: 'videos': this model takes no video input"):
        _source(folders, qwen, [row])


def test_freeze_groups_split_the_tower_from_its_merger():
    """train.freeze=[vision] / [projector] on a held tower: the merger (transformers' names) is the projector,
    every other tower parameter the vision group, nothing in both."""
    import re

    from megatron_swift.models import families
    from megatron_swift.models.families import qwen2_5_vl

    names = ["vision_model.hf." + n
             for n in qwen2_5_vl.tower_parameter_names(families.get("qwen2_5_vl").size("tiny").vision_hf)]
    groups = qwen2_5_vl._FREEZE_GROUPS
    vision = {n for n in names if re.search(groups["vision"], n)}
    projector = {n for n in names if re.search(groups["projector"], n)}
    assert vision | projector == set(names) and not vision & projector
    assert projector == {n for n in names if n.startswith("vision_model.hf.merger.")} and projector
    assert not re.search(groups["vision"], "language_model.embedding.word_embeddings.weight")


def test_flops_count_the_tower_per_image_token():
    """A step's FLOPs grow with the data's image tokens by the tower's count per token (closed form here)."""
    from omegaconf import OmegaConf

    from megatron_swift.models.arch import resolve
    from megatron_swift.training.flops import flops_per_step

    arch = resolve(OmegaConf.create(dict(family="qwen2_5_vl", size="7b", pretrained=None, llm=None)))
    base = flops_per_step(arch, 4096, 152064, 8)
    with_images = flops_per_step(arch, 4096, 152064, 8, 1.0, True, image_tokens_per_row=1000.0)
    h, f, window = 1280, 3420, 64  # Qwen2.5-VL-7B's tower: 8 x 8 patches per 112-px window
    per_token = 4 * (3 * 2 * 14 * 14 * h + 32 * (4 * h * h + 3 * h * f + 2 * h * window)) \
        + (4 * h) ** 2 + 4 * h * 3584
    assert with_images - base == pytest.approx(2 * 3 * per_token * 1000 * 8)


def test_planner_counts_the_held_tower_as_transformers_builds_it():
    """plan.memory.vision_params of the 7B tower (from its config alone) equals the parameters of transformers'
    module built on the meta device, merger apart, and does not shrink with TP (the tower is held whole)."""
    from omegaconf import OmegaConf

    from megatron_swift.models.arch import resolve
    from megatron_swift.models.families.qwen2_5_vl import _vision_module_class, vision_config
    from megatron_swift.plan.memory import vision_params

    arch = resolve(OmegaConf.create(dict(family="qwen2_5_vl", size="7b", pretrained=None, llm=None)))
    with torch.device("meta"):
        tower = _vision_module_class()._from_config(vision_config(arch.vision_hf))
    merger = sum(p.numel() for p in tower.merger.parameters())
    layout = type("Layout", (), {"tp": 4})()
    assert vision_params(arch, layout) == {"encoder": sum(p.numel() for p in tower.parameters()) - merger,
                                           "projector": merger}
