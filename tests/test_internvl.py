"""InternVL image rows (families/internvl.py, data/images.py, data/vl_sft.py): the folder's own processors
decide tiles, pixels and image tokens, so the ids and pixel values equal transformers' InternVLProcessor on two
real photographs of different sizes (different tile counts); data.max_pixels caps the tiles; truncation never
cuts an image; a remote-code folder and a corrupt image are one line each."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_swift.config.compose import compose
from megatron_swift.data.errors import DataError
from megatron_swift.data.images import vision_data
from megatron_swift.data.tokenizer import HFTokenizer
from megatron_swift.data.vl_sft import vl_sft_source
from megatron_swift.models.arch import resolve
from tests.internvl_tiny import hf_processor, photos, tiny_internvl, tokens_per_tile

ROW = {"messages": [{"role": "user", "content": "What is in the picture? <image> and <image>"},
                    {"role": "assistant", "content": "A temple, a flower and the sky."}],
       "images": ["img/china.jpg", "img/flower.jpg"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny qwen2-shaped InternVL folder, the two photographs as files under img/."""
    root = tmp_path_factory.mktemp("internvl")
    tiny_internvl("qwen2", root / "hf")
    (root / "img").mkdir()
    for image, name in zip(photos(), ("china.jpg", "flower.jpg")):
        image.save(root / "img" / name, quality=95)
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _rows(folder, rows, *overrides, seq_length=512):
    cfg = compose(["+model=internvl", f"model.pretrained={folder / 'hf'}", "data=vl_sft", *overrides])
    arch = resolve(cfg.model)
    path = folder / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = HFTokenizer(str(folder / "hf"))
    return vl_sft_source([str(path)], cfg.data, tok, seq_length, None, str(folder / "hf"), vision_data(cfg, arch))


def _pixels(row):
    """All tiles of a row's images (the held tower's pixel_values, image after image)."""
    return torch.cat([media["pixel_values"] for media in row["images"]])


def test_tokens_and_pixels_equal_internvl_processor(folder):
    from PIL import Image

    rows = _rows(folder, [ROW])
    processor = hf_processor(folder / "hf")
    # InternVLProcessor reads an image where the text has <IMG_CONTEXT> (its chat template writes it there).
    text = processor.tokenizer.apply_chat_template(ROW["messages"], tokenize=False).replace("<image>", "<IMG_CONTEXT>")
    images = [Image.open(folder / name).convert("RGB") for name in ROW["images"]]
    expected = processor(images=images, text=[text], return_tensors="pt")
    ids = expected["input_ids"][0]
    row = rows[0]
    assert row["tokens"][:len(ids)].tolist() == ids.tolist()
    tiles = processor.image_processor(images=images, crop_to_patches=True)["num_patches"]
    assert list(tiles) == [7, 3]  # the two sizes tile differently (6 + thumbnail, 2 + thumbnail)
    per_tile = tokens_per_tile("qwen2")
    assert (row["image_index"] >= 0).sum() == (ids == processor.image_token_id).sum() == 10 * per_tile
    pixels = _pixels(row)
    assert pixels.shape == (10, 3, 56, 56) and torch.equal(pixels, expected["pixel_values"])
    batch = rows.collate([row, row])  # the held tower gets the pixels as its own keyword
    assert batch.images is None and torch.equal(batch.media["pixel_values"], torch.cat([pixels] * 2))
    assert batch.image_index[1].max().item() == 2 * 10 * per_tile - 1
    # <img>, the image positions and </img> carry no loss and are never predicted.
    wrapped = np.isin(row["tokens"], processor.image_token_ids)
    assert not row["loss_mask"][wrapped].any() and not row["loss_mask"][:-1][wrapped[1:]].any()


def test_max_pixels_caps_the_tiles(folder):
    """data.max_pixels = 2 tiles' area: the processor's max_patches=2 (the folder says 6)."""
    from PIL import Image

    rows = _rows(folder, [ROW], f"data.max_pixels={2 * 56 * 56 + 100}")
    images = [Image.open(folder / name).convert("RGB") for name in ROW["images"]]
    expected = hf_processor(folder / "hf").image_processor(images=images, crop_to_patches=True, max_patches=2,
                                                            return_tensors="pt")
    assert expected["num_patches"].tolist() == [1, 3]  # the landscape fits one tile; the portrait 2 + thumbnail
    assert torch.equal(_pixels(rows[0]), expected["pixel_values"])
    assert (rows[0]["image_index"] >= 0).sum() == 4 * tokens_per_tile("qwen2")


def test_truncation_never_cuts_an_image(folder):
    """data.truncation=truncate: a cut inside an image (or its <img> ... </img>) drops the row; a cut after the
    first image's answer keeps that image and leaves the second one out with its tokens."""
    row = {"messages": [{"role": "user", "content": "<image> What is in the picture?"},
                        {"role": "assistant", "content": "A temple."},
                        {"role": "user", "content": "And <image>?"}, {"role": "assistant", "content": "A flower."}],
           "images": ROW["images"]}
    full = _rows(folder, [row])[0]
    end = hf_processor(folder / "hf").end_image_token_id
    first_end = int(np.flatnonzero(full["tokens"] == end)[0])  # </img> of the first image
    with pytest.raises(DataError, match="1 dropped"):
        _rows(folder, [row], "data.truncation=truncate", seq_length=first_end)  # </img> would be cut off
    second_start = int(np.flatnonzero(full["image_index"] >= 7 * tokens_per_tile("qwen2"))[0])
    kept = _rows(folder, [row], "data.truncation=truncate", seq_length=second_start - 2)[0]
    assert _pixels(kept).shape[0] == 7 and (kept["image_index"] >= 0).sum() == 7 * tokens_per_tile("qwen2")
    assert kept["tokens"].tolist() == full["tokens"][:second_start - 2].tolist()


def test_corrupt_image_is_one_line(folder):
    row = dict(ROW, images=["img/china.jpg", "img/broken.jpg"])
    with pytest.raises(DataError) as e:
        _rows(folder, [row])
    assert "d.jsonl:1" in str(e.value) and "broken.jpg" in str(e.value) and "\n" not in str(e.value)


def test_remote_code_folder_is_refused_naming_the_hf_checkpoint(tmp_path):
    from megatron_swift.config.validate import ConfigError, validate

    folder = tmp_path / "InternVL3-1B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "auto_map": {},
        "llm_config": {"model_type": "qwen2"}, "vision_config": {"model_type": "intern_vit_6b"}}))
    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=internvl", f"model.pretrained={folder}"]), 1)
    line = str(e.value)
    assert "OpenGVLab/InternVL3-1B-hf" in line and "InternVLForConditionalGeneration" in line and "config.json" in line


@pytest.mark.parametrize("shape", ["qwen2", "qwen3"])
def test_config_written_from_the_architecture_equals_transformers(tmp_path, shape):
    """families/internvl.py reads an HF config.json and writes one back (an export without a source folder):
    transformers reads both as the same InternVLConfig."""
    import transformers

    from megatron_swift.models import families
    from tests.internvl_tiny import SHAPES

    spec = SHAPES[shape]
    text_cls, text = spec["text"]
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(**spec["vision"]), image_token_id=5,
        text_config=getattr(transformers, text_cls)(vocab_size=320, **text), image_seq_length=tokens_per_tile(shape),
        tie_word_embeddings=text["tie_word_embeddings"])
    config.architectures = ["InternVLForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    arch = resolve(compose(["+model=internvl", f"model.pretrained={tmp_path}"]).model)
    written = families.get("internvl").write_hf(arch.plain(), "float32")
    volatile = ("transformers_version", "dtype", "torch_dtype")

    def plain(c):
        out = {k: v for k, v in c.to_dict().items() if k not in volatile}
        for sub in ("text_config", "vision_config"):
            out[sub] = {k: v for k, v in out[sub].items() if k not in volatile}
        text = out["text_config"]  # Qwen2 derives head_dim when it is not written
        text["head_dim"] = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        return out

    assert plain(transformers.InternVLConfig.from_dict(written)) == plain(config)


@pytest.mark.parametrize("freeze,trains", [
    ([], {"projector", "llm"}),  # the tower is frozen by default (train.train_vision=false)
    (["llm"], {"projector"}), (["projector"], {"llm"})])
def test_freeze_groups_split_the_held_tower_from_its_projector(freeze, trains):
    """train.freeze groups on the held modules' real parameter names (the tower built on the meta device):
    vision = InternViT, projector = the MLP projector, llm = the language model."""
    from types import SimpleNamespace

    from megatron_swift.models.families.internvl import FREEZE_GROUPS, HELD, tower_config
    from megatron_swift.models.internvl_tower import build_internvl_tower
    from megatron_swift.tuners.freeze import set_trainable

    arch = resolve(compose(["+model=internvl"]).model)
    with torch.device("meta"):
        tower = build_internvl_tower(tower_config(arch), "eager")
    names = [HELD + n for n, _ in tower.named_parameters()] + [
        "language_model.embedding.word_embeddings.weight", "language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    named = [(n, torch.nn.Parameter(torch.zeros(1))) for n in names]
    train = SimpleNamespace(train_vision=False, freeze=freeze, freeze_regex=None, trainable_regex=None)
    set_trainable(named, SimpleNamespace(name="none", modules_to_save=[]), train, True, FREEZE_GROUPS)
    part = {"vision_tower": "vision", "multi_modal_projector": "projector"}
    got = {("llm" if n.startswith("language_model.") else part[n[len(HELD):].split(".")[0]])
           for n, p in named if p.requires_grad}
    assert got == trains


def test_pixel_limits_are_checked_with_the_key():
    from megatron_swift.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=internvl", "data=vl_sft", "data.max_pixels=0", "data.min_pixels=5"]), 1)
    assert "data.max_pixels=0: a positive pixel count" in str(e.value)
    assert "data.min_pixels=5 is above data.max_pixels=0" in str(e.value)


def test_tower_flops_per_token_equal_torch_flop_counter(folder):
    """The step FLOPs' count of the held tower (families/internvl.tower_flops_per_token) against torch's own
    FlopCounterMode over transformers' get_image_features on 3 tiles: the forward per image token agrees."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_swift.models.families.internvl import tower_config
    from megatron_swift.models.internvl_tower import build_internvl_tower, internvl_features

    arch = resolve(compose(["+model=internvl", f"model.pretrained={folder / 'hf'}"]).model)
    tower = build_internvl_tower(tower_config(arch), "eager")  # attention as matmuls, which the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = internvl_features(tower, torch.randn(3, 3, 56, 56))
    frozen, trained = (arch.family.tower_flops_per_token(arch, t) for t in (False, True))
    tower_macs = (trained - frozen) / 4  # frozen: 2 x (tower + 3 projector), trained: 2 x (3 tower + 3 projector)
    projector_macs = (frozen - 2 * tower_macs) / 6
    assert counter.get_total_flops() / len(features) == pytest.approx(2 * (tower_macs + projector_macs), rel=1e-6)


@pytest.mark.parametrize("shape", ["qwen2", "qwen3"])
def test_tower_params_equal_transformers_module(tmp_path, shape):
    """The planner's count of the held tower (from the config alone) equals transformers' modules' numel."""
    import transformers

    from megatron_swift.models.families.internvl import tower_config
    from megatron_swift.models.internvl_tower import build_internvl_tower
    from tests.internvl_tiny import SHAPES

    spec = SHAPES[shape]
    text_cls, text = spec["text"]
    vision = dict(spec["vision"], use_mean_pooling=shape == "qwen2", use_mask_token=shape == "qwen3")
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(**vision), image_token_id=5,
        text_config=getattr(transformers, text_cls)(vocab_size=320, **text), image_seq_length=tokens_per_tile(shape))
    config.architectures = ["InternVLForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    arch = resolve(compose(["+model=internvl", f"model.pretrained={tmp_path}"]).model)
    with torch.device("meta"):
        tower = build_internvl_tower(tower_config(arch), "eager")
    want = {"encoder": sum(p.numel() for p in tower.vision_tower.parameters()),
            "projector": sum(p.numel() for p in tower.multi_modal_projector.parameters())}
    assert arch.family.tower_params(arch) == want
