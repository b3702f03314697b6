"""Qwen3-VL (families/qwen3_vl.py: transformers' tower held whole per TP rank, Qwen3 language model with
interleaved M-RoPE and DeepStack on megatron-core) and its MoE variant (families/qwen3_vl_moe.py: a Qwen3-MoE
language model on megatron-core's MoE layer): the Megatron model built from an HF
``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` folder gives transformers' logits on
two real photographs of different sizes at TP=1 (tools/convert/check.py --image) and TP=2 x PP=2 (the MoE one
with EP=2 too); HF -> Megatron -> HF is bitwise. Ground truth: transformers' models, rotary module, image
processor and ``get_rope_index``."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import transformers

from tests.conftest import ROOT, launch_cmd, train_env
from tests.multiproc.test_qwen2_5_vl import inputs, two_photos  # the same token ids (VOCAB ... END) as here
from tests.multiproc.test_vlm import WORKER

VOCAB, IMAGE, VIDEO, START, END = 300, 290, 291, 292, 293
MAX_PIXELS = 32 * 32 * 24  # at most 24 merged tokens per image


# The MoE variant's language model: 4 experts (top 2, 24 wide) in layers 0-2, a dense MLP in layer 3.
MOE_TEXT = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                mlp_only_layers=[3], norm_topk_prob=True)
CLASSES = {"qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", {}),
           "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", MOE_TEXT)}


def tiny_qwen3_vl(folder, family: str = "qwen3_vl"):
    """A random tiny HF Qwen3-VL (random norms and biases, so a skipped tensor shows): a 4-layer Qwen3 decoder
    (QK norm, head dim 16, interleaved sections [2, 3, 3]; ``qwen3_vl_moe``: routed experts, MOE_TEXT, with a
    router large enough to send tokens to different experts) and a 3-block tower with DeepStack from blocks 0
    and 2 (into decoder layers 0 and 1); its 16-px image processor, saved."""
    config_class, model_class, moe = CLASSES[family]
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}, **moe)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 2])
    config = getattr(transformers, config_class)(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                                 video_token_id=VIDEO, vision_start_token_id=START,
                                                 vision_end_token_id=END)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
            elif "deepstack" in name or "pos_embed" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # DeepStack, learned positions and routers large enough to matter
            elif "experts" in name:
                p.normal_(0.0, 0.1)  # transformers leaves fused experts at their (empty) initial values
    model.save_pretrained(folder)
    processor = transformers.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=32 * 32 * 4,
                                                      max_pixels=MAX_PIXELS, image_mean=[0.5] * 3,
                                                      image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return model, processor


def hf_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["tokens"], pixel_values=batch["media.pixel_values"],
                     image_grid_thw=batch["media.image_grid_thw"],
                     mm_token_type_ids=batch["mm_token_type_ids"]).logits.float()


def routed_experts(model, batch) -> torch.Tensor:
    """The experts transformers' first MoE router picks for each token: [tokens, top-k]."""
    picked = []
    hook = model.model.language_model.layers[0].mlp.gate.register_forward_hook(
        lambda _, __, out: picked.append(out[2]))
    hf_logits(model, batch)
    hook.remove()
    return picked[0]


@pytest.fixture(scope="module", params=list(CLASSES))
def hf(tmp_path_factory, request):
    """(folder, model, processor, batch, logits, family) of each variant."""
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model, processor = tiny_qwen3_vl(folder, request.param)
    batch = inputs(model, processor)
    expected = hf_logits(model, batch)
    if request.param == "qwen3_vl_moe":  # tokens go to different experts, whose order matters in the logits
        assert len({tuple(sorted(row)) for row in routed_experts(model, batch).tolist()}) > 2
        experts = model.model.language_model.layers[0].mlp.experts
        saved = experts.gate_up_proj.data.clone()
        experts.gate_up_proj.data = saved.roll(1, dims=0)
        assert (hf_logits(model, batch) - expected).abs().max().item() > 1e-2
        experts.gate_up_proj.data = saved
    # DeepStack really moves the logits (a model that skipped it could not pass the comparisons below)
    deep = model.model.visual.deepstack_visual_indexes
    model.model.visual.deepstack_visual_indexes = []
    assert (hf_logits(model, batch) - expected).abs().max().item() > 1e-2
    model.model.visual.deepstack_visual_indexes = deep
    return folder, model, processor, batch, expected, request.param


def test_interleaved_mrope_is_transformers_rotary():
    """megatron-core's MultimodalRotaryEmbedding (unchanged) fed families/qwen3_vl.megatron_mrope_splits gives
    transformers' Qwen3-VL text rotary angles, for the published sections and the tiny ones."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rpe
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megatron_swift.models.families.qwen3_vl import megatron_mrope_splits

    for section, head_dim in (([24, 20, 20], 128), ([2, 3, 3], 16)):
        config = transformers.Qwen3VLTextConfig(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": section, "mrope_interleaved": True})
        hf_rot = Qwen3VLTextRotaryEmbedding(config)
        positions = torch.randint(0, 300, (3, 2, 9))
        cos, _ = hf_rot(torch.zeros(1), positions)  # [b, s, head_dim]
        mc = rpe.MultimodalRotaryEmbedding.__new__(rpe.MultimodalRotaryEmbedding)
        torch.nn.Module.__init__(mc)  # its __init__ puts inv_freq on CUDA; the same inverse frequencies here
        mc.rotary_interleaved, mc.seq_len_interpolation_factor, mc.cp_group = False, None, None
        mc.inv_freq = hf_rot.inv_freq
        angles = mc(positions, megatron_mrope_splits(section, head_dim // 2))  # [s, b, 1, head_dim]
        assert torch.allclose(angles[:, :, 0].transpose(0, 1).cos(), cos, atol=1e-6), section


def test_config_written_without_a_source_is_the_same_model(hf):
    from megatron_swift.models import families
    from megatron_swift.models.arch import Arch

    folder, name = hf[0], hf[-1]
    family = families.get(name)
    source = json.loads((folder / "config.json").read_text())
    fields = dict(dataclasses.asdict(family.size("tiny")), **family.read_hf(source, str(folder)))
    written = family.write_hf(Arch(family=family, **fields).plain(), "float32")
    config = getattr(transformers, CLASSES[name][0])
    assert config(**written).to_dict() == config(**source).to_dict()


def test_moe_router_that_does_not_renormalise_is_refused_with_one_line(tmp_path):
    """transformers' Qwen3-VL-MoE router always renormalises its top-k weights: a config saying otherwise
    (norm_topk_prob=false) is refused, naming the key; a shared expert (Qwen2-MoE's) too."""
    from megatron_swift.data.errors import DataError
    from megatron_swift.models import families

    family = families.get("qwen3_vl_moe")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, **MOE_TEXT,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    for key, value in (("norm_topk_prob", False), ("shared_expert_intermediate_size", 32)):
        config = {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
                  "text_config": dict(text, **{key: value}), "vision_config": {}}
        with pytest.raises(DataError, match=f"{key}={value}") as error:
            family.read_hf(config, str(tmp_path))
        assert "\n" not in str(error.value)


def test_stacked_experts_split_over_expert_tensor_parallel_ranks():
    """rules.StackedExperts: each expert-TP rank's fc1 block is [gate_r; up_r] of that expert (as GateUp
    makes it) and fc2 its columns, from either stacked layout (transformers 5's, and the published checkpoints'
    transposed one); split gives the expert's slice back."""
    from megatron_swift.convert.hf_load import Context
    from megatron_swift.convert.rules import Part, StackedExperts, _Tensors

    experts, hidden, width = 3, 8, 6
    gate_up, down = torch.randn(experts, 2 * width, hidden), torch.randn(experts, hidden, width)
    ctx = Context(2, 4, 0, tp=2)
    fc1 = StackedExperts(("fc1",), "gate_up", experts, hidden, gate_up=True)
    fc2 = StackedExperts(("fc2",), "down", experts, hidden)
    for tensors in ({"gate_up": gate_up, "down": down},
                    {"gate_up": gate_up.transpose(1, 2), "down": down.transpose(1, 2)}):
        reader = _Tensors(tensors)
        for rank in range(2):
            rows = slice(rank * width // 2, (rank + 1) * width // 2)
            block = fc1.build(reader, {"expert": "1"}, ctx, Part(0, rank, 2))
            assert torch.equal(block, torch.cat([gate_up[1, :width][rows], gate_up[1, width:][rows]]))
            cols = fc2.build(reader, {"expert": "2"}, ctx, Part(1, rank, 2))
            assert torch.equal(cols, down[2][:, rows])
        full = fc1.build(reader, {"expert": "1"}, ctx)
        assert torch.equal(fc1.split(full, {"expert": "1"}, ctx)["gate_up"], gate_up[1:2])
    # model.init_strategy generates the whole stacked HF tensor and cuts each expert from it, as loading does
    from megatron_swift.convert.hf_load import compile_rules
    from megatron_swift.models.init_strategy import generate, shard_of

    fc1 = StackedExperts(("experts.{expert}.fc1",), "gate_up", experts, hidden, gate_up=True)
    param = torch.nn.Parameter(torch.empty(2 * width, hidden))
    whole = generate("normal", (experts, 2 * width, hidden), "gate_up", 1, 0.02)
    shard = shard_of("experts.2.fc1", param, compile_rules([fc1]), {"expert": 0}, Context(2, 4, 0, tp=1), 0,
                     "normal", 1, 0.02)
    assert torch.equal(shard, whole[2])


# the MoE variant's multi-rank run adds expert parallelism (its experts split over two ranks of each stage)
LAYOUTS = {"qwen3_vl": ["parallel.tp=2", "parallel.pp=2"],
           "qwen3_vl_moe": ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.etp=1"]}


def megatron_logits(tmp_path, batch: dict, nproc: int, overrides, family: str = "qwen3_vl"):
    torch.save({k: v for k, v in batch.items() if k != "mm_token_type_ids"}, tmp_path / "inputs.pt")
    out = tmp_path / "out.pt"
    base = [f"+model={family}", "train.precision=fp32", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}",
            "logging.tensorboard=false"]
    args = [str(tmp_path / "inputs.pt"), str(out), *base, *overrides]
    cmd = launch_cmd(nproc, args, script=WORKER)
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


def test_qwen3_vl_logits_equal_transformers_tp2_pp2(tmp_path, hf):
    """TP=2 and PP=2 in one run (4 ranks; the MoE variant EP=2 as well): the held tower and both DeepStack layers
    on the first stage, the TP ranks' tower copies equal; TP=1 is tools/convert/check.py's run below."""
    folder, _, _, batch, expected, family = hf
    got = megatron_logits(tmp_path, batch, 4, [f"model.pretrained={folder}", *LAYOUTS[family]], family)
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff}"


def test_check_tool_with_images_at_tp1(tmp_path, hf):
    """tools/convert/check.py --hf DIR --image A B: the folder's own image processor, M-RoPE positions
    continuing across the photographs (one row), transformers' logits."""
    folder = hf[0]
    paths = []
    for i, photo in enumerate(two_photos()):
        paths.append(str(tmp_path / f"photo{i}.png"))
        photo.save(paths[-1])
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "check.py"), "--hf", str(folder),
                           "--image", *paths, "--seq", "6", "--report", str(report), "train.device=cpu"], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "top-1 agreement" in proc.stdout
    figures = json.loads(report.read_text())
    assert figures["max_abs_diff"] < 1e-4 and figures["token_agreement"] == 1.0, figures


def test_hf_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, hf):
    """HF -> Megatron (converter tool) -> HF: every tensor bitwise, config.json equal; transformers loads the
    export with nothing missing and gives the same logits."""
    from safetensors.torch import load_file

    folder, model, _, batch, expected, family = hf
    run, out = tmp_path / "mcore", tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "hf_to_mcore.py"), "--hf", str(folder),
                           "--out", str(run), "train.device=cpu"], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "mcore_to_hf.py"), "--ckpt", str(run),
                           "--out", str(out)], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    volatile = ("transformers_version", "torch_dtype", "dtype")
    config = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in volatile}
    assert config == {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in volatile}
    reloaded, info = getattr(transformers, CLASSES[family][1]).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(hf_logits(reloaded.float().eval(), batch), expected)


def test_vision_data_gives_processor_pixels_and_get_rope_index_positions(hf):
    """families/qwen3_vl.qwen3_vision_data (what vl_sft rows use): each photograph's pixels and grid are the
    folder's processor's, its token count the grid's, and a sample's M-RoPE streams are the model's own
    get_rope_index on the sample's ids."""
    from megatron_swift.models import families
    from megatron_swift.models.arch import Arch
    from megatron_swift.models.families.qwen3_vl import qwen3_vision_data

    folder, model, processor, batch, _, name = hf
    family = families.get(name)
    source = json.loads((folder / "config.json").read_text())
    arch = Arch(family=family, **dict(dataclasses.asdict(family.size("tiny")), **family.read_hf(source, str(folder))))
    data = qwen3_vision_data(processor, arch)
    media = [data.processor(photo) for photo in two_photos()]
    assert torch.equal(torch.cat([m["pixel_values"] for m in media]), batch["media.pixel_values"])
    assert torch.equal(torch.cat([m["image_grid_thw"] for m in media]), batch["media.image_grid_thw"])
    ids = batch["tokens"][0].tolist()
    assert data.count(media[0]) == ids.count(IMAGE)
    assert torch.equal(torch.from_numpy(data.positions(ids, media[:1])), batch["position_ids"][:, 0])


def test_freeze_groups_and_planner_count_the_tower_as_transformers_builds_it():
    """train.freeze groups: the patch merger and DeepStack mergers are the projector, everything else of the
    tower the vision group; Family.tower_params (the planner, from vision_config alone) counts what transformers'
    module holds, for the tiny and published sizes."""
    import re

    from megatron_swift.models import families
    from megatron_swift.models.arch import Arch
    from megatron_swift.models.families.qwen3_vl import _FREEZE_GROUPS, _vision_module_class, vision_config

    family = families.get("qwen3_vl")
    for size in ("tiny", "2b", "8b"):
        arch = Arch(family=family, **dataclasses.asdict(family.size(size)))
        with torch.device("meta"):
            tower = _vision_module_class()._from_config(vision_config(arch.vision_hf))
        counts = {group: sum(p.numel() for n, p in tower.named_parameters()
                             if re.match(pattern, "vision_model.hf." + n))
                  for group, pattern in (("encoder", _FREEZE_GROUPS["vision"]),
                                         ("projector", _FREEZE_GROUPS["projector"]))}
        assert sum(counts.values()) == sum(p.numel() for p in tower.parameters()), size
        assert counts == family.tower_params(arch), size


def test_pipeline_layout_without_deepstack_layers_on_the_first_chunk_is_refused():
    """DeepStack's layers (the tiny size: decoder layers 0 and 1 of 4) must all be on the first pipeline chunk:
    PP=4 leaves one there and is refused before any work, naming parallel.pp; PP=2 is accepted."""
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="parallel.pp=4: DeepStack"):
        validate(compose(["+model=qwen3_vl", "parallel.pp=4"]), 4)
    validate(compose(["+model=qwen3_vl", "parallel.pp=2"]), 2)
