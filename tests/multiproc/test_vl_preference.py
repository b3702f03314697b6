"""Preference tasks with images (data.preference rows with "images"; a Qwen2.5-VL held tower with M-RoPE, and
LLaVA).

DPO's per-row log-probabilities of chosen and rejected (each with its photograph) are transformers' own
(``Qwen2_5_VLForConditionalGeneration`` on the processor's pixels, its own positions; ``LlavaForConditionalGeneration``
on LlavaProcessor's expansion); each step's loss is the closed form from the policy's log-probs and transformers'
reference log-probs; the preference, which depends on the image, is learnt; TP=2 + SP gives the one-rank run.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from tests.conftest import read_metrics, run_train
from tests.multiproc.test_qwen2_5_vl import training_folder

ANSWERS = ("A temple.", "A flower, red.")  # the right answer for china.jpg, then for the portrait
PHOTOS = ("china.jpg", "portrait.png")
QUESTION = "<image>What is in the picture?"
BETA = 0.1
PAIRS = 2


def pair(i: int) -> dict:
    """Pair i: photograph i % 2, its right answer chosen, the other rejected (both row shapes in turn)."""
    chosen, rejected = ANSWERS[i % 2], ANSWERS[1 - i % 2]
    if i % 2 == 0:
        return {"prompt": QUESTION, "chosen": chosen, "rejected": rejected, "images": [PHOTOS[i % 2]]}
    return {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": chosen}],
            "rejected_response": rejected, "images": [PHOTOS[i % 2]]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = training_folder(tmp_path_factory.mktemp("vl_prefs"))
    (root / "prefs.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in range(PAIRS)))
    return root


def common(root):
    return ["+model=qwen2_5_vl", f"model.pretrained={root / 'hf'}", "data=vl_sft",
            f"data.path=[{root / 'prefs.jsonl'}]",
            "task=dpo", f"task.beta={BETA}", "train.precision=fp32", "train.seq_length=64", "train.save_at_end=false",
            "logging.tensorboard=false", "data.shuffle=false"]


def hf_logps(root) -> torch.Tensor:
    """[pairs, 2] summed log-probs of the chosen and rejected completions (their tokens and the end of turn) by
    transformers' model, the rows written as Qwen2.5-VL's processor writes them (each image's grid of pad tokens
    between vision start and end)."""
    from PIL import Image

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "hf").float().eval()
    processor = transformers.AutoImageProcessor.from_pretrained(root / "hf", backend="pil")
    tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    out = torch.zeros(PAIRS, 2, dtype=torch.float64)
    for i in range(PAIRS):
        pixels = processor(images=[Image.open(root / PHOTOS[i % 2]).convert("RGB")], return_tensors="pt")
        image = "<|vision_start|>" + "<|image_pad|>" * (int(pixels["image_grid_thw"].prod()) // 4) + "<|vision_end|>"
        prompt = f"<|im_start|>user\n{QUESTION.replace('<image>', image)}<|im_end|>\n<|im_start|>assistant\n"
        start = len(tok(prompt)["input_ids"])
        for side, answer in enumerate((ANSWERS[i % 2], ANSWERS[1 - i % 2])):
            ids = torch.tensor([tok(prompt + answer + "<|im_end|>")["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=pixels["pixel_values"],
                               image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=(ids == 5).long()).logits
            logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            out[i, side] = logp[start - 1:].sum()
    return out


# One pair a step, reference log-probs precomputed, tower, merger and language model all training; the one-rank
# run is shared by both tests.
SETTINGS = ["task.precompute_ref=true", "train.global_batch_size=1", "train.micro_batch_size=1", "train.train_iters=4",
            "train.lr=3e-3", "train.lr_warmup_iters=0", "train.max_epochs=null", "train.train_vision=true"]


@pytest.fixture(scope="module")
def one_rank(root, tmp_path_factory):
    run = tmp_path_factory.mktemp("vl_dpo") / "one"
    run_train(1, [*common(root), *SETTINGS, f"train.output_dir={run}"])
    return run


def test_dpo_with_images_is_transformers_closed_form_and_learns(root, one_rank):
    """The reference table is transformers' per-row log-probs; step 1 (policy = reference) gives the policy's
    log-probs = transformers' and log 2; every step's loss is -log sigmoid(beta * ((pc - rc) - (pr - rr))) from
    the step's policy log-probs and transformers' reference ones; on its second visit every pair's margin is
    higher than on its first, though the right answer depends on the photograph (the same two answers are chosen
    for one and rejected for the other)."""
    want = hf_logps(root)
    table = torch.load(one_rank / "ref_logps_train.pt", weights_only=True).double()
    assert (table - want).abs().max().item() < 1e-4, (table, want)
    rows = read_metrics(one_rank)
    assert [r["iteration"] for r in rows] == list(range(1, 5))
    first = rows[0]
    assert abs(first["logps/chosen"] - want[0, 0].item()) < 1e-4 and abs(first["logps/rejected"] - want[0, 1]) < 1e-4
    assert abs(first["loss"] - math.log(2)) < 1e-6
    for step, row in enumerate(rows):
        rc, rr = want[step % PAIRS].tolist()
        delta = (row["logps/chosen"] - rc) - (row["logps/rejected"] - rr)
        closed = -torch.nn.functional.logsigmoid(torch.tensor(BETA * delta, dtype=torch.float64)).item()
        assert abs(row["loss"] - closed) < 1e-5, (step + 1, row["loss"], closed)
    margins = [r["rewards/margins"] for r in rows]
    assert all(margins[k + PAIRS] > margins[k] for k in range(PAIRS)), margins  # each rose on its 2nd visit
    assert sum(r["loss"] for r in rows[PAIRS:]) < sum(r["loss"] for r in rows[:PAIRS])


def test_dpo_with_images_tp2_sp_equals_one_rank(tmp_path, root, one_rank):
    """TP=2 + SP (the held tower whole on each rank, its gradients counted once): the same reference table and
    the one-rank run's losses, log-probs, margins and gradient norms within 1e-5."""
    run = tmp_path / "tp2"
    run_train(2, [*common(root), *SETTINGS, "parallel.tp=2", "parallel.sp=true", f"train.output_dir={run}"])
    tables = [torch.load(r / "ref_logps_train.pt", weights_only=True) for r in (one_rank, run)]
    assert (tables[0] - tables[1]).abs().max().item() < 1e-5
    baseline, rows = read_metrics(one_rank), read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows, baseline):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(got[key] - want[key]) < 1e-5, (got["iteration"], key, got[key], want[key])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def tiny_llava_folder(root):
    """An HF LLaVA folder a run trains from: CLIP (56 px, 14-px patches: 16 tokens per image) + a tiny Qwen2, a BPE
    tokenizer whose <image> special is the config's image token, the ChatML template and the image processor."""
    from tests.conftest import bpe_tokenizer
    from tests.test_vl_data import CHATML, SPECIALS

    tok = bpe_tokenizer(["What is in the picture? A temple, a flower and the sky.",
                         "system user assistant says hello"], SPECIALS)
    image_id = tok.token_to_id("<image>")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    text = transformers.Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_seq_length=16, projector_hidden_act="gelu")
    torch.manual_seed(0)
    folder = root / "llava"
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens={"image_token": "<image>"}).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHATML)
    transformers.CLIPImageProcessor(size={"shortest_edge": 56},
                                    crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    return folder, image_id


def llava_logps(folder, root, image_id: int):
    """[pairs, 2] summed log-probs of chosen and rejected by transformers' LlavaForConditionalGeneration (each
    <image> expanded to its 16 image tokens, as LlavaProcessor does) and [pairs, 2] completion token counts."""
    from PIL import Image

    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).float().eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    logps, counts = torch.zeros(PAIRS, 2, dtype=torch.float64), torch.zeros(PAIRS, 2, dtype=torch.float64)
    for i in range(PAIRS):
        pixels = processor(images=[Image.open(root / PHOTOS[i % 2]).convert("RGB")], return_tensors="pt")
        prompt = f"<|im_start|>user\n{QUESTION.replace('<image>', '<image>' * 16)}<|im_end|>\n<|im_start|>assistant\n"
        start = len(tok(prompt)["input_ids"])
        for side, answer in enumerate((ANSWERS[i % 2], ANSWERS[1 - i % 2])):
            ids = torch.tensor([tok(prompt + answer + "<|im_end|>")["input_ids"]])
            assert int((ids == image_id).sum()) == 16
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=pixels["pixel_values"]).logits
            logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            logps[i, side], counts[i, side] = logp[start - 1:].sum(), ids.shape[1] - start
    return logps, counts


def test_llava_preference_tasks_with_images_start_at_transformers_closed_forms(tmp_path, root):
    """LLaVA (CLIP + Qwen2), one torchrun job training DPO, KTO, CPO and SimPO in turn; two pairs (four rows, two
    photographs) in one micro-batch. Step 1 of each from transformers' log-probs (its own LLaVA on the same
    pixels): DPO's policy log-probs equal them (the step's mean over the pairs) within 1e-4 and its live reference,
    which must see the same images, gives log 2; KTO (examples: each pair's chosen, desirable, then its rejected)
    reports the same log-probs, KL 0 and loss 1/2; CPO's loss is -log sigmoid(beta (pc - pr)) + NLL(chosen) and
    SimPO's -log sigmoid(beta (pc/|c| - pr/|r| - gamma/beta)), averaged over the pairs."""
    import subprocess

    from tests.conftest import ROOT, launch_cmd, train_env

    folder, image_id = tiny_llava_folder(tmp_path)
    kto = root / "kto.jsonl"  # next to the photographs
    kto.write_text("".join(json.dumps({"prompt": QUESTION, "completion": ANSWERS[(i + side) % 2], "label": not side,
                                       "images": [PHOTOS[i % 2]]}) + "\n" for i in range(PAIRS) for side in (0, 1)))
    out = tmp_path / "runs"
    overrides = [*common(root)[2:], "+model=llava", f"model.pretrained={folder}", "train.global_batch_size=2",
                 "train.micro_batch_size=2", "train.train_iters=1", "train.device=cpu"]
    tasks = f"--tasks=dpo,kto@data.path=[{kto}],cpo,simpo"
    proc = subprocess.run(launch_cmd(1, [str(tmp_path / "unused.json"), tasks, str(out), *overrides],
                                     script=ROOT / "tests" / "multiproc" / "dpo_worker.py"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    want, counts = llava_logps(folder, root, image_id)
    (dpo,) = read_metrics(out / "dpo")
    assert abs(dpo["logps/chosen"] - want[:, 0].mean().item()) < 1e-4, (dpo["logps/chosen"], want)
    assert abs(dpo["logps/rejected"] - want[:, 1].mean().item()) < 1e-4, (dpo["logps/rejected"], want)
    assert abs(dpo["loss"] - math.log(2)) < 1e-6 and dpo["rewards/chosen"] == 0.0
    (kto_row,) = read_metrics(out / "kto")  # step 1: pair 0's chosen (desirable) and rejected (undesirable)
    assert abs(kto_row["logps/chosen"] - want[0, 0].item()) < 1e-4
    assert abs(kto_row["logps/rejected"] - want[0, 1].item()) < 1e-4
    assert abs(kto_row["loss"] - 0.5) < 1e-6 and kto_row["kl"] == 0.0
    F = torch.nn.functional
    # task.beta (common's) for both; CPO's NLL weight alpha 1 and SimPO's gamma/beta 0.5 are their defaults
    cpo = (-F.logsigmoid(BETA * (want[:, 0] - want[:, 1])) - want[:, 0] / counts[:, 0]).mean().item()
    simpo = (-F.logsigmoid(BETA * (want[:, 0] / counts[:, 0] - want[:, 1] / counts[:, 1] - 0.5))).mean().item()
    for task, closed in (("cpo", cpo), ("simpo", simpo)):
        (row,) = read_metrics(out / task)
        assert abs(row["loss"] - closed) < 1e-5, (task, row["loss"], closed)
