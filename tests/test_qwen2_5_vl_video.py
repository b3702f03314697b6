"""Qwen2.5-VL video rows (data/videos.py through data/vl_sft.py): an mp4 made here with PyAV (crops panning across
a real photograph) decodes to the frames transformers' sampling rule takes; token counts and grids follow
transformers' formula; pixel_values_videos is the image processor's output of each frame laid out as
transformers' video patchify does; the M-RoPE streams are get_rope_index's (second_per_grid_ts honoured); rows
mixing images and videos number their feature rows in the tower's order (images, then videos) across packed
samples and micro-batches; each bad input is one line naming file:line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_qwen2_5_vl_data import MAX, MIN, PAD, SPECIALS, qwen  # noqa: F401 (fixture)
from tests.test_vl_data import CHATML, _cfg, _row, _write, folders  # noqa: F401 (fixture)

VIDEO_PAD = 6
FRAMES, FILE_FPS, VIDEO_FPS = 8, 8, 4.0  # 1 s of video sampled at 4 fps: frames 0, 2, 4, 6
SAMPLED = [0, 2, 4, 6]


def pan_frames(n: int = FRAMES):
    """112 x 84 crops of china.jpg moving right 40 px a frame."""
    import os

    import sklearn.datasets
    from PIL import Image

    photo = Image.open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg"))
    return [photo.convert("RGB").crop((40 * i, 100, 40 * i + 112, 184)) for i in range(n)]


def write_mp4(path, frames, fps: int) -> str:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"qscale": "1"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def media(folders):  # noqa: F811
    """clip.mp4 (8 frames at 8 fps), a still frame file, and a corrupt mp4, under img/."""
    pytest.importorskip("av")  # the [video] extra (in [test]); pan_frames is also used without it
    clip = write_mp4(folders / "img" / "clip.mp4", pan_frames(), FILE_FPS)
    pan_frames(1)[0].save(folders / "img" / "still.png")
    (folders / "img" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 200)
    return clip


def video_vision(qwen, **settings):  # noqa: F811
    from megatron_swift.data.videos import qwen_video_data, video_settings
    from megatron_swift.models.families.qwen2_5_vl import qwen_vision_data

    processor = qwen[2].image_processor
    cfg = _cfg(video_fps=VIDEO_FPS, video_min_pixels=MIN, video_max_pixels=MAX, **settings)
    return qwen_vision_data(processor, qwen[3], video=qwen_video_data(processor, video_settings({}, cfg), VIDEO_PAD))


def source(folders, qwen, rows, seq_length=400, **cfg):  # noqa: F811
    from megatron_swift.data.vl_sft import vl_sft_source

    path = _write(folders / "v.jsonl", rows)
    return vl_sft_source([path], _cfg(video_fps=VIDEO_FPS, **cfg), qwen[0], seq_length, None,
                         str(folders / "qwen" / "tok"), video_vision(qwen))


def hf_frames(path):
    """transformers' own PyAV reader with its sampling rule's indices (what the video processor would get)."""
    from transformers.video_utils import read_video_pyav

    frames, metadata = read_video_pyav(path, lambda metadata, **_: np.asarray(SAMPLED))
    return frames, metadata


def test_mp4_decodes_to_the_sampled_frames_at_the_chosen_fps(media):
    """8 frames at 8 fps sampled at 4 fps: transformers' rule (n = 8 / 8 x 4 = 4, arange(0, 8, 2)) and our
    decoder give frames 0, 2, 4, 6, each nearest to the crop it was encoded from; the sampled rate is 4 fps."""
    from megatron_swift.data.videos import VideoSettings, read_frames, read_header, sample_indices

    settings = VideoSettings(fps=VIDEO_FPS)
    header = read_header(media)
    assert (header.frames, header.fps, header.width, header.height) == (FRAMES, FILE_FPS, 112, 84)
    assert sample_indices(header.frames, header.fps, settings, 2) == SAMPLED
    frames, fps = read_frames(media, settings, 2)
    assert len(frames) == 4 and fps == VIDEO_FPS
    sources = np.stack([np.asarray(f, dtype=np.float32) for f in pan_frames()])
    for k, frame in zip(SAMPLED, frames):
        errors = np.abs(sources - np.asarray(frame, dtype=np.float32)).mean(axis=(1, 2, 3))
        assert errors.argmin() == k and errors[k] < 20, (k, errors)  # lossy mpeg4; other crops are > 60 off
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), hf_frames(media)[0])


ROW = _row("<image>Look.<video>What happens?", "A temple, then the sky.", images=["img/china.jpg"])
ROW["videos"] = ["img/clip.mp4"]


def test_video_tokens_pixels_and_positions_equal_transformers(folders, qwen, media):  # noqa: F811
    import transformers
    from transformers.image_utils import load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from megatron_swift.models.families.qwen2_5_vl import hf_config

    rows = source(folders, qwen, [ROW])
    row = rows[0]
    image, video = row["images"]
    processor = qwen[2]
    # grid and token count: transformers' formula (smart_resize at the video's min/max pixels, ceil(F / 2))
    h, w = smart_resize(84, 112, 28, MIN, MAX)
    assert video["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]
    T = 2 * h * w // 14 ** 2 // 4
    # ids: the tokenizer's on the text with each pad written out T times, as Qwen2_5_VLProcessor's
    # replace_image_token / replace_video_token do (its __call__ refuses videos without torchvision)
    want = processor.image_processor(images=[load_image(str(folders / "img" / "china.jpg"))], return_tensors="pt")
    text = processor.tokenizer.apply_chat_template(ROW["messages"], tokenize=False, chat_template=CHATML)
    text = text.replace("<image>", "<|vision_start|>" + "<|image_pad|>" * (int(want["image_grid_thw"].prod()) // 4)
                        + "<|vision_end|>")
    text = text.replace("<video>", "<|vision_start|>" + "<|video_pad|>" * T + "<|vision_end|>")
    ids = torch.tensor(processor.tokenizer(text)["input_ids"])
    assert row["tokens"][:len(ids)].tolist() == ids.tolist() and int((ids == VIDEO_PAD).sum()) == T
    assert torch.equal(image["pixel_values"], want["pixel_values"])
    # pixels: each temporal half is the image processor's output of that (transformers-decoded) frame
    frames, metadata = hf_frames(media)
    size = {"shortest_edge": MIN, "longest_edge": MAX}
    rows_per_t = h * w // 14 ** 2
    got = video["pixel_values_videos"].reshape(2, rows_per_t, 3, 2, 14 * 14)
    for k, frame in enumerate(frames):
        alone = processor.image_processor(images=[frame], size=size, return_tensors="pt")["pixel_values"]
        assert torch.equal(got[k // 2, :, :, k % 2], alone.reshape(rows_per_t, 3, 2, -1)[:, :, 0]), k
    # second_per_grid_ts = temporal patch / sampled fps (Qwen2_5_VLProcessor), and get_rope_index's streams
    assert video["second_per_grid_ts"].tolist() == [2 / (len(SAMPLED) / metadata.total_num_frames * metadata.fps)]
    model = transformers.Qwen2_5_VLModel(hf_config(qwen[3]))
    types_ = torch.where(ids == VIDEO_PAD, 2, (ids == PAD).long())[None]
    streams, _ = model.get_rope_index(ids[None], mm_token_type_ids=types_, image_grid_thw=image["image_grid_thw"],
                                      video_grid_thw=video["video_grid_thw"],
                                      second_per_grid_ts=video["second_per_grid_ts"])
    assert np.array_equal(row["positions"][:, :len(ids)], streams[:, 0].numpy())
    plain, _ = model.get_rope_index(ids[None], mm_token_type_ids=types_, image_grid_thw=image["image_grid_thw"],
                                    video_grid_thw=video["video_grid_thw"])
    assert not torch.equal(plain, streams)  # 0.5 s per temporal patch, not 1: the streams differ
    assert not row["loss_mask"][(row["tokens"] == VIDEO_PAD) | (row["tokens"] == PAD)].any()


def test_a_still_two_frame_video_equals_its_image(folders, qwen, media):  # noqa: F811
    """Frame files: a 2-frame video of one repeated frame has the image path's pixel rows exactly (the image
    processor repeats a frame temporal_patch_size times) and, at 2 fps, one second per temporal patch."""
    from PIL import Image

    row = dict(_row("<video>What is it?", "A temple."), videos=[["img/still.png", "img/still.png"]])
    video = source(folders, qwen, [row])[0]["images"][0]
    still = Image.open(folders / "img" / "still.png").convert("RGB")
    alone = qwen[2].image_processor(images=[still], size={"shortest_edge": MIN, "longest_edge": MAX},
                                    return_tensors="pt")
    assert torch.equal(video["pixel_values_videos"], alone["pixel_values"])
    assert torch.equal(video["video_grid_thw"], alone["image_grid_thw"])
    assert video["second_per_grid_ts"].tolist() == [2 / VIDEO_FPS]


MIXED = [ROW, dict(_row("<video>And now?", "The sky."), videos=["img/clip.mp4"]),
         _row("<image>What is in the picture?", "A flower.", images=["img/portrait.png"])]


def _placed(batch):
    """Per position of the micro-batch (row-major), the feature row placed there, for image and video ids."""
    tokens = torch.as_tensor(batch.tokens)
    return batch.image_index[tokens == PAD], batch.image_index[tokens == VIDEO_PAD]


def test_mixed_rows_number_features_images_then_videos(folders, qwen, media):  # noqa: F811
    """Micro-batches of rows with images and videos, unpacked and packed: image positions take feature rows
    0..I-1 in reading order, video positions I..I+V-1 (the tower returns a micro-batch's images, then its
    videos); the media concatenate per name; a packed row's streams are its samples' own."""
    from PIL import Image

    portrait = folders / "img" / "portrait.png"
    if not portrait.exists():
        Image.open(folders / "img" / "flower.jpg").convert("RGB").crop((200, 0, 440, 427)).save(portrait)
    unpacked = source(folders, qwen, MIXED)
    packed = source(folders, qwen, MIXED, packing=True)
    for rows, items in ((unpacked, [unpacked[i] for i in range(3)]), (packed, [packed[i] for i in range(len(packed))])):
        batch = rows.collate(items)
        images = int(batch.media["image_grid_thw"].prod(-1).sum()) // 4
        videos = int(batch.media["video_grid_thw"].prod(-1).sum()) // 4
        assert len(batch.media["image_grid_thw"]) == 2 and len(batch.media["video_grid_thw"]) == 2
        assert len(batch.media["second_per_grid_ts"]) == 2
        at_images, at_videos = _placed(batch)
        assert torch.equal(at_images, torch.arange(images)) and torch.equal(at_videos, images + torch.arange(videos))
    lengths = [len(ids) for ids in packed.samples.ids]
    at = 0
    row = packed[0]
    for i in packed.rows[0]:
        assert np.array_equal(row["positions"][:, at:at + lengths[i]], unpacked[i]["positions"][:, :lengths[i]])
        at += lengths[i]


def test_truncation_never_cuts_a_video(folders, qwen, media):  # noqa: F811
    whole = source(folders, qwen, [ROW])
    start = int(whole.samples.starts[0][1])  # the video's first token
    cut = source(folders, qwen, [ROW, _row("Hi.", "Hello.")], seq_length=start + 3, truncation="truncate")
    assert "1 dropped" in cut.description


BAD = {
    "missing": (["img/nowhere.mp4"], r"v\.jsonl:1: video 'img/nowhere.mp4': not found at"),
    "corrupt": (["img/broken.mp4"], r"v\.jsonl:1: video 'img/broken.mp4': .*cannot be read as a video"),
    "count": (["img/clip.mp4", "img/clip.mp4"], r"v\.jsonl:1: 1 <video> tag but 2 videos"),
    "frame": ([["img/still.png", "img/nowhere.png"]], r"v\.jsonl:1: video \[.*\]: not found at"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_video_rows_name_file_and_line(folders, qwen, media, case):  # noqa: F811
    from megatron_swift.data.errors import DataError

    videos, message = BAD[case]
    row = dict(_row("<video>What happens?", "A dance."), videos=videos)
    with pytest.raises(DataError, match=message):
        source(folders, qwen, [row])
    skipped = source(folders, qwen, [row, dict(_row("<video>And?", "The sky."), videos=["img/clip.mp4"])],
                     on_error="skip")
    assert "1 bad rows skipped" in skipped.description


def test_videos_for_llava_are_refused_in_one_line(folders):  # noqa: F811
    from megatron_swift.data.errors import DataError
    from tests.test_vl_data import _source as llava_source

    row = dict(_row("<image>What happens next?", "A dance.", images=["img/china.jpg"]), videos=["img/clip.mp4"])
    with pytest.raises(DataError, match=r"\.jsonl:1: 'videos': this model takes no video input"):
        llava_source(folders, [row])


def _transformers_video_defaults() -> dict:
    """Qwen2VLVideoProcessor's class attributes read from the installed transformers source (its module imports
    torchvision, so it is parsed, not imported)."""
    import ast
    import os

    import transformers

    path = os.path.join(os.path.dirname(transformers.__file__), "models", "qwen2_vl", "video_processing_qwen2_vl.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    return {n.targets[0].id: eval(compile(ast.Expression(n.value), path, "eval"))  # constant expressions only
            for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id in ("size", "min_frames", "max_frames")}


def test_video_settings_follow_the_folder_as_transformers_loads_it(tmp_path):
    """No config: transformers' Qwen2-VL video defaults; video_preprocessor_config.json before
    preprocessor_config.json (transformers' order); data.video_* win."""
    import json

    from megatron_swift.data.videos import folder_video_config, video_settings

    want = _transformers_video_defaults()
    got = video_settings(folder_video_config(str(tmp_path)), _cfg())
    assert (got.min_pixels, got.max_pixels, got.min_frames, got.max_frames, got.fps) == (
        want["size"]["shortest_edge"], want["size"]["longest_edge"], want["min_frames"], want["max_frames"], 2.0)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    got = video_settings(folder_video_config(str(tmp_path)), _cfg())
    assert (got.min_pixels, got.max_pixels) == (3136, 12845056)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 4096, "longest_edge": 65536}, "max_frames": 6, "image_mean": [0.5] * 3}))
    got = video_settings(folder_video_config(str(tmp_path)), _cfg(video_max_pixels=32768, video_fps=1.0))
    assert (got.min_pixels, got.max_pixels, got.max_frames, got.fps) == (4096, 32768, 6, 1.0)
    assert got.pixels == {"image_mean": [0.5] * 3}


def test_video_settings_are_checked_with_the_key():
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=r"data\.video_fps=0\.0: must be positive"):
        validate(compose(["+model=qwen2_5_vl", "data=vl_sft", "data.video_fps=0"]), 1)
