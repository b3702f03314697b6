"""Vision-language SFT rows (data/vl_sft.py, data/images.py): ids and pixels equal transformers' LlavaProcessor on
real photographs (scikit-learn's sample JPEGs); loss masks as data/sft.py's; packing; collate; bad rows."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from megatron_swift.config.schema import DataConfig
from megatron_swift.data.errors import DataError
from megatron_swift.data.images import VisionData, load_image_processor
from megatron_swift.data.sft import encode, sft_source
from megatron_swift.data.templates import load_template
from megatron_swift.data.tokenizer import ByteTokenizer, HFTokenizer
from megatron_swift.data.vl_sft import vl_sft_source

# Written here, independently of the project's built-in copy.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
SIDE = 56  # image size; patch 14: T = (56 / 14) ** 2 = 16
T = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An HF tokenizer (BPE trained on the fly, <image> a special token), CLIP and SigLIP image processors, and
    the two photographs scikit-learn ships, copied under img/ next to where the JSONL files go."""
    import sklearn.datasets
    import transformers

    from tests.conftest import bpe_tokenizer

    root = tmp_path_factory.mktemp("vl")
    tok = bpe_tokenizer(["What is in the picture? A temple, a flower and the sky.",
                         "system user assistant says hello"], SPECIALS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                extra_special_tokens={"image_token": "<image>"})
    fast.save_pretrained(str(root / "tok"))
    (root / "tok" / "chat_template.jinja").write_text(CHATML)
    square = {"height": SIDE, "width": SIDE}
    transformers.CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size=square).save_pretrained(str(root / "clip"))
    transformers.SiglipImageProcessor(size=square).save_pretrained(str(root / "siglip"))
    (root / "img").mkdir()
    images = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(os.path.join(images, name), root / "img" / name)
    (root / "img" / "x.jpg").write_text("not an image")
    return root


def _vision(folders, kind="clip"):
    tok = HFTokenizer(str(folders / "tok"))
    return tok, VisionData("<image>", tok._tok.token_to_id("<image>"), T, load_image_processor(str(folders / kind)))


def _cfg(**kw):
    base = dict(source="vl_sft", format="auto", loss_on="assistant", truncation="error", on_error="error",
                packing=False, template=None)
    base.update(kw)
    return OmegaConf.structured(DataConfig(**base))


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _row(*turns, images=None):
    roles = ["user", "assistant"] * len(turns)
    row = {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}
    if images is not None:
        row["images"] = images
    return row


TWO = _row("<image>\nWhat is in the picture?", "A temple.", "And here?<image>", "A flower.",
           images=["img/china.jpg", "img/flower.jpg"])
ONE = _row("<image>What is in the picture?", "A temple.", images=["img/china.jpg"])
TEXT = _row("What is in the picture?", "The sky.")


def _source(folders, rows, kind="clip", seq_length=128, **cfg):
    tok, vision = _vision(folders, kind)
    path = _write(folders / "d.jsonl", rows)
    return vl_sft_source([path], _cfg(**cfg), tok, seq_length, None, str(folders / "tok"), vision)


def _llava(folders, kind):
    import transformers

    image_processor = transformers.AutoImageProcessor.from_pretrained(str(folders / kind), backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folders / "tok"))
    if kind == "clip":  # llava-1.5: the CLS feature dropped, counted back by num_additional_image_tokens
        extra = dict(vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        extra = dict(vision_feature_select_strategy="full", num_additional_image_tokens=0)
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14, **extra)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tokens_and_pixels_equal_llava_processor(folders, kind):
    from transformers.image_utils import load_image

    rows = _source(folders, [TWO], kind)
    processor = _llava(folders, kind)
    text = processor.tokenizer.apply_chat_template(TWO["messages"], tokenize=False)
    photos = [load_image(str(folders / name)) for name in TWO["images"]]
    expected = processor(images=photos, text=[text], return_tensors="pt")
    ids = expected["input_ids"][0]
    row = rows[0]
    assert row["tokens"][:len(ids)].tolist() == ids.tolist()
    assert (ids == rows.vision.image_token_id).sum() == 2 * T
    assert row["images"].shape == (2, 3, SIDE, SIDE) and row["images"].dtype == torch.float32
    assert torch.equal(row["images"], expected["pixel_values"])


def test_default_processors_equal_the_saved_ones(folders):
    from PIL import Image

    photo = Image.open(folders / "img" / "flower.jpg").convert("RGB")
    for kind, model_type in (("clip", "clip_vision_model"), ("siglip", "siglip")):
        saved = load_image_processor(str(folders / kind))(photo)
        default = load_image_processor(None, model_type, SIDE)(photo)
        assert saved.shape == (3, SIDE, SIDE) and torch.equal(saved, default)
    with pytest.raises(ValueError, match="no image processor"):
        load_image_processor(str(folders / "tok"))


def test_processor_folder_as_transformers_5_saves_it(folders, tmp_path):
    from PIL import Image

    _llava(folders, "siglip").save_pretrained(str(tmp_path))  # one processor_config.json, the image processor in it
    assert not (tmp_path / "preprocessor_config.json").exists()
    photo = Image.open(folders / "img" / "china.jpg").convert("RGB")
    assert torch.equal(load_image_processor(str(tmp_path))(photo), load_image_processor(str(folders / "siglip"))(photo))


def test_image_positions_carry_no_loss_and_the_rest_is_sft(folders):
    rows = _source(folders, [TWO, TEXT])
    from megatron_swift.data.conversations import to_messages

    tok, vision = _vision(folders)
    template = load_template(None, str(folders / "tok"))
    # Ground truth: data/sft.py on the same text, where <image> is one token; each then stands for T positions.
    ids, targets = encode(to_messages(TWO), template, tok, "assistant")
    repeat = np.where(ids == vision.image_token_id, T, 1)
    ids, targets = np.repeat(ids, repeat), np.repeat(targets, repeat)
    targets &= ids != vision.image_token_id
    n = len(ids)
    row = rows[0]
    image = row["image_index"] >= 0
    assert row["tokens"][:n].tolist() == ids.tolist() and image.sum() == 2 * T
    assert (image == (row["tokens"] == vision.image_token_id)).all()
    assert not row["loss_mask"][image].any()  # image positions predict nothing ...
    assert not row["loss_mask"][:-1][image[1:]].any()  # ... and are never predicted
    assert row["loss_mask"][:n - 1].tolist() == targets[1:].astype(np.float32).tolist()
    # A row without images is exactly the SFT row.
    sft = sft_source([str(folders / "d.jsonl")], _cfg(source="sft"), tok, 128, None, str(folders / "tok"))
    for key in ("tokens", "labels", "loss_mask", "positions", "segments"):
        assert rows[1][key].tolist() == sft[1][key].tolist()
    assert rows[1]["images"].shape == (0, 3, SIDE, SIDE) and (rows[1]["image_index"] == -1).all()


def test_image_positions_carry_no_loss_even_when_every_token_does(folders):
    """data.loss_on=all makes the user turns, where the images are, carry loss: image positions still predict
    nothing and are never predicted, packed or not."""
    tok, vision = _vision(folders)
    for packing in (False, True):
        rows = _source(folders, [TWO, ONE, TEXT], loss_on="all", packing=packing, seq_length=256)
        for row in (rows[i] for i in range(len(rows))):
            image = row["image_index"] >= 0
            assert image.any() or not packing
            text = (row["tokens"] != tok.pad) & ~image
            assert not row["loss_mask"][image].any()  # no image position predicts ...
            assert not row["loss_mask"][:-1][image[1:]].any()  # ... nor is predicted
            same = row["segments"][:-1] == row["segments"][1:]  # not across two packed samples
            assert row["loss_mask"][:-1][text[:-1] & text[1:] & same].all()  # text predicting text carries loss


def test_tokenizer_without_the_tag_encodes_the_text_between_tags(folders, tmp_path):
    from megatron_swift.data.conversations import to_messages

    tok = ByteTokenizer()
    vision = VisionData("<image>", 300, 4, load_image_processor(str(folders / "clip")))
    shutil.copytree(folders / "img", tmp_path / "img")
    path = _write(tmp_path / "d.jsonl", [TWO, TEXT])
    rows = vl_sft_source([path], _cfg(), tok, 160, "plain", None, vision)
    text = load_template("plain", None).render(to_messages(TWO))
    expected = []
    for k, piece in enumerate(text.split("<image>")):  # by hand: each piece's bytes (and specials), 4 image ids per tag
        expected += ([300] * 4 if k else []) + tok.encode_with_offsets(piece)[0]
    assert rows[0]["tokens"][:len(expected)].tolist() == expected
    assert (rows[0]["image_index"] >= 0).sum() == 8 and rows[0]["images"].shape[0] == 2
    sft = sft_source([path], _cfg(source="sft"), tok, 160, "plain", None)
    for key in ("tokens", "labels", "loss_mask"):
        assert rows[1][key].tolist() == sft[1][key].tolist()


def test_packing_keeps_each_samples_tokens_and_images(folders):
    data = [TWO, TEXT, ONE, _row("Hi", "Hello there."), ONE]
    packed = _source(folders, data, seq_length=256, packing=True)
    unpacked = _source(folders, data, seq_length=256, packing=False)
    assert len(packed) < len(unpacked) == len(data)
    seen = 0
    for r in range(len(packed)):
        row, at, before = packed[r], 0, 0
        for sample in packed.rows[r]:
            alone = unpacked[sample]
            n, m = len(packed.samples.ids[sample]), alone["images"].shape[0]
            assert row["tokens"][at:at + n].tolist() == alone["tokens"][:n].tolist()
            assert row["labels"][at:at + n - 1].tolist() == alone["labels"][:n - 1].tolist()
            assert row["loss_mask"][at:at + n].tolist() == alone["loss_mask"][:n].tolist()
            local = row["image_index"][at:at + n]
            assert np.where(local >= 0, local - before * T, -1).tolist() == alone["image_index"][:n].tolist()
            assert torch.equal(row["images"][before:before + m], alone["images"])
            at, before, seen = at + n, before + m, seen + 1
        assert before == row["images"].shape[0]
    assert seen == len(data)
    batch = packed.collate([packed[0]])
    assert batch.segments is not None and batch.images.shape[0] == packed[0]["images"].shape[0]


def test_collate_numbers_images_over_the_micro_batch(folders):
    rows = _source(folders, [ONE, TWO])
    batch = rows.collate([rows[0], rows[1]])
    assert batch.images.shape == (3, 3, SIDE, SIDE) and batch.image_index.dtype == torch.int64
    assert torch.equal(batch.images, torch.cat([rows[0]["images"], rows[1]["images"]]))
    first = batch.image_index[0][batch.image_index[0] >= 0]
    second = batch.image_index[1][batch.image_index[1] >= 0]
    assert first.tolist() == list(range(T)) and second.tolist() == list(range(T, 3 * T))
    assert torch.equal(batch.image_index >= 0, batch.tokens == rows.vision.image_token_id)
    text_only = _source(folders, [TEXT])
    empty = text_only.collate([text_only[0]])
    assert empty.images.shape == (0, 3, SIDE, SIDE) and (empty.image_index == -1).all()


BAD = {
    "missing": (_row("<image>What?", "A.", images=["img/nowhere.jpg"]), r"image 'img/nowhere.jpg': not found at"),
    "unreadable": (_row("<image>What?", "A.", images=["img/x.jpg"]),
                   r"image 'img/x.jpg': .*x.jpg is not an image file PIL can read"),
    "more_tags": (_row("<image>What?<image>", "A.", images=["img/china.jpg"]), r"2 <image> tags but 1 image "),
    "fewer_tags": (_row("<image>What?", "A.", images=["img/china.jpg", "img/flower.jpg"]),
                   r"1 <image> tag but 2 images"),
    "not_a_list": (_row("<image>What?", "A.", images="img/china.jpg"), r"'images' must be a list"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_rows_name_file_and_line_or_are_skipped(folders, kind):
    bad, message = BAD[kind]
    with pytest.raises(DataError, match=f"d.jsonl:2: {message}"):
        _source(folders, [ONE, bad, TEXT])
    skipped = _source(folders, [ONE, bad, TEXT], on_error="skip")
    assert len(skipped) == 2 and "3 rows" in skipped.description and "1 bad rows skipped" in skipped.description


def test_truncation_never_cuts_an_image(folders):
    tok, _ = _vision(folders)
    before_image = len(tok.encode("<|im_start|>user\n"))  # the image of ONE starts here
    reply = "one two three four five six seven eight nine ten"  # words the tokenizer has not merged: many tokens
    long = _row("Hi", reply, "<image>And here?", "A flower.", images=["img/china.jpg"])
    seq_length = before_image + T - 1  # ONE's cut falls inside its image, long's in its first reply
    with pytest.raises(DataError, match=r"d.jsonl:1: conversation has \d+ tokens, more than train.seq_length"):
        _source(folders, [ONE, long], seq_length=seq_length)
    cut = _source(folders, [ONE, long], seq_length=seq_length, truncation="truncate")
    # ONE is dropped (its image would be cut in two); long is cut before its image, which goes with its tokens.
    assert "1 truncated, 1 dropped" in cut.description and len(cut) == 1
    assert cut[0]["images"].shape[0] == 0 and (cut[0]["image_index"] == -1).all()
    assert not (cut[0]["tokens"] == cut.vision.image_token_id).any() and cut[0]["loss_mask"].any()
    first = _row("<image>Hi", reply, images=["img/china.jpg"])
    length = len(_source(folders, [first]).samples.ids[0])
    fits = _source(folders, [first], seq_length=length - 3, truncation="truncate")  # cut in the reply
    assert "1 truncated" in fits.description and fits[0]["images"].shape[0] == 1
    assert (fits[0]["image_index"] >= 0).sum() == T
    with pytest.raises(DataError, match=r"no usable conversations \(2 rows, 0 skipped, 2 dropped\)"):
        _source(folders, [ONE, long], seq_length=seq_length, truncation="drop")


def test_weighted_files_keep_their_images(folders):
    tok, vision = _vision(folders)
    a = _write(folders / "a.jsonl", [ONE] * 3)
    b = _write(folders / "b.jsonl", [TEXT] * 7)
    rows = vl_sft_source([a, b], _cfg(weights=[0.5, 0.5]), tok, 128, None, str(folders / "tok"), vision)
    assert len(rows) == 10
    with_image = [r for r in range(10) if rows[r]["images"].shape[0]]
    assert len(with_image) == 5 and all((rows[r]["image_index"] >= 0).sum() == T for r in with_image)


def test_tokenizer_and_model_must_agree_on_the_image_token(folders):
    tok, vision = _vision(folders)
    path = _write(folders / "d.jsonl", [ONE])
    wrong = VisionData("<image>", vision.image_token_id + 1, T, vision.processor)
    with pytest.raises(DataError, match="encodes <image> as token id"):
        vl_sft_source([path], _cfg(), tok, 128, None, str(folders / "tok"), wrong)


def test_build_source_needs_a_vision_model(folders):
    from megatron_swift.config.validate import ConfigError
    from megatron_swift.data.sources import build_source

    tok, vision = _vision(folders)
    path = _write(folders / "d.jsonl", [ONE])
    with pytest.raises(ConfigError, match=r"data.source=vl_sft needs a vision-language model \(e.g. \+model=llava or qwen2_5_vl\)"):
        build_source(_cfg(), [path], tok, 128, 0, str(folders / "tok"))
    rows = build_source(_cfg(), [path], tok, 128, 0, str(folders / "tok"), vision=vision)
    assert rows.description.startswith("vl_sft:") and "1 images" in rows.description


def test_config_group_validates_as_sft_without_streaming():
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=qwen3", "data=vl_sft", "data.path=[]", "data.streaming=true",
                          "train.train_iters=3", "data.truncation=cut"]), 1)
    assert "data.streaming is not supported with data.source=vl_sft" in str(e.value)
    assert "data.truncation" in str(e.value) and "data.path is empty; give the vl_sft file(s)" in str(e.value)
    assert ("data.source=vl_sft needs a vision-language model (+model=llava, qwen2_5_vl, qwen3_vl, qwen3_vl_moe or "
            "internvl), not +model=qwen3") in str(e.value)
