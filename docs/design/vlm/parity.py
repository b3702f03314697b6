"""HF LlavaForConditionalGeneration (CLIP or SigLIP + Qwen2) -> megatron-core LLaVAModel: logits parity on a real JPEG."""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29562", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch; torch.set_num_threads(1); torch.manual_seed(0)
import torch.nn.functional as F
import torch.distributed as dist
from PIL import Image
from transformers import LlavaForConditionalGeneration, CLIPImageProcessor, SiglipImageProcessor
kind = sys.argv[1]  # clip | siglip
hf = LlavaForConditionalGeneration.from_pretrained(f"/tmp/vlm/hf_llava_{kind}").eval()
c, vc, tc = hf.config, hf.config.vision_config, hf.config.text_config
sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
img = Image.open("/tmp/skl/x/sklearn/datasets/images/china.jpg")
ip = (CLIPImageProcessor(size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size})
      if kind == "clip" else SiglipImageProcessor(size={"height": vc.image_size, "width": vc.image_size}))
pix = ip(images=img, return_tensors="pt")["pixel_values"]
n = c.image_seq_length
hf_ids = torch.tensor([[5] + [7] * n + [2, 3, 4, 6]])
mc_ids = torch.tensor([[5, 7, 2, 3, 4, 6]])
with torch.no_grad():
    a = hf(input_ids=hf_ids, pixel_values=pix).logits
from megatron_swift.backend import cpu_compat, no_apex
no_apex.apply(); cpu_compat.apply()
dist.init_process_group("gloo")
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(1, 1)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
model_parallel_cuda_manual_seed(0)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.activations import quick_gelu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_mlp_module_spec
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
import megatron.core.models.vision.clip_vit_model as cvm
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron_swift.models.norm import swap_torch_norms

# CLIPViTModel builds ln_pre/ln_post from NORM_IMPL=torch.nn.LayerNorm without TE, which rejects config=: use
# WrappedTorchNorm; HF LLaVA reads hidden_states[k] which SigLIP's post_layernorm never touched: no ln_post.
d = list(cvm.CLIPViTModel.__init__.__defaults__)
cvm.CLIPViTModel.__init__.__defaults__ = tuple([WrappedTorchNorm, WrappedTorchNorm if os.environ.get("LNPOST") else IdentityOp] + d[2:])

common = dict(use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
              apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
              bias_dropout_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32)
lang = TransformerConfig(num_layers=tc.num_hidden_layers, hidden_size=tc.hidden_size, ffn_hidden_size=tc.intermediate_size,
                         num_attention_heads=tc.num_attention_heads, num_query_groups=tc.num_key_value_heads,
                         normalization="RMSNorm", layernorm_epsilon=tc.rms_norm_eps, gated_linear_unit=True,
                         activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, **common)
layer = c.vision_feature_layer
n_vis = vc.num_hidden_layers + 1 + layer if layer < 0 else layer  # hidden_states[k] = output of k layers
acts = {"quick_gelu": quick_gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}
vis = TransformerConfig(num_layers=n_vis, hidden_size=vc.hidden_size, ffn_hidden_size=vc.intermediate_size,
                        num_attention_heads=vc.num_attention_heads, normalization="LayerNorm",
                        layernorm_epsilon=vc.layer_norm_eps, gated_linear_unit=False, activation_func=acts[vc.hidden_act],
                        add_bias_linear=True, add_qkv_bias=True, **common)
vis.vision_model_type = kind
proj = TransformerConfig(num_layers=1, hidden_size=tc.hidden_size, ffn_hidden_size=tc.hidden_size, num_attention_heads=1,
                         gated_linear_unit=False, activation_func=acts[c.projector_hidden_act],
                         add_bias_linear=c.multimodal_projector_bias, **common)
lang_spec = get_gpt_decoder_block_spec(lang, use_transformer_engine=False); swap_torch_norms(lang_spec)
vit_spec = get_vit_layer_with_local_spec()
if not os.environ.get("CAUSAL"): vit_spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
if os.environ.get("SDPA"):
    from megatron_swift.models.attention import use_core_attention
    use_core_attention(vit_spec, "sdpa"); use_core_attention(lang_spec, "sdpa")
    print("core attention:", vit_spec.submodules.self_attention.submodules.core_attention.__name__)
m = LLaVAModel(language_transformer_config=lang, language_transformer_layer_spec=lang_spec,
               language_vocab_size=tc.vocab_size, language_max_sequence_length=tc.max_position_embeddings,
               vision_transformer_config=vis, vision_transformer_layer_spec=vit_spec,
               drop_vision_class_token=(kind == "clip" and c.vision_feature_select_strategy == "default"),
               vision_projection_config=proj, vision_projection_layer_spec=get_mlp_module_spec(use_te=False).submodules,
               language_position_embedding_type="rope", language_rotary_base=tc.rope_parameters["rope_theta"],
               img_h=vc.image_size, img_w=vc.image_size, patch_dim=vc.patch_size,
               image_token_index=c.image_token_index, parallel_output=False).eval()
print("megatron img_seq_len", m.img_seq_len, "HF image_seq_length", c.image_seq_length)

def qkv(prefix, groups, d):
    q, k, v = (sd[f"{prefix}.{n}"] for n in ("q_proj", "k_proj", "v_proj"))
    def fuse(q, k, v):
        rest = q.shape[1:]
        return torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], 1).reshape(-1, *rest)
    return fuse(q.weight if hasattr(q, "weight") else q, k, v)

new = {}
V, L, P = "model.vision_tower.", "model.language_model.", "model.multi_modal_projector."
E = V + "embeddings."
new["vision_model.conv1.weight"] = sd[E + "patch_embedding.weight"]
if kind == "clip":
    new["vision_model.class_token"] = sd[E + "class_embedding"].reshape(1, 1, -1)
    new["vision_model.ln_pre.weight"], new["vision_model.ln_pre.bias"] = sd[V + "pre_layrnorm.weight"], sd[V + "pre_layrnorm.bias"]
else:
    new["vision_model.conv1.bias"] = sd[E + "patch_embedding.bias"]
new["vision_model.position_embeddings.weight"] = sd[E + "position_embedding.weight"]
hd = vc.hidden_size // vc.num_attention_heads
for i in range(n_vis):
    h, g = f"{V}encoder.layers.{i}.", f"vision_model.decoder.layers.{i}."
    for t in ("weight", "bias"):
        new[g + f"input_layernorm.{t}"] = sd[h + f"layer_norm1.{t}"]
        new[g + f"pre_mlp_layernorm.{t}"] = sd[h + f"layer_norm2.{t}"]
        qw = [sd[h + f"self_attn.{n}_proj.{t}"] for n in "qkv"]
        rest = qw[0].shape[1:]
        new[g + f"self_attention.linear_qkv.{t}"] = torch.cat([x.reshape(vc.num_attention_heads, hd, *rest) for x in qw], 1).reshape(-1, *rest)
        new[g + f"self_attention.linear_proj.{t}"] = sd[h + f"self_attn.out_proj.{t}"]
        new[g + f"mlp.linear_fc1.{t}"] = sd[h + f"mlp.fc1.{t}"]
        new[g + f"mlp.linear_fc2.{t}"] = sd[h + f"mlp.fc2.{t}"]
for t in ("weight", "bias"):
    new[f"vision_projection.encoder.linear_fc1.{t}"] = sd[P + f"linear_1.{t}"]
    new[f"vision_projection.encoder.linear_fc2.{t}"] = sd[P + f"linear_2.{t}"]
new["language_model.embedding.word_embeddings.weight"] = sd[L + "embed_tokens.weight"]
new["language_model.decoder.final_layernorm.weight"] = sd[L + "norm.weight"]
new["language_model.output_layer.weight"] = sd["lm_head.weight"]
G, D = tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads
for i in range(tc.num_hidden_layers):
    h, g = f"{L}layers.{i}.", f"language_model.decoder.layers.{i}."
    new[g + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
    new[g + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
    for t in ("weight", "bias"):
        q, k, v = (sd[h + f"self_attn.{n}_proj.{t}"] for n in "qkv")
        rest = q.shape[1:]
        new[g + f"self_attention.linear_qkv.{t}"] = torch.cat([q.reshape(G, -1, *rest), k.reshape(G, D, *rest), v.reshape(G, D, *rest)], 1).reshape(-1, *rest)
    new[g + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"]
    new[g + "mlp.linear_fc1.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
    new[g + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
missing, unexpected = m.load_state_dict(new, strict=False)
print("missing", [k for k in missing if "_extra_state" not in k], "unexpected", unexpected)
used = set()
unused_hf = sorted(k for k in sd if not any(torch.equal(sd[k].flatten()[:4], x.flatten()[:4]) for x in new.values()))
print("HF tensors not used (by value):", unused_hf)

with torch.no_grad():
    b, _ = m(pix, mc_ids, None, None)
print(kind, "HF logits", tuple(a.shape), "megatron logits", tuple(b.shape), "max |diff|", float((a - b).abs().max()))
# Own-wrapper path: HF-style pre-expanded ids, image embeddings scattered at the <image> positions (no LLaVAModel.forward).
with torch.no_grad():
    feats = m.vision_model(pix)
    if m._drop_vision_class_token:
        feats = feats[:, m.vision_model.class_token_len:]
    feats = m.vision_projection(feats.permute(1, 0, 2).contiguous())        # [img_seq, n_img, h]
    emb = m.language_model.embedding(input_ids=hf_ids, position_ids=None)  # [s, b, h]
    mask = (hf_ids == c.image_token_index).transpose(0, 1)                 # [s, b]
    emb = emb.clone(); emb[mask] = feats.permute(1, 0, 2).reshape(-1, emb.shape[-1]).to(emb.dtype)
    out = m.language_model(input_ids=None, position_ids=None, attention_mask=None, decoder_input=emb)
print(kind, "pre-expanded wrapper path: logits", tuple(out.shape), "max |diff| vs HF", float((a - out).abs().max()))
dist.destroy_process_group()
