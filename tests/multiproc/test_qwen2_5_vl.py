"""Qwen2.5-VL (families/qwen2_5_vl.py: transformers' tower held whole per TP rank, M-RoPE language model on
megatron-core): the Megatron model built from an HF ``Qwen2_5_VLForConditionalGeneration`` folder gives
transformers' logits on two real photographs of different sizes (different token counts, non-square), under
TP and PP; HF -> Megatron -> HF is bitwise. Ground truth: transformers' model, image processor and
``get_rope_index``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from tests.conftest import ROOT, launch_cmd, train_env
from tests.multiproc.test_vlm import WORKER, photos

VOCAB, IMAGE, VIDEO, START, END = 300, 290, 291, 292, 293
MAX_PIXELS = 28 * 28 * 24  # at most 24 merged tokens per image: tiny shapes


def tiny_qwen_vl(folder):
    """A random tiny HF Qwen2.5-VL (random norms and biases, so a skipped tensor shows; a 3-block tower whose
    56-px windows split every image, with block 1 on full attention) and its image processor, saved."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                           video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=MAX_PIXELS)
    processor.save_pretrained(folder)
    return model, processor


def two_photos():
    """china.jpg as shipped (landscape) and a portrait crop of flower.jpg: different token counts."""
    china, flower = photos()
    return [china, flower.crop((200, 0, 440, 427))]


def four_frame_video(processor):
    """A 4-frame video (crops panning across china.jpg) as data/videos.py makes its inputs: [2, 6, 8] grid, 24
    tokens, half a second per temporal patch."""
    from megatron_swift.data.videos import QwenVideo, VideoSettings
    from tests.test_qwen2_5_vl_video import pan_frames

    pixels, grid = QwenVideo(processor, VideoSettings(min_pixels=28 * 28 * 4, max_pixels=MAX_PIXELS)).pixels(
        pan_frames(4))
    return {"media.pixel_values_videos": pixels, "media.video_grid_thw": grid,
            "media.second_per_grid_ts": torch.tensor([0.5])}


def inputs(model, processor, video: bool = False):
    """Two rows, one photograph each at different places, with the vision start/end tokens around the image
    tokens as the chat template writes them (``video``: the second row also has a 4-frame video after its
    photograph): ids, the processor's pixels and grids, our image_index (video feature rows after all image
    rows, the tower's order), and the M-RoPE positions transformers' get_rope_index gives (the model's own
    method, the ground truth)."""
    pix = processor(images=two_photos(), return_tensors="pt")
    grid = pix["image_grid_thw"]
    counts = (grid.prod(-1) // 4).tolist()
    assert counts[0] != counts[1], counts
    clip = four_frame_video(processor) if video else {}
    frames = int(clip["media.video_grid_thw"].prod()) // 4 if video else 0
    seq = max(counts[0] + 20, counts[1] + frames + 20)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, IMAGE, (2, seq), generator=g)
    index, types_ = torch.full((2, seq), -1), torch.zeros(2, seq, dtype=torch.long)
    before = 0
    for row, start in ((0, 2), (1, 6)):
        n = counts[row]
        tokens[row, start - 1], tokens[row, start + n] = START, END
        tokens[row, start:start + n] = IMAGE
        index[row, start:start + n] = torch.arange(n) + before
        types_[row, start:start + n] = 1
        before += n
    if video:  # in row 1, three text tokens after the photograph's end
        start = 6 + counts[1] + 4
        tokens[1, start - 1], tokens[1, start + frames] = START, END
        tokens[1, start:start + frames] = VIDEO
        index[1, start:start + frames] = before + torch.arange(frames)
        types_[1, start:start + frames] = 2
    positions, _ = model.model.get_rope_index(
        tokens, mm_token_type_ids=types_, image_grid_thw=grid, video_grid_thw=clip.get("media.video_grid_thw"),
        second_per_grid_ts=clip.get("media.second_per_grid_ts"))
    return {"tokens": tokens, "image_index": index, "position_ids": positions, "mm_token_type_ids": types_,
            "media.pixel_values": pix["pixel_values"], "media.image_grid_thw": grid, **clip}


def hf_logits(model, batch: dict) -> torch.Tensor:
    """transformers' logits of the batch (its images and, if any, its video)."""
    media = {k[len("media."):]: v for k, v in batch.items() if k.startswith("media.")}
    with torch.no_grad():
        return model(input_ids=batch["tokens"], mm_token_type_ids=batch["mm_token_type_ids"], **media).logits.float()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_vl") / "hf"
    model, processor = tiny_qwen_vl(folder)
    batch = inputs(model, processor, video=True)
    return folder, model, processor, batch, hf_logits(model, batch)


def test_mrope_positions_are_get_rope_index(hf):
    """models/mrope.hf_rope_index runs transformers' get_rope_index on the config alone: the same streams."""
    from megatron_swift.models.mrope import hf_rope_index

    folder, model, _, batch, _ = hf
    got = hf_rope_index(transformers.Qwen2_5_VLModel, model.config, batch["tokens"], batch["mm_token_type_ids"],
                        batch["media.image_grid_thw"], batch["media.video_grid_thw"], batch["media.second_per_grid_ts"])
    assert torch.equal(got, batch["position_ids"])
    assert not torch.equal(got[1], got[2])  # the image rows really have 2-D positions


def megatron_logits(tmp_path, batch: dict, nproc: int, overrides):
    torch.save({k: v for k, v in batch.items() if k != "mm_token_type_ids"}, tmp_path / "inputs.pt")
    out = tmp_path / "out.pt"
    base = ["+model=qwen2_5_vl", "train.precision=fp32", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}",
            "logging.tensorboard=false"]
    proc = subprocess.run(launch_cmd(nproc, [str(tmp_path / "inputs.pt"), str(out), *base, *overrides],
                                     script=WORKER), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


# The two photographs and a 4-frame video (check.py's run below also has the photographs at TP=1).
CASES = {"tp1": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"])}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen2_5_vl_logits_equal_transformers(tmp_path, hf, case):
    folder, _, _, batch, expected = hf
    nproc, layout = CASES[case]
    got = megatron_logits(tmp_path, batch, nproc, [f"model.pretrained={folder}", *layout])
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    assert diff < 1e-4, f"{case}: max |logit diff| {diff}"


def test_hf_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, hf):
    """HF -> Megatron (converter tool, TP=2) -> HF: every tensor bitwise, config.json equal; transformers loads
    the export with nothing missing and gives the same logits; the image processor is copied along."""
    from safetensors.torch import load_file

    folder, model, _, batch, expected = hf
    run, out = tmp_path / "mcore", tmp_path / "out"
    proc = subprocess.run(launch_cmd(2, ["--hf", str(folder), "--out", str(run), "--tp", "2", "train.device=cpu"],
                                     script=ROOT / "tools" / "convert" / "hf_to_mcore.py"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "mcore_to_hf.py"), "--ckpt", str(run),
                           "--out", str(out)], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    volatile = ("transformers_version", "torch_dtype", "dtype")  # the exporter writes the dtype as torch_dtype
    config = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in volatile}
    assert config == {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in volatile}
    assert (out / "preprocessor_config.json").read_text() == (folder / "preprocessor_config.json").read_text()
    reloaded, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(hf_logits(reloaded.float().eval(), batch), expected)


def test_config_written_without_a_source_is_the_same_model(hf):
    """family.write_hf(read_hf(config.json)) (an export with no source folder) describes the same transformers
    model: equal Qwen2_5_VLConfig dicts."""
    import dataclasses

    from megatron_swift.models import families
    from megatron_swift.models.arch import Arch

    folder = hf[0]
    family = families.get("qwen2_5_vl")
    source = json.loads((folder / "config.json").read_text())
    fields = dict(dataclasses.asdict(family.size("tiny")), **family.read_hf(source, str(folder)))
    written = family.write_hf(Arch(family=family, **fields).plain(), "float32")
    assert transformers.Qwen2_5_VLConfig(**written).to_dict() == transformers.Qwen2_5_VLConfig(**source).to_dict()


def test_check_tool_with_images_at_tp1(tmp_path, hf):
    """tools/convert/check.py --image (the folder's own image processor; the two photographs in one row, M-RoPE
    positions continuing across them) reports transformers' logits at TP=1."""
    folder = hf[0]
    paths = []
    for i, photo in enumerate(two_photos()):
        paths.append(str(tmp_path / f"photo{i}.png"))
        photo.save(paths[-1])
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "check.py"), "--hf", str(folder),
                           "--image", *paths, "--seq", "6", "--report", str(report), "train.device=cpu"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "top-1 agreement" in proc.stdout
    figures = json.loads(report.read_text())
    assert figures["max_abs_diff"] < 1e-4 and figures["token_agreement"] == 1.0, figures


def training_folder(root):
    """An HF folder a run trains from: the tiny model with a tokenizer whose special tokens are the config's
    vision ids (trained on the fly), a ChatML template and the image processor; plus 16 SFT rows alternating the
    two photographs."""
    import os
    import shutil

    import sklearn.datasets

    from tests.conftest import bpe_tokenizer
    from tests.test_vl_data import CHATML

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = bpe_tokenizer(["What is in the picture? A temple, a flower and the sky.",
                         "system user assistant says hello"], specials)
    text = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, window_size=56, out_hidden_size=64,
                  fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=5,
                                           video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(root / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>").save_pretrained(root / "hf")
    (root / "hf" / "chat_template.jinja").write_text(CHATML)
    transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=MAX_PIXELS).save_pretrained(root / "hf")
    images = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    shutil.copy(os.path.join(images, "china.jpg"), root / "china.jpg")
    two_photos()[1].save(root / "portrait.png")
    rows = [{"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                          {"role": "assistant", "content": ["A temple.", "A flower, red."][i % 2]}],
             "images": [["china.jpg", "portrait.png"][i % 2]]} for i in range(16)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    return training_folder(tmp_path_factory.mktemp("qwen_vl_train"))


def test_packed_rows_under_cp2_give_transformers_per_token_losses(tmp_path, train_root):
    """CP=2 (M-RoPE positions whole, image features placed by each rank's own positions): rows packed with
    images of two sizes give every token the loss it has alone in a row, and that loss is transformers' (its
    model on the sample's ids, the processor's pixels, its own positions) within 1e-5."""
    import torch.nn.functional as F
    from PIL import Image

    root = train_root
    out = tmp_path / "losses.pt"
    overrides = ["+model=qwen2_5_vl", f"model.pretrained={root / 'hf'}", "data=vl_sft",
                 f"data.path=[{root / 'd.jsonl'}]", "train.seq_length=160", "train.precision=fp32", "train.device=cpu",
                 f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", "parallel.cp=2"]
    proc = subprocess.run(launch_cmd(2, [str(out), *overrides], script=ROOT / "tests" / "multiproc" /
                                     "sft_loss_worker.py"), cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = torch.load(out, weights_only=True)
    assert sorted(result["unpacked"]) == sorted(result["packed"]) == list(range(16))
    assert result["rows"] <= 8  # rows really hold several samples, each with its image
    for sample, losses in result["unpacked"].items():
        assert (losses - result["packed"][sample]).abs().max().item() < 1e-5, sample
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "hf").float().eval()
    processor = transformers.AutoImageProcessor.from_pretrained(root / "hf", backend="pil")
    rows = [json.loads(line) for line in (root / "d.jsonl").read_text().splitlines()]
    for sample in (0, 1):  # one of each photograph
        ids = result["ids"][sample][None]
        pixels = processor(images=[Image.open(root / rows[sample]["images"][0]).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                           mm_token_type_ids=(ids == 5).long()).logits[0, :-1]
        want = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        assert (result["unpacked"][sample] - want).abs().max().item() < 1e-5, sample


TRAIN_LAYOUTS = {"tp2-sp": ["parallel.tp=2", "parallel.sp=true"], "pp2": ["parallel.pp=2"],
                 "dp2-distopt": ["parallel.distributed_optimizer=true"]}


def _training_overrides(root) -> list:
    return ["+model=qwen2_5_vl", f"model.pretrained={root / 'hf'}", "data=vl_sft", f"data.path=[{root / 'd.jsonl'}]",
            "train.precision=fp32", "train.train_iters=3", "train.global_batch_size=4", "train.micro_batch_size=1",
            "train.seq_length=64", "train.save_at_end=false", "train.lr=1e-3", "train.lr_warmup_iters=1",
            "logging.tensorboard=false", "train.train_vision=true"]


@pytest.fixture(scope="module")
def one_rank_training(tmp_path_factory, train_root):
    """The metrics rows of 3 SFT steps with images on one rank (the baseline of every layout)."""
    from tests.conftest import read_metrics, run_train

    out = tmp_path_factory.mktemp("one_rank")
    run_train(1, [*_training_overrides(train_root), f"train.output_dir={out}"])
    return read_metrics(out)


@pytest.mark.parametrize("layout", list(TRAIN_LAYOUTS))
def test_training_with_images_equals_one_rank(tmp_path, train_root, one_rank_training, layout):
    """3 steps of SFT with images (tower, merger and language model all training) under TP=2 + SP, PP=2 (the
    tower on the first stage) and DP=2 with the distributed optimizer report the one-rank run's losses and
    gradient norms within 1e-5: the held tower's gradients are equal on the TP ranks and counted once in the
    norm, and reduced over DP like any replicated parameter."""
    from tests.conftest import read_metrics, run_train

    run_train(2, [*_training_overrides(train_root), *TRAIN_LAYOUTS[layout], f"train.output_dir={tmp_path}"])
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, one_rank_training):
        assert abs(got["loss"] - want["loss"]) < 1e-5, (got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]
