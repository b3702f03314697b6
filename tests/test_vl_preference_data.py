"""Preference rows with images (data/preference.py with a VLM's VisionData): each side is the vl_sft row of the
prompt and that completion, both sides carry the row's images, a micro-batch numbers its images over its 2m rows
(first rows, then second rows); Qwen2.5-VL sides carry their own M-RoPE positions and media. Bad images name
file and line (or are skipped), a truncation that would cut an image drops the pair, and images without a
vision tower, videos, and tasks whose forward cannot take images are refused with one line."""
from __future__ import annotations

import pytest
import torch

from megatron_swift.data.errors import DataError
from megatron_swift.data.preference import kto_source, preference_source
from megatron_swift.data.vl_sft import vl_sft_source
from tests.test_qwen2_5_vl_data import _source as _qwen_sft
from tests.test_qwen2_5_vl_data import qwen  # noqa: F401 (fixture)
from tests.test_vl_data import SIDE, T, _cfg, _row, _vision, _write, folders  # noqa: F401 (fixture)

Q = "<image>What is in the picture?"
CHINA = {"prompt": Q, "chosen": "A temple.", "rejected": "A flower.", "images": ["img/china.jpg"]}
FLOWER = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "A flower."}],
          "rejected_response": "A temple.", "images": ["img/flower.jpg"]}


def _pairs(folders, rows, seq_length=128, vision=True, **cfg):
    tok, data = _vision(folders)
    path = _write(folders / "p.jsonl", rows)
    return preference_source([path], _cfg(source="sft", **cfg), tok, seq_length, str(folders / "tok"),
                             vision=data if vision else None)


def _sft(folders, rows):
    tok, vision = _vision(folders)
    return vl_sft_source([_write(folders / "s.jsonl", rows)], _cfg(loss_on="last_assistant"), tok, 128, None,
                         str(folders / "tok"), vision)


def test_each_side_is_the_vl_sft_row_and_collate_numbers_images_over_the_rows(folders):
    pairs = _pairs(folders, [CHINA, FLOWER])
    sft = _sft(folders, [_row(Q, answer, images=[image]) for image, answer in
                         (("img/china.jpg", "A temple."), ("img/china.jpg", "A flower."),
                          ("img/flower.jpg", "A flower."), ("img/flower.jpg", "A temple."))])
    sides = [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]]
    for got, want in zip(sides, [sft[k] for k in range(4)]):
        for key in ("tokens", "labels", "loss_mask", "image_index"):
            assert (got[key] == want[key]).all(), key
        assert torch.equal(got["images"], want["images"])
    batch = pairs.collate([pairs[0], pairs[1]])  # rows: chosen 0, chosen 1, rejected 0, rejected 1
    assert batch.tokens.shape[0] == 4 and batch.images.shape == (4, 3, SIDE, SIDE)
    order = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]
    assert torch.equal(batch.images, torch.cat([side["images"] for side in order]))
    for row in range(4):
        assert batch.image_index[row][batch.image_index[row] >= 0].tolist() == list(range(row * T, (row + 1) * T))
    assert torch.equal(batch.image_index >= 0, batch.tokens == pairs.first.vision.image_token_id)
    assert batch.margin.tolist() == [0.0, 0.0] and pairs.images_per_row == 1.0


def test_qwen_sides_carry_their_positions_and_media(folders, qwen):  # noqa: F811
    tok, vision = qwen[0], qwen[1]
    _qwen_sft(folders, qwen, [_row("x", "y")])  # writes img/portrait.png
    rows = [dict(CHINA, images=["img/portrait.png"]), dict(FLOWER, images=["img/china.jpg"])]
    pairs = preference_source([_write(folders / "q.jsonl", rows)], _cfg(source="sft"), tok, 200,
                              str(folders / "qwen" / "tok"), vision=vision)
    sft = _qwen_sft(folders, qwen, [_row(Q, "A temple.", images=["img/portrait.png"]),
                                    _row(Q, "A temple.", images=["img/china.jpg"])], seq_length=200,
                    loss_on="last_assistant")
    assert (pairs[0][0]["positions"] == sft[0]["positions"]).all()  # chosen of pair 0
    assert (pairs[1][1]["positions"] == sft[1]["positions"]).all()  # rejected of pair 1
    batch = pairs.collate([pairs[0], pairs[1]])
    assert batch.position_ids.shape == (3, 4, 200)  # M-RoPE's [3, rows, s]
    grids = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]
    assert torch.equal(batch.media["image_grid_thw"], torch.cat([s["images"][0]["image_grid_thw"] for s in grids]))
    counts = [int(g.prod()) // 4 for g in batch.media["image_grid_thw"]]
    assert counts[0] != counts[1]
    for row in range(4):
        index = batch.image_index[row][batch.image_index[row] >= 0]
        assert index.tolist() == list(range(sum(counts[:row]), sum(counts[:row + 1])))


BAD = {
    "missing": (dict(CHINA, images=["img/nowhere.jpg"]), r"image 'img/nowhere.jpg': not found at"),
    "unreadable": (dict(CHINA, images=["img/x.jpg"]), r"image 'img/x.jpg': .*not an image file PIL can read"),
    "tags": (dict(CHINA, images=["img/china.jpg", "img/flower.jpg"]), r"1 <image> tag but 2 images"),
    "video": (dict(CHINA, videos=["clip.mp4"]), r"'videos': preference rows take images only"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_rows_name_file_and_line_or_are_skipped(folders, kind):
    bad, message = BAD[kind]
    with pytest.raises(DataError, match=f"p.jsonl:2: {message}"):
        _pairs(folders, [CHINA, bad, FLOWER])
    skipped = _pairs(folders, [CHINA, bad, FLOWER], on_error="skip")
    assert len(skipped) == 2 and "1 bad rows skipped" in skipped.description


def test_images_without_a_vision_tower_are_refused(folders):
    with pytest.raises(DataError, match=r"p.jsonl:1: 'images': this model has no vision tower"):
        _pairs(folders, [CHINA], vision=False)


def test_truncation_that_would_cut_an_image_drops_the_pair(folders):
    tok, _ = _vision(folders)
    inside = len(tok.encode("<|im_start|>user\n")) + T - 1  # the cut falls inside the image
    with pytest.raises(DataError, match=r"no usable preference pairs \(1 rows\)"):
        _pairs(folders, [CHINA], seq_length=inside, truncation="truncate")
    whole = _pairs(folders, [CHINA])
    longest = max(len(ids) for ids in whole.first.samples.ids + whole.second.samples.ids)
    cut = _pairs(folders, [CHINA], seq_length=longest - 1, truncation="truncate")  # the cut falls in a completion
    assert "1 truncated" in cut.description and all((side["image_index"] >= 0).sum() == T for side in cut[0][:2])


def test_kto_kl_rows_see_the_examples_images(folders):
    tok, vision = _vision(folders)
    rows = [{"prompt": Q, "completion": "A temple.", "label": True, "images": ["img/china.jpg"]},
            {"prompt": Q, "completion": "A temple.", "label": False, "images": ["img/flower.jpg"]}]
    data = kto_source([_write(folders / "k.jsonl", rows)], _cfg(source="sft"), tok, 128, str(folders / "tok"),
                      vision=vision)
    example, kl, values = data[0]
    assert torch.equal(example["images"], kl["images"]) and bool(values["desirable"])
    assert not torch.equal(data[1][0]["images"], example["images"])
