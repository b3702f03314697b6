"""Vision encoders on megatron-core (models/vision.py, convert/tables.vit_style): features equal transformers'
CLIPVisionModel / SiglipVisionModel hidden states at the layer a LLaVA model reads, on a real photograph."""
from __future__ import annotations

import pytest
import torch


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/conftest.py


def _photo():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))  # a real JPEG that scikit-learn ships


def _hf_encoder(kind: str, folder):
    import transformers

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                 patch_size=14)
    if kind == "clip":
        config = transformers.CLIPVisionConfig(**shape, hidden_act="quick_gelu")
        model = transformers.CLIPVisionModel(config)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    else:
        config = transformers.SiglipVisionConfig(**shape)
        model = transformers.SiglipVisionModel(config)
        processor = transformers.SiglipImageProcessor(size={"height": 56, "width": 56})
    torch.manual_seed(0)
    with torch.no_grad():  # random norms and biases: a tensor loaded into the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    model.eval().save_pretrained(folder)
    return model, config, processor


@pytest.mark.parametrize("kind,feature_layer", [("clip", -2), ("siglip", -1)])
def test_vision_features_equal_transformers(tmp_path, kind, feature_layer):
    from megatron_swift.convert.hf_load import load_vision_weights
    from megatron_swift.models.vision import build_vision_model, vision_arch, vision_config

    hf, config, processor = _hf_encoder(kind, tmp_path)
    pixels = processor(images=_photo(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    arch = vision_arch(config.to_dict(), feature_layer)
    assert arch.num_layers == (2 if kind == "clip" else 3)
    model = build_vision_model(arch, vision_config(arch, use_cpu_initialization=True)).eval()
    reader = load_vision_weights(model, str(tmp_path), arch)
    unread = {n for n in reader.file_of if n not in reader.used}
    # What a LLaVA model does not use: the layers after the feature layer, the post-layernorm, SigLIP's head.
    assert all(".layers.2." in n or "post_layernorm" in n or n.startswith("head.") for n in unread), unread
    assert any("post_layernorm" in n for n in unread)
    with torch.no_grad():
        got = model(pixels)
    assert got.shape == expected.shape  # CLIP: the class token first, then 16 patches
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind,feature_layer", [("clip", -2), ("siglip", -1)])
def test_vision_features_under_tensor_parallelism(tmp_path, kind, feature_layer):
    """Two TP ranks: Q/K/V split by heads, the MLP and projections by rows/columns, the result the same."""
    import subprocess

    from tests.conftest import ROOT, launch_cmd, train_env

    hf, _, processor = _hf_encoder(kind, tmp_path / "hf")
    pixels = processor(images=_photo(), return_tensors="pt")["pixel_values"]
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    out = tmp_path / "features.pt"
    cmd = launch_cmd(2, [str(tmp_path / "hf"), str(tmp_path / "pixels.pt"), str(feature_layer), str(out)],
                     script=ROOT / "tests" / "multiproc" / "vision_worker.py")
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got.shape == expected.shape and (got - expected).abs().max().item() < 1e-5
