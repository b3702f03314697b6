"""HF weights streamed into sharded Megatron models give HF's logits (ground truth: transformers)."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import transformers  # a test dependency (setup.py [test]): missing, the suite must fail, not skip

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "hf_logits_worker.py"
VOCAB = 300  # not a multiple of 128: exercises vocabulary padding and un-padding
PADDED = {"1": 384, "2": 512}  # by hand: the next multiple of 128 * TP


def _save_tiny(kind: str, folder, dtype=torch.float32, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)
    common.update(extra)
    hf_name = {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral", "qwen3_moe": "Qwen3Moe",
               "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "glm4_moe": "Glm4Moe", "deepseek_v2": "DeepseekV2",
               "deepseek_v3": "DeepseekV3", "olmo2": "Olmo2", "phi3": "Phi3"}[kind]
    config = getattr(transformers, hf_name + "Config")(**common)
    torch.manual_seed(0)
    model = getattr(transformers, hf_name + "ForCausalLM")(config)
    model = model.float().eval()
    with torch.no_grad():  # random norms and biases, so that a skipped tensor shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
        for name, b in model.named_buffers():  # a router's selection bias (GLM-4.5), zero as initialised
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(folder)
    return model


CASES = {
    "qwen3-tp1": ("qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False), 1, []),
    "qwen3-tp2": ("qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False), 2,
                  ["parallel.tp=2"]),
    "qwen3-pp2": ("qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False), 2,
                  ["parallel.pp=2"]),
    "qwen2-tp1": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False), 1, []),
    "qwen2-tied-tp2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), 2, ["parallel.tp=2"]),
    # Tied under PP: the embedding is on the first stage, its copy feeds the output layer on the last.
    "qwen2-tied-pp2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), 2, ["parallel.pp=2"]),
    "llama-1kv-tp1": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False), 1, []),
    "llama-tp2": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False), 2, ["parallel.tp=2"]),
    "llama-1kv-pp2": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False), 2, ["parallel.pp=2"]),
    "mistral-tp1": ("mistral", dict(num_key_value_heads=2, tie_word_embeddings=False), 1, []),
}
# Qwen3-MoE: 6 experts (not the tiny size's 4, so they must come from config.json), top-2; both router
# normalisations (norm_topk_prob) are covered.
_MOE = dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, num_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=24)
CASES.update({
    "qwen3_moe-tp1": ("qwen3_moe", dict(_MOE, norm_topk_prob=True), 1, []),
    "qwen3_moe-tp2": ("qwen3_moe", dict(_MOE, norm_topk_prob=True), 2, ["parallel.tp=2"]),
    "qwen3_moe-pp2": ("qwen3_moe", dict(_MOE, norm_topk_prob=False), 2, ["parallel.pp=2"]),
    "qwen3_moe-ep2": ("qwen3_moe", dict(_MOE, norm_topk_prob=False), 2, ["parallel.ep=2"]),
    # Attention split over TP=2 while experts are split over EP=2 and kept whole (expert TP=1).
    "qwen3_moe-tp2-ep2-etp1": ("qwen3_moe", dict(_MOE, norm_topk_prob=True), 2,
                               ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
})
# The cases above run the default attention on CPU (auto: sdpa). megatron-core's own attention (local, the
# reference the sdpa backend replaces) against the same ground truth, for GQA, one KV head and MoE:
CASES.update({
    "qwen3-tp2-local": ("qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False), 2,
                        ["parallel.tp=2", "model.attention_backend=local"]),
    "llama-1kv-tp1-local": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False), 1,
                            ["model.attention_backend=local"]),
    "qwen2-tied-pp2-local": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), 2,
                             ["parallel.pp=2", "model.attention_backend=local"]),
    "qwen3_moe-ep2-local": ("qwen3_moe", dict(_MOE, norm_topk_prob=False), 2,
                            ["parallel.ep=2", "model.attention_backend=local"]),
})


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_equal_hf_logits(tmp_path, case):
    kind, extra, nproc, layout = CASES[case]
    hf_dir = tmp_path / "hf"
    hf_model = _save_tiny(kind, hf_dir, **extra)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    with torch.no_grad():
        expected = hf_model(tokens).logits.float()
    family = "llama" if kind == "mistral" else kind  # Mistral loads as the llama family
    overrides = [f"+model={family}", f"model.pretrained={hf_dir}", "train.precision=fp32", "train.device=cpu",
                 f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", *layout]
    proc = subprocess.run(launch_cmd(nproc, [str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt"), *overrides],
                                     script=WORKER), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)  # [b, s, padded V]
    # make_vocab_size_divisible_by=128 times TP: 300 -> 384 at TP=1, 512 at TP=2, so the two pad differently.
    assert got.shape[-1] == PADDED[dict(o.split("=") for o in layout).get("parallel.tp", "1")]
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    assert diff < 1e-4, f"{case}: max |logit diff| {diff}"
    # Every padding column is -inf (probability 0), the first one included, on every TP rank's block.
    padding = got[..., VOCAB:]
    unmasked = (~torch.isneginf(padding)).nonzero()[:, -1].unique() + VOCAB
    assert unmasked.numel() == 0, f"{case}: padding columns {unmasked.tolist()} are not -inf"


# RoPE variants (models/rope.py): (family, tiny-model kind, config keys). Sequences of 40 tokens against
# pre-scaling contexts of 16 (original_max_position_embeddings), so the scaling changes transformers' logits.
ROPE_MODELS = {
    # Llama 3.1-style, with values other than the 1/4/8192 megatron-core 0.16.1 fixes.
    "llama3": ("llama", "llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
        original_max_position_embeddings=16))),
    "linear": ("llama", "mistral", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_scaling=dict(rope_type="linear", factor=2.5))),
    # Qwen2.5's long-context recipe, written as transformers 4.x did (top-level rope_theta, rope_scaling.type).
    "yarn-qwen2": ("qwen2", "qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    # DeepSeek's mscale / mscale_all_dim: an attention factor other than YaRN's default (1.44; greedy rollouts of
    # this model change when it is 1, see test_grpo).
    "yarn-qwen3": ("qwen3", "qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                          rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=16, beta_slow=2,
                                                            original_max_position_embeddings=8, mscale=2.0,
                                                            mscale_all_dim=0.5))),
    # Half of each head rotates (transformers' Qwen3 rotates every feature whatever the key says: the ground
    # truth is its GLM-4.5 partial rotary, swapped in by _partial_rotary_hf).
    "partial": ("qwen3", "qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                       partial_rotary_factor=0.5)),
}


def _v4_spelling(folder):
    """config.json as transformers 4.x wrote it: rope_theta at the top, rope_scaling with "type"."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = dict(type=rope.pop("rope_type"), **rope)
    path.write_text(json.dumps(config, indent=2))


@contextlib.contextmanager
def _partial_rotary_hf():
    """transformers' Qwen3 with the rotary of its GLM-4.5 code (Glm4Moe), which applies partial_rotary_factor."""
    from transformers.models.glm4_moe import modeling_glm4_moe as glm
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    rotary = qwen3.Qwen3RotaryEmbedding
    saved = qwen3.apply_rotary_pos_emb, rotary.__dict__["compute_default_rope_parameters"]
    qwen3.apply_rotary_pos_emb = glm.apply_rotary_pos_emb
    rotary.compute_default_rope_parameters = glm.Glm4MoeRotaryEmbedding.__dict__["compute_default_rope_parameters"]
    try:
        yield
    finally:
        qwen3.apply_rotary_pos_emb, rotary.compute_default_rope_parameters = saved


def _hf_logits(folder, tokens, partial: bool):
    with _partial_rotary_hf() if partial else contextlib.nullcontext():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(tokens).logits.float()


@pytest.fixture(scope="module")
def rope_models(tmp_path_factory):
    """Each RoPE model saved once (and the same weights without the RoPE keys), transformers' logits of both."""
    root = tmp_path_factory.mktemp("rope")
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, root / "tokens.pt")
    models = {}
    for name, (family, kind, extra) in ROPE_MODELS.items():
        folder, plain = root / name, root / f"{name}-plain"
        _save_tiny(kind, folder, **extra)
        _save_tiny(kind, plain, **{k: v for k, v in extra.items() if k not in ("rope_scaling", "partial_rotary_factor")})
        if name == "yarn-qwen2":
            _v4_spelling(folder)
        partial = "partial_rotary_factor" in extra
        models[name] = (family, folder, _hf_logits(folder, tokens, partial), _hf_logits(plain, tokens, partial))
    return root, models


@pytest.mark.parametrize("layout", [[], ["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp1", "tp2", "pp2"])
def test_rope_variants_logits_equal_hf_logits(rope_models, tmp_path, layout):
    """Every RoPE model under one layout in one launch: the first as the trainer's model, the others built after it
    (hf_logits_worker --also)."""
    root, models = rope_models
    names = list(models)
    first_family, first_folder = models[names[0]][:2]
    also = [f"--also={models[n][1]},{tmp_path / n}.pt" for n in names[1:]]
    overrides = [f"+model={first_family}", f"model.pretrained={first_folder}", "train.precision=fp32",
                 "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", *layout]
    proc = subprocess.run(launch_cmd(2 if layout else 1, [str(root / "tokens.pt"), str(tmp_path / f"{names[0]}.pt"),
                                                         *overrides, *also], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in names:
        _, _, expected, unscaled = models[name]
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)[..., :VOCAB]
        effect = (expected - unscaled).abs().max().item()
        diff = (got - expected).abs().max().item()
        print(f"{name} {'-'.join(layout) or 'tp1'}: max |logit diff| {diff:.2e} (RoPE keys change HF's by {effect:.2e})")
        # The RoPE keys move transformers' logits by far more than the tolerance.
        assert effect > 20 * 1e-4, f"{name}: the RoPE keys change HF's logits by {effect} only"
        assert diff < 1e-4, f"{name}: max |logit diff| {diff}"


# MoE families (issue 28): every layout of one launch loads all of them (hf_logits_worker --also). Shapes differ
# from the tiny sizes and from each other: head_dim other than hidden/heads, expert counts and widths, dense
# layers among MoE layers (mlp_only_layers, decoder_sparse_step, first_k_dense_replace), shared experts with and
# without a gate, sigmoid routing with a correction bias, expert groups, QK norm and QKV bias on and off.
MOE_MODELS = {
    "mixtral": ("mixtral", dict(num_key_value_heads=2, head_dim=24, num_local_experts=6, num_experts_per_tok=2,
                                intermediate_size=40, tie_word_embeddings=False)),
    "qwen2_moe": ("qwen2_moe", dict(num_key_value_heads=2, num_experts=6, num_experts_per_tok=3,
                                    moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                    mlp_only_layers=[0, 2], tie_word_embeddings=False)),
    "qwen2_moe-step": ("qwen2_moe", dict(num_attention_heads=8, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16, shared_expert_intermediate_size=48,
                                         decoder_sparse_step=2, norm_topk_prob=True, tie_word_embeddings=True)),
    "glm4_moe": ("glm4_moe", dict(num_key_value_heads=2, head_dim=32, n_routed_experts=6, num_experts_per_tok=2,
                                  moe_intermediate_size=24, n_shared_experts=2, first_k_dense_replace=1,
                                  routed_scaling_factor=1.7, attention_bias=True, use_qk_norm=True,
                                  num_nextn_predict_layers=0, tie_word_embeddings=False)),
    "glm4_moe-groups": ("glm4_moe", dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=2,
                                         n_group=2, topk_group=1, routed_scaling_factor=2.5, attention_bias=False,
                                         use_qk_norm=False, num_nextn_predict_layers=0, tie_word_embeddings=False)),
    # Qwen3-MoE reads the same dense-layer keys as Qwen2-MoE.
    "qwen3_moe-dense": ("qwen3_moe", dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, mlp_only_layers=[1], norm_topk_prob=True,
                                          tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Each MoE model saved once, with transformers' logits."""
    root = tmp_path_factory.mktemp("moe")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, root / "tokens.pt")
    models = {}
    for name, (kind, extra) in MOE_MODELS.items():
        with torch.no_grad():
            models[name] = (kind, root / name, _save_tiny(kind, root / name, **extra)(tokens).logits.float())
    return root, models


# One launch of two processes covers every layout: TP=1 (two data-parallel ranks), then megatron-core's groups
# rebuilt for the others (hf_logits_worker --then); the EP=2 models are also saved for the round trip
# (test_hf_export).
MOE_LAYOUTS = {"tp2": "parallel.tp=2", "pp2": "parallel.tp=1,parallel.pp=2",
               "ep2": "parallel.pp=1,parallel.ep=2",
               "tp2-ep2": "parallel.tp=2,parallel.ep=2,parallel.etp=1"}


@pytest.fixture(scope="module")
def moe_run(moe_models, tmp_path_factory):
    """The launch: (folder of its outputs, models)."""
    root, models = moe_models
    out = tmp_path_factory.mktemp("moe-run")
    names = list(models)
    first_kind, first_folder = models[names[0]][:2]
    also = [f"--also={models[n][1]},{out / n}.pt" for n in names[1:]]
    then = [f"--then={name}:{layout}" for name, layout in MOE_LAYOUTS.items()]
    overrides = [f"+model={first_kind}", f"model.pretrained={first_folder}", "train.precision=fp32",
                 "train.device=cpu", f"train.output_dir={out / 'run'}", "logging.tensorboard=false"]
    proc = subprocess.run(launch_cmd(2, [str(root / "tokens.pt"), str(out / f"{names[0]}.pt"), *overrides, *also,
                                         *then, "--save=ep2"], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, models


@pytest.mark.parametrize("layout", ["tp1", *MOE_LAYOUTS])
def test_moe_families_logits_equal_hf_logits(moe_run, layout):
    out, models = moe_run
    for name, (_, _, expected) in models.items():
        got = torch.load(out / (f"{name}.pt" if layout == "tp1" else f"{name}.{layout}.pt"), weights_only=True)
        diff = (got[..., :VOCAB] - expected).abs().max().item()
        print(f"{name} {layout}: max |logit diff| {diff:.2e}")
        assert diff < 1e-4, f"{name} {layout}: max |logit diff| {diff}"


def test_moe_families_round_trip_is_bitwise(moe_run, tmp_path):
    """HF -> Megatron (loaded under EP=2 and saved by the launch above) -> HF (the export tool's convert, one
    process for all models): every tensor and config.json as they were. A bf16 export keeps the router's
    selection bias in float32, as checkpoints store it."""
    import json

    from safetensors.torch import load_file

    out, models = moe_run
    jobs = [(str(out / f"{name}.ep2.ckpt"), str(tmp_path / name), None) for name in models]
    jobs.append((str(out / "glm4_moe.ep2.ckpt"), str(tmp_path / "glm4_moe-bf16"), "bf16"))
    script = ("import json, sys; sys.path.insert(0, 'tools/convert'); from mcore_to_hf import convert\n"
              "for ckpt, dest, dtype in json.loads(sys.argv[1]): convert(ckpt, dest, dtype)")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    volatile = {"transformers_version", "torch_dtype", "dtype"}
    for name, (_, folder, _) in models.items():
        original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / name / "model.safetensors")
        assert sorted(exported) == sorted(original), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), f"{name}: {key}"
        configs = [{k: v for k, v in json.loads((f / "config.json").read_text()).items() if k not in volatile}
                   for f in (folder, tmp_path / name)]
        assert configs[0] == configs[1], name
    bf16 = load_file(tmp_path / "glm4_moe-bf16" / "model.safetensors")
    biases = [k for k in bf16 if k.endswith("e_score_correction_bias")]
    assert biases and all(bf16[k].dtype == torch.float32 for k in biases)
    assert bf16["model.embed_tokens.weight"].dtype == torch.bfloat16


# Dense families beyond Llama's layer (issue 28 item 9), all in one launch per layout like the MoE ones. OLMo 2:
# norms after attention and MLP, QK norm over whole projections (split over TP with the heads); head_dim other than
# hidden/heads, a wider MHA model with tied embeddings. Phi-3 / Phi-4: fused qkv_proj and gate_up_proj, partial
# rotary (0.5; Phi-4-mini's 0.75 with tied embeddings and MHA).
TEXT_MODELS = {
    "olmo2": ("olmo2", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "olmo2-mha-tied": ("olmo2", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6,
                                     intermediate_size=80, rope_theta=5e5, tie_word_embeddings=True)),
    "phi3": ("phi3", dict(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0,
                          tie_word_embeddings=False)),
    "phi3-mha-tied": ("phi3", dict(num_key_value_heads=4, intermediate_size=40, partial_rotary_factor=0.75,
                                   rope_theta=2.5e5, pad_token_id=0, tie_word_embeddings=True)),
}
TEXT_LAYOUTS = {"tp2": "parallel.tp=2", "pp2": "parallel.tp=1,parallel.pp=2"}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """Every TEXT_MODELS model saved, with transformers' logits (and those of its partial-rotary models rotating every
    feature, to show the factor matters); one launch of two processes: TP=1, then TP=2 (models saved for the round
    trip) and PP=2."""
    root = tmp_path_factory.mktemp("text")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    torch.save(tokens, root / "tokens.pt")
    models = {}
    for name, (kind, extra) in TEXT_MODELS.items():
        model, full = _save_tiny(kind, root / name, **extra), None
        with torch.no_grad():
            expected = model(tokens).logits.float()
            if "partial_rotary_factor" in extra:  # the same weights, every feature rotated
                config = model.config.to_dict()
                config.update(partial_rotary_factor=1.0,
                              rope_parameters=dict(config["rope_parameters"], partial_rotary_factor=1.0))
                config = type(model.config).from_dict(config)
                rotated = type(model)(config).float().eval()
                rotated.load_state_dict(model.state_dict())
                full = rotated(tokens).logits.float()
        models[name] = (kind, root / name, expected, full)
    names = list(models)
    also = [f"--also={models[n][1]},{root / n}.pt" for n in names[1:]]
    then = [f"--then={name}:{layout}" for name, layout in TEXT_LAYOUTS.items()]
    overrides = [f"+model={models[names[0]][0]}", f"model.pretrained={models[names[0]][1]}", "train.precision=fp32",
                 "train.device=cpu", f"train.output_dir={root / 'run'}", "logging.tensorboard=false"]
    proc = subprocess.run(launch_cmd(2, [str(root / "tokens.pt"), str(root / f"{names[0]}.pt"), *overrides, *also,
                                         *then, "--save=tp2"], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root, models


@pytest.mark.parametrize("layout", ["tp1", *TEXT_LAYOUTS])
def test_olmo2_and_phi3_logits_equal_hf_logits(text_run, layout):
    root, models = text_run
    for name, (_, _, expected, full) in models.items():
        got = torch.load(root / (f"{name}.pt" if layout == "tp1" else f"{name}.{layout}.pt"), weights_only=True)
        diff = (got[..., :VOCAB] - expected).abs().max().item()
        print(f"{name} {layout}: max |logit diff| {diff:.2e}")
        assert diff < 1e-4, f"{name} {layout}: max |logit diff| {diff}"
        if full is not None:  # rotating every feature instead moves transformers' logits far beyond the tolerance
            assert (full - expected).abs().max().item() > 20 * 1e-4, name


def test_olmo2_and_phi3_round_trip_is_bitwise(text_run, tmp_path):
    """HF -> Megatron (loaded under TP=2, saved by the launch above) -> HF (the export tool's convert, one process
    for all models): every tensor (Phi-3's fused projections, OLMo 2's TP-split QK norms) and config.json as they
    were."""
    from safetensors.torch import load_file

    root, models = text_run
    jobs = [(str(root / f"{name}.tp2.ckpt"), str(tmp_path / name)) for name in models]
    script = ("import json, sys; sys.path.insert(0, 'tools/convert'); from mcore_to_hf import convert\n"
              "for ckpt, dest in json.loads(sys.argv[1]): convert(ckpt, dest)")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    volatile = {"transformers_version", "torch_dtype", "dtype"}
    for name, (_, folder, _, _) in models.items():
        original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / name / "model.safetensors")
        assert sorted(exported) == sorted(original), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), f"{name}: {key}"
        configs = [{k: v for k, v in json.loads((f / "config.json").read_text()).items() if k not in volatile}
                   for f in (folder, tmp_path / name)]
        assert configs[0] == configs[1], name


# DeepSeek-V2/V3 (families/deepseek.py). V3-style: a query LoRA, sigmoid routing with its correction bias over
# 4 groups of which 2 are chosen, a routed scaling factor, one dense first layer. V2-style: queries projected
# directly, other nope/rope/v head dims, softmax routing, two dense first layers, two shared experts, and YaRN with
# DeepSeek's mscale / mscale_all_dim over 40 tokens (16 before scaling).
DEEPSEEK = {
    "v3": ("deepseek_v3", dict(moe_intermediate_size=24, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=4,
                               n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                               qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5,
                               num_key_value_heads=4, tie_word_embeddings=False)),
    "v2": ("deepseek_v2", dict(moe_intermediate_size=24, n_shared_experts=2, n_routed_experts=6, num_experts_per_tok=2,
                               first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16,
                               qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.5, num_key_value_heads=4,
                               tie_word_embeddings=False, rope_scaling=dict(
                                   rope_type="yarn", factor=8.0, original_max_position_embeddings=16, mscale=0.707,
                                   mscale_all_dim=0.5, beta_fast=32, beta_slow=1))),
}
FP8_BLOCK = (16, 16)  # not 128: the tiny weights then span several blocks, and TP shards cut through blocks


def save_fp8(source, quantized, reference):
    """``source``'s projection weights quantized to FP8 blocks (convert.fp8.quantize) in ``quantized``, and what
    they stand for, dequantized by hand (weight x its block's scale), as a plain checkpoint in ``reference``."""
    from safetensors.torch import load_file, save_file

    from megatron_swift.convert.fp8 import quantize

    plain, fp8, ref = load_file(source / "model.safetensors"), {}, {}
    for name, weight in plain.items():
        fp8[name] = ref[name] = weight
        if name.endswith(("proj.weight", "proj_with_mqa.weight")):
            q, scale = quantize(weight, FP8_BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            rows, cols = (torch.arange(n) // b for n, b in zip(weight.shape, FP8_BLOCK))
            ref[name] = q.float() * scale[rows][:, cols]
    config = json.loads((source / "config.json").read_text())
    for folder, tensors, extra in ((quantized, fp8, dict(quantization_config=dict(
            quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(FP8_BLOCK)))),
                                   (reference, ref, {})):
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(dict(config, **extra)))


@pytest.fixture(scope="module")
def deepseek_models(tmp_path_factory):
    """Both DeepSeek models and the V3 one quantized to FP8 blocks, with transformers' logits (of the FP8 one: of
    its dequantized reference)."""
    root = tmp_path_factory.mktemp("deepseek")
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, root / "tokens.pt")
    models = {}
    for name, (kind, extra) in DEEPSEEK.items():
        _save_tiny(kind, root / name, **extra)
        models[name] = (root / name, _hf_logits(root / name, tokens, False))
    save_fp8(root / "v3", root / "v3-fp8", root / "v3-fp8-reference")
    models["v3-fp8"] = (root / "v3-fp8", _hf_logits(root / "v3-fp8-reference", tokens, False))
    # the quantization moved the weights: the FP8 model's logits are not the plain one's
    assert (models["v3-fp8"][1] - models["v3"][1]).abs().max().item() > 1e-3
    return root, models


# One launch per layout for every model (CI time): attention split over TP=2, experts over EP=2 (whole experts:
# expert TP 1), FP8 rows dequantized per shard; PP=2 with a dense and an MoE layer on the first stage (V3). TP=1:
# test_grpo's greedy rollouts of the V2-style model.
@pytest.mark.parametrize("layout,names", [
    (["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"], ["v3", "v2", "v3-fp8"]),
    (["parallel.pp=2"], ["v3", "v2"]),
], ids=["tp2-ep2", "pp2"])
def test_deepseek_logits_equal_hf_logits(deepseek_models, tmp_path, layout, names):
    """Every model in one launch per layout (hf_logits_worker --also)."""
    root, models = deepseek_models
    also = [f"--also={models[n][0]},{tmp_path / n}.pt" for n in names[1:]]
    overrides = ["+model=deepseek", f"model.pretrained={models[names[0]][0]}", "train.precision=fp32",
                 "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", *layout]
    proc = subprocess.run(launch_cmd(2, [str(root / "tokens.pt"), str(tmp_path / f"{names[0]}.pt"), *overrides,
                                         *also], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in names:
        diff = (torch.load(tmp_path / f"{name}.pt", weights_only=True)[..., :VOCAB] - models[name][1]).abs().max()
        print(f"deepseek {name} {'-'.join(layout)}: max |logit diff| {diff.item():.2e}")
        assert diff.item() < 1e-4, f"{name}: max |logit diff| {diff.item()}"


# MiMo (families/mimo.py): a Qwen2 checkpoint plus MTP layers named as MiMo's remote code names them
# (model.mtp_layers.{i}: token_layernorm, hidden_layernorm, input_proj over [hidden; embedding], a Qwen2 decoder
# layer, final_layernorm). transformers has no MiMo class: the main model's ground truth is Qwen2ForCausalLM with
# the same weights, the MTP head's a computation of its formula by hand (_mimo_mtp_by_hand).
MIMO = dict(num_hidden_layers=4, num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
MIMO_MTP_NAMES = ("token_layernorm", "hidden_layernorm", "final_layernorm")


def save_tiny_mimo(folder, mtp_layers: int = 1, **extra):
    """A tiny MiMo folder: a random Qwen2 model saved, then its MTP layers added (random, norms included) and
    config.json made MiMo's. Returns (the Qwen2 model, the MTP layers' tensors)."""
    from safetensors.torch import load_file, save_file

    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    model = _save_tiny("qwen2", folder, **dict(MIMO, **extra))
    tensors, g = load_file(folder / "model.safetensors"), torch.Generator().manual_seed(5)
    mtp = {}
    for i in range(mtp_layers):
        torch.manual_seed(10 + i)
        layer = Qwen2DecoderLayer(model.config, layer_idx=0).float()
        for name, t in layer.state_dict().items():
            noise = torch.randn(t.shape, generator=g) * 0.2
            mtp[f"model.mtp_layers.{i}.{name}"] = (1.0 + noise) if "norm" in name else t + (noise if "bias" in name else 0)
        h = model.config.hidden_size
        for name in MIMO_MTP_NAMES:
            mtp[f"model.mtp_layers.{i}.{name}.weight"] = 1.0 + 0.2 * torch.randn(h, generator=g)
        mtp[f"model.mtp_layers.{i}.input_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
    save_file(dict(tensors, **mtp), folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MiMoForCausalLM"], model_type="mimo", num_nextn_predict_layers=mtp_layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return model, mtp


def _mimo_mtp_by_hand(model, mtp, tokens):
    """MTP layer 0's logits by its formula: h = the decoder's output (after its final norm), e = the embedding of
    the next token (0 after the last, as megatron-core rolls), x = input_proj([hidden_layernorm(h);
    token_layernorm(e)]), one Qwen2 decoder layer over x at the same positions, final_layernorm, lm_head."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps))

    w = {k[len("model.mtp_layers.0."):]: v for k, v in mtp.items() if k.startswith("model.mtp_layers.0.")}
    config = _sdpa_config(model.config)
    layer = Qwen2DecoderLayer(config, layer_idx=0).float().eval()
    layer.load_state_dict({k: v for k, v in w.items() if k.split(".")[0] in (
        "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")})
    with torch.no_grad():
        h = model.model(tokens).last_hidden_state
        following = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        e = model.model.embed_tokens(following)
        x = torch.cat([rms(h, w["hidden_layernorm.weight"]), rms(e, w["token_layernorm.weight"])], -1)
        x = x @ w["input_proj.weight"].T
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        out = layer(x, attention_mask=None, position_ids=positions,
                    position_embeddings=model.model.rotary_emb(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        return model.lm_head(rms(out, w["final_layernorm.weight"])).float()


def _sdpa_config(config):
    """The HF config with sdpa attention (causal without a mask)."""
    import copy

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config


MIMO_LAYOUTS = {"tp2": "parallel.tp=2", "pp2": "parallel.tp=1,parallel.pp=2"}


@pytest.fixture(scope="module")
def mimo_run(tmp_path_factory):
    """One launch of two processes: TP=1 (main logits, MTP logits, weights saved for the round trip), then TP=2
    and PP=2 (main logits)."""
    root = tmp_path_factory.mktemp("mimo")
    folder = root / "hf"
    model, mtp = save_tiny_mimo(folder)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(6))
    torch.save(tokens, root / "tokens.pt")
    with torch.no_grad():
        expected = model(tokens).logits.float()
    overrides = ["+model=mimo", f"model.pretrained={folder}", "train.precision=fp32", "train.device=cpu",
                 f"train.output_dir={root / 'run'}", "logging.tensorboard=false"]
    then = [f"--then={name}:{layout}" for name, layout in MIMO_LAYOUTS.items()]
    proc = subprocess.run(launch_cmd(2, [str(root / "tokens.pt"), str(root / "main.pt"), *overrides,
                                         f"--mtp={root / 'mtp.pt'}", *then, "--save=first"], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root, folder, expected, _mimo_mtp_by_hand(model, mtp, tokens)


@pytest.mark.parametrize("layout", ["tp1", *MIMO_LAYOUTS])
def test_mimo_logits_equal_qwen2_logits(mimo_run, layout):
    root, _, expected, _ = mimo_run
    got = torch.load(root / ("main.pt" if layout == "tp1" else f"main.{layout}.pt"), weights_only=True)
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    print(f"mimo {layout}: max |logit diff| vs Qwen2ForCausalLM {diff:.2e}")
    assert diff < 1e-4, f"mimo {layout}: max |logit diff| {diff}"


def test_mimo_mtp_head_equals_its_formula(mimo_run):
    root, _, main, by_hand = mimo_run
    got = torch.load(root / "mtp.pt", weights_only=True)[..., :VOCAB]
    diff = (got - by_hand).abs().max().item()
    print(f"mimo MTP head: max |logit diff| vs by hand {diff:.2e}")
    assert (by_hand - main).abs().max().item() > 0.1  # the MTP head is not the main head
    assert diff < 1e-4, f"MTP head: max |logit diff| {diff}"


def test_mimo_round_trip_is_bitwise(mimo_run, tmp_path):
    """HF -> Megatron (saved by the launch above, MTP layer included) -> HF: every tensor, the MTP layer's too, and
    config.json as they were."""
    from safetensors.torch import load_file

    root, folder, _, _ = mimo_run
    script = "import sys; sys.path.insert(0, 'tools/convert'); from mcore_to_hf import convert; convert(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", script, str(root / "main.ckpt"), str(tmp_path / "hf")], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert any(k.startswith("model.mtp_layers.0.") for k in exported)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    volatile = {"transformers_version", "torch_dtype", "dtype"}
    configs = [{k: v for k, v in json.loads((f / "config.json").read_text()).items() if k not in volatile}
               for f in (folder, tmp_path / "hf")]
    assert configs[0] == configs[1]


def test_mimo_trains_its_mtp_layer(mimo_run, tmp_path):
    """3 steps under PP=2 (the MTP layer on the last stage, with its copy of the embedding): metrics.jsonl has the
    MTP loss on its own, and the exported MTP layer moved (its loss reached the backward)."""
    from safetensors.torch import load_file

    from tests.conftest import run_train

    _, folder, _, _ = mimo_run
    run = tmp_path / "run"
    run_train(2, ["+model=mimo", f"model.pretrained={folder}", "train.precision=fp32", "logging.tensorboard=false",
                  "parallel.pp=2", "train.train_iters=3", "train.lr=1e-2", "model.mtp_loss_weight=0.5",
                  f"train.output_dir={run}", "train.save_hf=true"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row.get("mtp_loss") for row in rows if "loss" in row and row.get("iteration")]
    print("mtp_loss per step:", losses)
    assert len(losses) == 3 and all(v is not None and 0 < v < 20 for v in losses)
    original, trained = load_file(folder / "model.safetensors"), load_file(run / "hf" / "iter_0000003" /
                                                                            "model.safetensors")
    name = "model.mtp_layers.0.input_proj.weight"
    assert (trained[name] - original[name]).abs().max().item() > 1e-4


# GLM-4.5 with its MTP layer stored after the decoder's (model.layers.{N}: a MoE decoder layer plus enorm, hnorm,
# eh_proj over [embedding; hidden], shared_head.norm, and copies of the embedding and head). transformers'
# Glm4Moe ignores it: its main logits are the ground truth; the MTP head's is its formula by hand.
GLM_MTP = dict(num_key_value_heads=2, head_dim=24, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=20,
               n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.3, attention_bias=True,
               use_qk_norm=True, num_hidden_layers=2, num_nextn_predict_layers=1, tie_word_embeddings=False)


# DeepSeek-V3 likewise (MLA and MoE in the MTP layer), 3 layers, the first dense.
DEEPSEEK_MTP = dict(DEEPSEEK["v3"][1], num_hidden_layers=3, num_nextn_predict_layers=1)


def save_tiny_nextn_mtp(kind, folder, extra):
    """A GLM / DeepSeek-V3 folder with one MTP layer, and that layer's decoder layer as transformers' own module
    (a copy of the model with one more layer, loaded from the same tensors: on disk they carry transformers'
    per-expert names)."""
    from safetensors.torch import load_file, save_file

    model = _save_tiny(kind, folder, **extra)
    tensors, g, n = load_file(folder / "model.safetensors"), torch.Generator().manual_seed(7), extra["num_hidden_layers"]
    h, last = model.config.hidden_size, f"model.layers.{n - 1}."  # the last layer routes (first_k_dense_replace=1)
    mtp = {}
    for name, t in tensors.items():
        if name.startswith(last):
            noise = torch.randn(t.shape, generator=g) * 0.2
            mtp[name.replace(last, f"model.layers.{n}.")] = 1.0 + noise if "norm" in name else t + noise * t.std()
    for name in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{n}.{name}.weight"] = 1.0 + 0.2 * torch.randn(h, generator=g)
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
    mtp[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(dict(tensors, **mtp), folder / "model.safetensors", metadata={"format": "pt"})
    longer = folder.parent / f"{folder.name}-longer"  # num_hidden_layers N + 1: its layer N is the MTP layer's decoder layer
    longer.mkdir()
    save_file(dict(tensors, **mtp), longer / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (longer / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=n + 1)))
    with_mtp = transformers.AutoModelForCausalLM.from_pretrained(longer, dtype=torch.float32).eval()
    return model, mtp, with_mtp.model.layers[n]


def _nextn_mtp_by_hand(model, mtp, layer, tokens):
    """x = eh_proj([enorm(e); hnorm(h)]) (DeepSeek-V3's order), the MTP decoder layer, shared_head.norm, lm_head."""
    n = model.config.num_hidden_layers
    w = {k[len(f"model.layers.{n}."):]: v for k, v in mtp.items()}

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps))

    layer.self_attn.config._attn_implementation = "sdpa"  # causal without a mask
    with torch.no_grad():
        h = model.model(tokens).last_hidden_state
        e = model.model.embed_tokens(torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1))
        x = torch.cat([rms(e, w["enorm.weight"]), rms(h, w["hnorm.weight"])], -1) @ w["eh_proj.weight"].T
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        out = layer(x, attention_mask=None, position_ids=positions,
                    position_embeddings=model.model.rotary_emb(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        return model.lm_head(rms(out, w["shared_head.norm.weight"])).float()


@pytest.fixture(scope="module")
def glm_mtp_run(tmp_path_factory):
    """One launch of two processes for both models: TP=1 (main and MTP logits, weights saved), then EP=2 (main
    logits)."""
    root = tmp_path_factory.mktemp("nextn-mtp")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(8))
    torch.save(tokens, root / "tokens.pt")
    models = {}
    for name, kind, extra in (("glm", "glm4_moe", GLM_MTP), ("deepseek", "deepseek_v3", DEEPSEEK_MTP)):
        model, mtp, layer = save_tiny_nextn_mtp(kind, root / name, extra)
        with torch.no_grad():
            expected = model(tokens).logits.float()
        models[name] = (root / name, expected, _nextn_mtp_by_hand(model, mtp, layer, tokens))
    overrides = ["+model=glm4_moe", f"model.pretrained={root / 'glm'}", "train.precision=fp32", "train.device=cpu",
                 f"train.output_dir={root / 'run'}", "logging.tensorboard=false"]
    proc = subprocess.run(launch_cmd(2, [str(root / "tokens.pt"), str(root / "glm.pt"), *overrides,
                                         f"--also={root / 'deepseek'},{root / 'deepseek.pt'}",
                                         f"--mtp={root / 'glm.mtp.pt'}", "--then=ep2:parallel.ep=2", "--save=first"],
                                     script=WORKER), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root, models


@pytest.mark.parametrize("name", ["glm", "deepseek"])
def test_nextn_mtp_logits_head_and_round_trip(glm_mtp_run, tmp_path, name):
    """Main logits equal transformers' (TP=1, EP=2), the MTP head its formula, HF -> Megatron -> HF bitwise (the
    MTP layer and its embedding / head copies included)."""
    from safetensors.torch import load_file

    root, models = glm_mtp_run
    folder, expected, by_hand = models[name]
    for out in (f"{name}.pt", f"{name}.ep2.pt"):
        diff = (torch.load(root / out, weights_only=True)[..., :VOCAB] - expected).abs().max().item()
        print(f"{name}+mtp {out}: max |logit diff| {diff:.2e}")
        assert diff < 1e-4, f"{out}: max |logit diff| {diff}"
    diff = (torch.load(root / f"{name}.mtp.pt", weights_only=True)[..., :VOCAB] - by_hand).abs().max().item()
    print(f"{name} MTP head: max |logit diff| vs by hand {diff:.2e}")
    assert (by_hand - expected).abs().max().item() > 0.1 and diff < 1e-4, diff
    script = "import sys; sys.path.insert(0, 'tools/convert'); from mcore_to_hf import convert; convert(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", script, str(root / f"{name}.ckpt"), str(tmp_path / "hf")], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
