import os, sys, traceback, dataclasses
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch; torch.set_num_threads(1); torch.manual_seed(0)
import torch.nn.functional as F
import torch.distributed as dist
from megatron_swift.backend import cpu_compat, no_apex
no_apex.apply(); cpu_compat.apply()
dist.init_process_group("gloo")
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(1, 1)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
model_parallel_cuda_manual_seed(0)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.activations import quick_gelu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron_swift.models.norm import swap_torch_norms

common = dict(use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
              apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
              bias_dropout_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32)
lang = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                         normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
                         add_bias_linear=False, add_qkv_bias=True, **common)
vis = TransformerConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                        normalization="LayerNorm", layernorm_epsilon=1e-5, gated_linear_unit=False,
                        activation_func=quick_gelu, add_bias_linear=True, add_qkv_bias=True, **common)
vis.vision_model_type = "clip"
proj = TransformerConfig(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=1,
                         gated_linear_unit=False, activation_func=F.gelu, add_bias_linear=True, **common)
lang_spec = get_gpt_decoder_block_spec(lang, use_transformer_engine=False); swap_torch_norms(lang_spec)
vit_spec = get_vit_layer_with_local_spec()
print("local vit spec attn_mask_type:", vit_spec.submodules.self_attention.params)
proj_spec = get_mlp_module_spec(use_te=False).submodules
kw = dict(language_transformer_config=lang, language_transformer_layer_spec=lang_spec, language_vocab_size=16,
          language_max_sequence_length=256, vision_transformer_config=vis, vision_transformer_layer_spec=vit_spec,
          drop_vision_class_token=True, vision_projection_config=proj, vision_projection_layer_spec=proj_spec,
          vision_projection_type="mlp", language_position_embedding_type="rope", language_rotary_base=10000,
          img_h=56, img_w=56, patch_dim=14, image_token_index=7, parallel_output=False)
try:
    m = LLaVAModel(**kw)
    print("BUILT with defaults")
except Exception as e:
    print("BUILD FAILS with defaults:", type(e).__name__, e)
    traceback.print_exc(limit=-3)
    # workaround: CLIPViTModel's ln_pre default NORM_IMPL=torch.nn.LayerNorm gets config=/hidden_size= kwargs
    import megatron.core.models.vision.clip_vit_model as cvm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    init = cvm.CLIPViTModel.__init__
    defaults = list(init.__defaults__); print("CLIPViTModel.__init__ defaults:", defaults[:2])
    init.__defaults__ = tuple([WrappedTorchNorm, WrappedTorchNorm] + defaults[2:])
    m = LLaVAModel(**kw)
    print("BUILT after ln_pre_impl default -> WrappedTorchNorm")
print("img_seq_len", m.img_seq_len)
for k, v in m.state_dict().items():
    if "_extra_state" in k or ".layers.1." in k: continue
    print("  ", k, tuple(v.shape))
m.eval()
images = torch.randn(1, 3, 56, 56)
ids = torch.tensor([[5, 7, 2, 3, 4, 6]])
pos = torch.arange(ids.shape[1]).unsqueeze(0)
with torch.no_grad():
    try:
        out, lm = m(images, ids, pos, None)
        print("logits (no labels):", tuple(out.shape), "loss_mask", lm)
        labels = torch.tensor([[7, 2, 3, 4, 6, 1]]); loss_mask = torch.ones_like(labels, dtype=torch.float)
        loss, new_mask = m(images, ids, pos, None, labels=labels, loss_mask=loss_mask)
        print("with labels: loss", tuple(loss.shape), "new_loss_mask", new_mask.tolist())
        # pre-expanded HF-style ids (16 image tokens): each token is treated as an image -> expects 16 images
        ids16 = torch.tensor([[5] + [7] * 16 + [2, 3, 4, 6]])
        try:
            o16, _ = m(images, ids16, None, None)
            print("pre-expanded ids: out", tuple(o16.shape))
        except Exception as e:
            print("pre-expanded ids FAIL:", type(e).__name__, str(e)[:200])
    except Exception as e:
        traceback.print_exc()
dist.destroy_process_group()
