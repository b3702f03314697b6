import torch; torch.set_num_threads(1); torch.manual_seed(0)
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
x = torch.randn(1, 3, 56, 56)
c = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14)).eval()
with torch.no_grad():
    o = c(x, output_hidden_states=True)
    emb = c.pre_layrnorm(c.embeddings(x))
print("clip n_hidden", len(o.hidden_states), "hs[0]==preLN(emb)", torch.allclose(o.hidden_states[0], emb),
      "hs[-1]==last", torch.allclose(o.hidden_states[-1], o.last_hidden_state))
s = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)).eval()
with torch.no_grad():
    o = s(x, output_hidden_states=True)
print("siglip n_hidden", len(o.hidden_states), "hs[-1]==last_hidden_state(post-LN)", torch.allclose(o.hidden_states[-1], o.last_hidden_state),
      "post_layernorm(hs[-1])==last", torch.allclose(s.post_layernorm(o.hidden_states[-1]), o.last_hidden_state, atol=1e-6),
      "hidden_act", s.config.hidden_act, "vision_use_head", s.config.vision_use_head, "eps", s.config.layer_norm_eps)
print("siglip padding of patch conv:", s.embeddings.patch_embedding)
