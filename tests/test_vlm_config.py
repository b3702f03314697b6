"""A VLM configuration that cannot be built is refused before any heavy work, with one line naming what to
change (families/llava.py reading an HF LLaVA config.json; config/validate.py)."""
from __future__ import annotations

import json

import pytest
import transformers

from megatron_swift.config.compose import compose
from megatron_swift.config.validate import ConfigError, validate


def _llava_folder(tmp_path, **top):
    """An HF LLaVA config.json as transformers writes it (no weights: validation reads the config only)."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    text = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=299,
                                      image_seq_length=16).to_dict()
    config.update(top, architectures=["LlavaForConditionalGeneration"])
    folder = tmp_path / "llava"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _problems(overrides):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides), 1)
    return str(e.value)


def test_a_real_llava_config_resolves(tmp_path):
    arch = validate(compose(["+model=llava", f"model.pretrained={_llava_folder(tmp_path)}"]), 1)
    assert (arch.text_family, arch.vision.model_type, arch.vision.num_layers, arch.image_token_id) == \
        ("qwen2", "clip", 2, 299)  # feature layer -2 of 3: two layers built
    assert (arch.num_layers, arch.hidden_size, arch.vision_select) == (2, 64, "default")


@pytest.mark.parametrize("top,message", [
    (dict(vision_feature_layer=[-2, -5]), "vision_feature_layer=[-2, -5]: features concatenated from several"),
    (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy='cls' is not default or full"),
    (dict(image_seq_length=577), "image_seq_length=577 but the vision encoder gives 16 features per image"),
    (dict(vision_feature_layer=-9), "vision feature layer -9 is outside the encoder's 3 layers"),
])
def test_unsupported_llava_configs_name_the_field(tmp_path, top, message):
    folder = _llava_folder(tmp_path, **top)
    text = _problems(["+model=llava", f"model.pretrained={folder}"])
    assert message in text and "config.json" in text


def test_unknown_vision_tower(tmp_path):
    folder = _llava_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["model_type"] = "pixtral"
    (folder / "config.json").write_text(json.dumps(config))
    assert "vision model_type 'pixtral' is not clip or siglip" in _problems(["+model=llava",
                                                                              f"model.pretrained={folder}"])


@pytest.mark.parametrize("overrides,message", [
    (["+model=qwen3", "model.llm=/x"], "model.llm / model.vision compose a vision-language model; +model=qwen3"),
    (["+model=llava", "model.llm=/x"], "model.llm needs model.vision"),
    (["+model=llava", "task=grpo", "data=prompts"], "task=grpo does not take images: its rollout engine "
     "(megatron_swift/rollout) generates from token prompts only, so the rollouts would not see the images; a "
     "vision-language model trains with task=cpo, dpo, kto, lm, orpo, simpo"),
    (["+model=qwen2_5_vl", "task=grpo", "data=prompts"], "task=grpo does not take images: its rollout engine"),
    (["+model=llava", "task=gkd", "data=sft"], "task=gkd does not take images: its teacher and its on-policy "
     "generation (megatron_swift/rollout) take token rows only"),
    (["+model=qwen2_5_vl", "task=rm", "data=prefs"], "task=rm does not take images: a reward model is exported "
     "as a transformers *ForSequenceClassification, which has no vision-language class"),
    (["+model=llava", "parallel.tp=8", "model.num_attention_heads=8", "model.num_query_groups=8"],
     "parallel.tp=8 must divide the vision encoder's 4 heads"),
    (["+model=llava", "data=vl_sft", "train.seq_length=16"], "train.seq_length=16 must hold an image's 16 tokens"),
    (["+model=llava", "model.vision_select=cls"], "model.vision_select=cls is not one of"),
    (["+model=qwen3", "model.vision_feature_layer=-1"], "model.vision_feature_layer applies to a VLM composed"),
])
def test_vlm_settings_refused_with_the_key(overrides, message):
    assert message in _problems(overrides)


@pytest.mark.parametrize("task", ["dpo", "kto", "cpo", "simpo", "orpo"])
def test_preference_tasks_take_images(tmp_path, task):
    """The tasks whose forward passes a VLM its images validate with one (their rows: data.preference)."""
    folder = _llava_folder(tmp_path)
    data = "data=kto" if task == "kto" else "data=prefs"
    validate(compose(["+model=llava", f"model.pretrained={folder}", f"task={task}", data]), 1)


def test_pretrained_and_composed_are_alternatives(tmp_path):
    folder = _llava_folder(tmp_path)
    text = _problems(["+model=llava", f"model.pretrained={folder}", f"model.llm={folder}", f"model.vision={folder}"])
    assert "model.pretrained (an HF LLaVA folder) and model.llm + model.vision" in text


def test_vl_runs_are_named_as_sft_after_their_model():
    from megatron_swift.training.run_dir import run_name

    assert run_name(compose(["+model=llava", "data=vl_sft"])) == "llava-tiny-sft-train"
    assert run_name(compose(["+model=llava", "data=vl_sft", "parallel.tp=2", "tuner=lora"]), world=8) == \
        "llava-tiny-sft-train-lora-tp2_dp4"
    assert run_name(compose(["+model=qwen3", "model.pretrained=/ckpt/tiny-qwen3"])) == "hf_tiny-qwen3-pt-demo_corpus"
    assert run_name(compose(["+model=llava", "data=vl_sft", "model.llm=/ckpt/Qwen3-1.7B",
                             "model.vision=/ckpt/siglip"])) == "llava-Qwen3-1.7B-sft-train"


def test_an_unrelated_error_while_composing_is_not_passed_off_as_a_config_line(tmp_path, monkeypatch):
    # Only the composition's own refusals (CompositionError, DataError) become config lines; a bug elsewhere
    # keeps its type and traceback.
    from megatron_swift.models.families.base import Family

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a setting")

    monkeypatch.setattr(Family, "read_hf", broken)  # the language model's config reader
    folder = _llava_folder(tmp_path)
    with pytest.raises(ValueError, match="a bug, not a setting") as e:
        validate(compose(["+model=llava", f"model.llm={folder}", f"model.vision={folder}"]), 1)
    assert not isinstance(e.value, ConfigError)
