import torch, json, os
torch.set_num_threads(1)
torch.manual_seed(0)
from PIL import Image
from transformers import (LlavaConfig, LlavaForConditionalGeneration, CLIPVisionConfig, SiglipVisionConfig,
                          Qwen2Config, CLIPImageProcessor, SiglipImageProcessor, LlavaProcessor, PreTrainedTokenizerFast)
from tokenizers import Tokenizer, models, pre_tokenizers

vocab = {"<unk>": 0, "<pad>": 1, "a": 2, "photo": 3, "of": 4, "USER:": 5, "ASSISTANT:": 6, "<image>": 7}
tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>")); tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")
tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
print("tok <image> ->", tok.encode("<image>", add_special_tokens=False))

vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       image_size=56, patch_size=14, projection_dim=16)
txt = Qwen2Config(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
cfg = LlavaConfig(vision_config=vis, text_config=txt, image_token_index=7, image_seq_length=16,
                  projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
model = LlavaForConditionalGeneration(cfg).eval()
print("type(vision_tower)", type(model.model.vision_tower).__name__)
print("config to_dict keys:", sorted(k for k in cfg.to_dict() if not k.startswith("_"))[:60])
print("state_dict keys:")
for k, v in model.state_dict().items():
    if ".layers.1." in k or ".layers.2." in k: continue
    print("  ", k, tuple(v.shape))
model.save_pretrained("/tmp/vlm/hf_llava_clip")
from safetensors import safe_open
with safe_open("/tmp/vlm/hf_llava_clip/model.safetensors", "pt") as f:
    keys = list(f.keys())
print("ON-DISK keys sample:", [k for k in keys if ".layers.0." in k or "layers" not in k][:40])
print("config.json:", json.dumps(json.load(open("/tmp/vlm/hf_llava_clip/config.json")), indent=None)[:1500])

ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1)
img = Image.open("/tmp/skl/x/sklearn/datasets/images/china.jpg")
inputs = proc(images=img, text="USER: <image> a photo of ASSISTANT:", return_tensors="pt")
print("input_ids", inputs["input_ids"].tolist(), "pixel_values", tuple(inputs["pixel_values"].shape),
      "count<image>", int((inputs["input_ids"] == 7).sum()))
with torch.no_grad():
    out = model(**inputs)
print("logits", tuple(out.logits.shape))
# SigLIP variant
sv = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=56, patch_size=14)
cfg2 = LlavaConfig(vision_config=sv, text_config=txt, image_token_index=7, image_seq_length=16,
                   vision_feature_layer=-1, vision_feature_select_strategy="full")
m2 = LlavaForConditionalGeneration(cfg2).eval()
print("siglip vision keys:", [k for k in m2.state_dict() if "vision" in k and ".layers.1." not in k])
m2.save_pretrained("/tmp/vlm/hf_llava_siglip")
with safe_open("/tmp/vlm/hf_llava_siglip/model.safetensors", "pt") as f:
    print("siglip ON-DISK sample:", [k for k in f.keys() if "vision" in k and "layers" not in k])
sp = SiglipImageProcessor(size={"height": 56, "width": 56})
proc2 = LlavaProcessor(image_processor=sp, tokenizer=tok, patch_size=14, vision_feature_select_strategy="full")
inp2 = proc2(images=img, text="USER: <image> a photo of ASSISTANT:", return_tensors="pt")
print("siglip pixel", tuple(inp2["pixel_values"].shape), "n img tokens", int((inp2["input_ids"] == 7).sum()),
      "pixel range", float(inp2["pixel_values"].min()), float(inp2["pixel_values"].max()))
with torch.no_grad():
    print("siglip logits", tuple(m2(**inp2).logits.shape))
print("clip ip:", ip.to_dict())
