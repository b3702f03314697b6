"""LLaVA-style VLMs (families/llava.py, models/vlm.py): the Megatron model built from an HF
``LlavaForConditionalGeneration`` folder gives transformers' logits on real photographs, under TP and PP; the
exported HF folder is the same checkpoint (ground truth: transformers)."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
import transformers

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "vlm_logits_worker.py"
VOCAB, IMAGE_TOKEN, IMAGE_SIZE, PATCH = 300, 299, 56, 14
SEQ = 48


def photos():
    """scikit-learn's two JPEGs (real photographs we did not make)."""
    import sklearn.datasets
    from PIL import Image

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [Image.open(os.path.join(folder, name)).convert("RGB") for name in ("china.jpg", "flower.jpg")]


def tiny_llava(kind: str, folder, tie: bool = False):
    """A random tiny HF LLaVA (random norms and biases too, so a skipped tensor shows) saved to ``folder``;
    returns (model, image processor). clip: CLIP + Qwen2, feature layer -2, class token dropped;
    siglip: SigLIP + Qwen3, last layer, all features."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    if kind == "clip":
        vision, text_config = transformers.CLIPVisionConfig(**common), transformers.Qwen2Config(**text)
        llava = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    else:
        vision, text_config = transformers.SiglipVisionConfig(**common), transformers.Qwen3Config(head_dim=16, **text)
        llava = dict(vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=16)
        processor = transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE_TOKEN,
                                      projector_hidden_act="gelu", **llava)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def inputs(processor, tokens_per_image: int = 16):
    """Two rows, one photograph each at different places: HF's pre-expanded ids, pixels, and our image_index
    (row-major over the batch, as transformers fills the image tokens)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, IMAGE_TOKEN, (2, SEQ), generator=g)
    index = torch.full((2, SEQ), -1)
    for row, start in ((0, 1), (1, 10)):
        tokens[row, start:start + tokens_per_image] = IMAGE_TOKEN
        index[row, start:start + tokens_per_image] = torch.arange(tokens_per_image) + row * tokens_per_image
    pixels = processor(images=photos(), return_tensors="pt")["pixel_values"]
    return dict(tokens=tokens, images=pixels, image_index=index)


def megatron_logits(tmp_path, batch: dict, nproc: int, overrides, model: str = "llava"):
    torch.save(batch, tmp_path / "inputs.pt")
    out = tmp_path / "out.pt"
    base = [f"+model={model}", "train.precision=fp32", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}",
            "logging.tensorboard=false"]
    proc = subprocess.run(launch_cmd(nproc, [str(tmp_path / "inputs.pt"), str(out), *base, *overrides],
                                     script=WORKER), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


CASES = {
    "clip-qwen2-tp1": ("clip", 1, []),
    "clip-qwen2-tp2": ("clip", 2, ["parallel.tp=2"]),
    "clip-qwen2-pp2": ("clip", 2, ["parallel.pp=2"]),
    "siglip-qwen3-tp1": ("siglip", 1, []),
    "siglip-qwen3-tp2-local": ("siglip", 2, ["parallel.tp=2", "model.attention_backend=local"]),
    "siglip-qwen3-pp2": ("siglip", 2, ["parallel.pp=2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vlm_logits_equal_transformers(tmp_path, case):
    kind, nproc, layout = CASES[case]
    hf_model, processor = tiny_llava(kind, tmp_path / "hf")
    batch = inputs(processor)
    with torch.no_grad():
        expected = hf_model(input_ids=batch["tokens"], pixel_values=batch["images"]).logits.float()
    got = megatron_logits(tmp_path, batch, nproc, [f"model.pretrained={tmp_path / 'hf'}", *layout])
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    assert diff < 1e-4, f"{case}: max |logit diff| {diff}"
    # The images matter: without them (image tokens as plain tokens) the logits are far from transformers'.
    plain = megatron_logits(tmp_path, dict(batch, images=batch["images"][:0]), nproc,
                            [f"model.pretrained={tmp_path / 'hf'}", *layout]) if case.endswith("tp1") else None
    if plain is not None:
        assert (plain[..., :VOCAB] - expected).abs().max().item() > 1e-2


# --- InternVL (transformers' native format): held tower, tiles ------------------------------------------------

def internvl_inputs(shape: str, folder):
    """Two rows of random text, one photograph each (the two tile differently), each image as InternVLProcessor
    writes it: <img>, tiles x T <IMG_CONTEXT>, </img>; the pixels of all tiles from the folder's image processor
    (crop_to_patches, as the processor asks); image_index numbers the feature rows as transformers fills them."""
    from tests.internvl_tiny import VOCAB as IVL_VOCAB, hf_processor, photos, tokens_per_tile

    processor = hf_processor(folder)
    pixels = processor.image_processor(images=photos(), crop_to_patches=True, return_tensors="pt")
    counts = [n * tokens_per_tile(shape) for n in pixels["num_patches"].tolist()]
    seq = max(counts) + 24
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(len(processor.tokenizer), IVL_VOCAB, (2, seq), generator=g)  # no special token by chance
    index = torch.full((2, seq), -1)
    before = 0
    for row, (start, n) in enumerate(zip((3, 9), counts)):
        tokens[row, start - 1], tokens[row, start + n] = processor.start_image_token_id, processor.end_image_token_id
        tokens[row, start:start + n] = processor.image_token_id
        index[row, start:start + n] = torch.arange(n) + before
        before += n
    return {"tokens": tokens, "media.pixel_values": pixels["pixel_values"], "image_index": index}


INTERNVL_CASES = {"qwen2-pp2": ("qwen2", 2, ["parallel.pp=2"]), "qwen3-tp2": ("qwen3", 2, ["parallel.tp=2"])}


@pytest.mark.parametrize("case", list(INTERNVL_CASES))
def test_internvl_logits_equal_transformers(tmp_path, case):
    """InternVL (-hf) from an HF folder: logits equal InternVLForConditionalGeneration's on two photographs of
    different sizes (7 and 3 tiles; 5 and 3), at PP=2 and TP=2 (TP=1: the check tool's test below), two shapes:
    Qwen2 + LayerNorm InternViT with QK norm, 4 tokens a tile; Qwen3 tied + RMSNorm InternViT with 3 heads
    (held whole under TP=2), 16 tokens a tile."""
    from tests.internvl_tiny import VOCAB as IVL_VOCAB, tiny_internvl

    shape, nproc, layout = INTERNVL_CASES[case]
    hf_model = tiny_internvl(shape, tmp_path / "hf")
    batch = internvl_inputs(shape, tmp_path / "hf")
    with torch.no_grad():
        expected = hf_model(input_ids=batch["tokens"], pixel_values=batch["media.pixel_values"]).logits.float()
        # The pixels matter: other pixels move transformers' logits far more than the tolerance.
        other = hf_model(input_ids=batch["tokens"], pixel_values=batch["media.pixel_values"].flip(-1)).logits
    assert (other - expected).abs().max().item() > 1e-2
    got = megatron_logits(tmp_path, batch, nproc, [f"model.pretrained={tmp_path / 'hf'}", *layout], "internvl")
    diff = (got[..., :IVL_VOCAB] - expected).abs().max().item()
    print(f"internvl {case}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4, f"{case}: max |logit diff| {diff}"


def test_internvl_check_tool_with_images_at_tp1(tmp_path):
    """tools/convert/check.py --image on an InternVL folder (its own tiling processor; both photographs in one
    row, 7 + 3 tiles) reports transformers' logits at TP=1; a corrupt image is one line, exit 2."""
    import json
    import sys

    from tests.internvl_tiny import photos, tiny_internvl

    tiny_internvl("qwen2", tmp_path / "hf")
    paths = []
    for i, photo in enumerate(photos()):
        paths.append(str(tmp_path / f"photo{i}.png"))
        photo.save(paths[-1])
    report = tmp_path / "report.json"
    check = [sys.executable, str(ROOT / "tools" / "convert" / "check.py"), "--hf", str(tmp_path / "hf"), "--seq", "5"]
    proc = subprocess.run([*check, "--image", *paths, "--report", str(report), "train.device=cpu"], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(report.read_text())
    print(f"internvl check.py --image tp1: {figures}")
    assert figures["max_abs_diff"] < 1e-4 and figures["token_agreement"] == 1.0, figures
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    proc = subprocess.run([*check, "--image", str(tmp_path / "broken.jpg"), "train.device=cpu"], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "broken.jpg" in lines[0], proc.stderr[-2000:]


def test_internvl_hf_round_trip_is_bitwise_with_equal_config(tmp_path):
    """InternVL: HF -> Megatron (converter tool, TP=2: the held tower whole on both ranks) -> HF: every tensor
    bitwise, config.json and the processor files equal; transformers loads the export with nothing missing and
    gives the same logits; the HF names of transformers 4.52+ (model.vision_tower. ...) read the same."""
    import json
    import sys

    from safetensors.torch import load_file, save_file

    from megatron_swift.models import families
    from tests.internvl_tiny import tiny_internvl

    hf_model = tiny_internvl("qwen3", tmp_path / "hf")
    # The 4.52+ on-disk spelling: the converter must read it as the same checkpoint.
    def newer(name):
        if name.startswith("language_model.lm_head."):
            return name.removeprefix("language_model.")
        return "model." + (name.replace("language_model.model.", "language_model.", 1))

    renamed = {newer(k): v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    save_file(renamed, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    run, out = tmp_path / "mcore", tmp_path / "out"
    proc = subprocess.run(launch_cmd(2, ["--hf", str(tmp_path / "hf"), "--out", str(run), "--tp", "2",
                                         "train.device=cpu"], script=ROOT / "tools" / "convert" / "hf_to_mcore.py"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "mcore_to_hf.py"), "--ckpt", str(run),
                           "--out", str(out)], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    internvl = families.get("internvl")
    original = {internvl.canonical_hf_name(k): v for k, v in renamed.items()}
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    volatile = {"transformers_version", "torch_dtype", "dtype"}  # the dtype key's spelling (as test_hf_export)
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        got, want = (json.loads((folder / name).read_text()) for folder in (out, tmp_path / "hf"))
        assert {k: v for k, v in got.items() if k not in volatile} == \
            {k: v for k, v in want.items() if k not in volatile}, name
    reloaded, info = transformers.InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = internvl_inputs("qwen3", tmp_path / "hf")
    with torch.no_grad():
        want = hf_model(input_ids=batch["tokens"], pixel_values=batch["media.pixel_values"]).logits
        got = reloaded.float().eval()(input_ids=batch["tokens"], pixel_values=batch["media.pixel_values"]).logits
    assert torch.equal(got, want)


def _canonical_tensors(folder):
    """The folder's tensors under one spelling of their names (transformers 4.x's, which the exporter writes)."""
    from safetensors.torch import load_file

    from megatron_swift.models import families

    llava = families.get("llava")
    return {llava.canonical_hf_name(k): v for k, v in load_file(folder / "model.safetensors").items()}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vlm_hf_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, kind):
    """HF -> Megatron (converter tool, TP=2) -> HF: every tensor bitwise (the vision layer after the feature
    layer, the tower's final norm and SigLIP's head come back from the source folder); transformers loads the
    export with nothing missing and gives the same logits; the image processor is copied along."""
    import json
    import sys

    hf_model, processor = tiny_llava(kind, tmp_path / "hf")
    run, out = tmp_path / "mcore", tmp_path / "out"
    proc = subprocess.run(launch_cmd(2, ["--hf", str(tmp_path / "hf"), "--out", str(run), "--tp", "2",
                                         "train.device=cpu"], script=ROOT / "tools" / "convert" / "hf_to_mcore.py"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "mcore_to_hf.py"), "--ckpt", str(run),
                           "--out", str(out)], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original, exported = _canonical_tensors(tmp_path / "hf"), _canonical_tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert json.loads((out / "preprocessor_config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "preprocessor_config.json").read_text())
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = inputs(processor)
    with torch.no_grad():
        want = hf_model(input_ids=batch["tokens"], pixel_values=batch["images"]).logits
        got = reloaded.float().eval()(input_ids=batch["tokens"], pixel_values=batch["images"]).logits
    assert torch.equal(got, want)


# --- composed from an HF LLM and an HF vision encoder; training ------------------------------------------------

DEMO = ROOT / "megatron_swift" / "assets" / "vl_shapes"


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """tools/make_vl_demo.py's tiny random Qwen2 LLM (word-level tokenizer, ChatML) and CLIP encoder (patch 8)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vl_demo", ROOT / "tools" / "make_vl_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("vl_models")
    module.write_models(str(folder), 56)
    return folder


def _composed(models):
    return ["+model=llava", f"model.llm={models / 'llm'}", f"model.vision={models / 'vision'}"]


def _demo_rows(tmp_path, count: int, split: str = "train"):
    """The first ``count`` rows of the bundled set, image paths made absolute (the copy lives elsewhere)."""
    import json

    rows = [json.loads(line) for line in (DEMO / f"{split}.jsonl").read_text().splitlines()[:count]]
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(json.dumps(dict(r, images=[str(DEMO / i) for i in r["images"]])) + "\n" for r in rows))
    return path


def test_composed_vlm_language_model_equals_the_hf_llm(tmp_path):
    """model.llm + model.vision: on text alone, the language model gives the HF LLM's logits (TP=2)."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    llm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**text)).float().eval()
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    llm.save_pretrained(tmp_path / "llm")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH)).save_pretrained(tmp_path / "vision")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    batch = dict(tokens=tokens, images=torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE), image_index=torch.full_like(tokens, -1))
    got = megatron_logits(tmp_path, batch, 2, [f"model.llm={tmp_path / 'llm'}", f"model.vision={tmp_path / 'vision'}",
                                               "data.tokenizer=byte", "parallel.tp=2"])
    with torch.no_grad():
        expected = llm(tokens).logits.float()
    assert (got[..., :VOCAB] - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.cp=2"])],
                         ids=["one-rank", "tp2", "cp2-a2a"])
def test_packed_multimodal_losses_equal_unpacked(tmp_path, demo_models, nproc, layout):
    """Rows packed with their images give every token the loss it has alone in a row (images stay with their
    sample; under CP each rank places the image features of its own positions)."""
    data = _demo_rows(tmp_path, 12)
    out = tmp_path / "losses.pt"
    overrides = [*_composed(demo_models), "data=vl_sft", f"data.path=[{data}]", "train.seq_length=256",
                 "train.precision=fp32", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}",
                 "logging.tensorboard=false", *layout]
    proc = subprocess.run(launch_cmd(nproc, [str(out), *overrides], script=ROOT / "tests" / "multiproc" /
                                     "sft_loss_worker.py"), cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = torch.load(out, weights_only=True)
    assert sorted(result["unpacked"]) == sorted(result["packed"]) == list(range(12))
    assert result["rows"] <= 6  # rows really hold several samples, each with its image
    for sample, losses in result["unpacked"].items():
        assert (losses - result["packed"][sample]).abs().max().item() < 1e-5, sample


PARITY = ["train.precision=fp32", "train.train_iters=3", "train.global_batch_size=8", "train.micro_batch_size=1",
          "train.seq_length=96", "train.save_at_end=false", "train.lr=1e-3", "train.lr_warmup_iters=1",
          "model.make_vocab_size_divisible_by=64", "logging.tensorboard=false", "data=vl_sft",
          "train.train_vision=true"]


@pytest.fixture(scope="module")
def vl_baseline(tmp_path_factory, demo_models):
    from tests.conftest import read_metrics, run_train

    tmp = tmp_path_factory.mktemp("vl_parity")
    data = _demo_rows(tmp, 32)
    common = [*_composed(demo_models), *PARITY, f"data.path=[{data}]"]
    run_train(1, [*common, "train.train_iters=0", "train.save_at_end=true", f"train.output_dir={tmp / 'init'}"])
    run_train(1, [*common, f"model.load={tmp / 'init'}", f"train.output_dir={tmp / 'base'}"])
    return common, tmp / "init", read_metrics(tmp / "base")


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sp=true"], ["parallel.pp=2"],
                                    ["parallel.distributed_optimizer=true"]], ids=["tp2-sp", "pp2", "dp2-distopt"])
def test_vl_training_losses_equal_across_layouts(tmp_path, vl_baseline, layout):
    """3 steps of VLM training (encoder, projector and language model all training) under TP+SP, PP and
    DP + distributed optimizer report the one-rank run's losses and gradient norms within 1e-5."""
    from tests.conftest import read_metrics, run_train

    common, init, baseline = vl_baseline
    run_train(2, [*common, *layout, f"model.load={init}", f"train.output_dir={tmp_path / 'run'}"])
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, baseline):
        assert abs(got["loss"] - want["loss"]) < 1e-5, (layout, got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), layout
    assert rows[-1]["loss"] < rows[0]["loss"]


# --- the README recipe, as typed ---------------------------------------------------------------------------------

def readme_recipe():
    """The commands of README's "A VL model from scratch" block, continuation lines joined."""
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(# stand-ins for the HF folders.*?)```", text, re.S).group(1).replace("\\\n", " ")
    return [" ".join(line.split()) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _tower_and_llm(export, models):
    """(vision tensors equal to the encoder folder's?, LLM tensors equal to the LLM folder's?) of an export."""
    from safetensors.torch import load_file

    got = _canonical_tensors(export)
    vision = {k.removeprefix("vision_model."): v for k, v in load_file(models / "vision" / "model.safetensors").items()}
    llm = load_file(models / "llm" / "model.safetensors")
    used = {k: v for k, v in vision.items() if not k.startswith(("encoder.layers.2.", "post_layernorm"))}
    same_vision = all(torch.equal(got["vision_tower.vision_model." + k], v) for k, v in used.items())
    same_llm = all(torch.equal(got["language_model." + k][: v.shape[0]], v) for k, v in llm.items())
    return same_vision, same_llm


def test_vl_from_scratch_recipe_learns_and_freezes(tmp_path):
    """README's recipe in a fresh folder: stage 1 leaves the encoder and the LLM bitwise unchanged, stage 2 the
    encoder; held-out accuracy (transformers' generate on the exports) is far above guessing after stage 2."""
    import re
    import sys

    commands = readme_recipe()
    assert len(commands) == 5, commands
    outputs = []
    for command in commands:
        args = command.split()[1:]
        args[0] = str(ROOT / args[0])  # launch/train.py, tools/...: the repository's
        proc = subprocess.run([sys.executable, *args, *(["train.device=cpu"] if "train.py" in args[0] else [])],
                              cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    models = tmp_path / "vl_models"
    stage1 = next((tmp_path / "outputs" / "vl-stage1" / "hf").iterdir())
    stage2 = next((tmp_path / "outputs" / "vl-stage2" / "hf").iterdir())
    assert _tower_and_llm(stage1, models) == (True, True)
    assert _tower_and_llm(stage2, models) == (True, False)

    def overall(out):
        m = re.search(r"overall: (\d+)/(\d+) = [\d.]+ % \(guessing the most common answer: ([\d.]+) %\)", out)
        return int(m.group(1)) / int(m.group(2)), float(m.group(3)) / 100

    (before, chance), (after, _) = overall(outputs[3]), overall(outputs[4])
    print(f"held-out accuracy: stage 1 {before:.3f}, stage 2 {after:.3f}, guessing {chance:.3f}")
    assert after > chance + 0.25 and after > before + 0.25


def test_lora_on_a_vlm_adapts_the_language_model_and_exports_merged(tmp_path):
    """tuner=lora from an HF LLaVA folder (TP=2): adapters on the language model's linears only; the merged
    export loads in transformers with nothing missing, its encoder and projector are the source's and its
    language model is not."""
    from tests.conftest import run_train

    tiny_llava("clip", tmp_path / "hf")
    run = tmp_path / "run"
    proc = run_train(2, ["+model=llava", f"model.pretrained={tmp_path / 'hf'}", "tuner=lora", "data=vl_sft",
                         "data.tokenizer=byte", "train.precision=fp32", "train.train_iters=3", "train.lr=1e-2",
                         "parallel.tp=2", "train.save_hf=true", f"train.output_dir={run}",
                         "logging.tensorboard=false"])
    assert "vision_model" not in proc.stdout.split("trainable parameters")[1].split("\n")[0]
    export = next((run / "hf").iterdir())
    original, merged = _canonical_tensors(tmp_path / "hf"), _canonical_tensors(export)
    assert sorted(merged) == sorted(original)
    for name, tensor in original.items():
        same = torch.equal(merged[name], tensor)
        assert same if name.startswith(("vision_tower.", "multi_modal_projector.")) else True, name
    assert any(not torch.equal(merged[n], t) for n, t in original.items() if ".self_attn.q_proj." in n)
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info



def readme_qwen_recipe():
    """The commands of README's "a Qwen2.5-VL-style model from scratch" block, continuation lines joined."""
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(# a Qwen2.5-VL-style model from scratch.*?)```", text, re.S).group(1)
    return [" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.startswith("#")]


def test_qwen_vl_from_scratch_recipe_runs_and_vision_lr_zero_keeps_the_tower(tmp_path):
    """README's Qwen2.5-VL recipe (its train command, 2 steps here; the full run's held-out accuracy is measured in
    README) on the tiny folder make_vl_demo.py writes, with train.train_vision=true and train.vision_lr=0: the
    tower's own optimizer group (the held tower's vision group: all but the merger) has lr 0, so the export's tower
    equals the source's while the merger (projector) and the language model, at train.lr, move; transformers
    loads the export with nothing missing."""
    import importlib.util
    import sys

    from megatron_swift.models import families

    spec = importlib.util.spec_from_file_location("make_vl_demo", ROOT / "tools" / "make_vl_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.write_qwen2_5_vl(str(tmp_path / "vl_models" / "qwen2_5_vl"))
    train, accuracy = readme_qwen_recipe()
    assert accuracy.startswith("python tools/vl_accuracy.py --hf outputs/qwen-vl"), accuracy
    args = train.split()[1:]
    args[0] = str(ROOT / args[0])
    extra = ["train.device=cpu", "train.train_iters=2", "train.train_vision=true", "train.vision_lr=0",
             "logging.tensorboard=false"]
    proc = subprocess.run([sys.executable, *args, *extra], cwd=tmp_path, env=train_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{train}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "vision_model.hf.patch_embed" in proc.stdout.split("trainable parameters")[1].split("\n")[0]
    qwen = families.get("qwen2_5_vl")
    export = next((tmp_path / "outputs" / "qwen-vl" / "hf").iterdir())

    def tensors(folder):
        from safetensors.torch import load_file

        return {qwen.canonical_hf_name(k): v for k, v in load_file(folder / "model.safetensors").items()}

    original, trained = tensors(tmp_path / "vl_models" / "qwen2_5_vl"), tensors(export)
    assert sorted(trained) == sorted(original)
    moved = {name for name, tensor in original.items() if not torch.equal(trained[name], tensor)}
    assert not {n for n in moved if n.startswith("visual.") and not n.startswith("visual.merger.")}
    assert any(n.startswith("visual.merger.") for n in moved)
    assert any(n.startswith("model.") and ".self_attn.q_proj." in n for n in moved)
    _, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
