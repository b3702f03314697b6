"""Tokenizers, sources, sampler and run-length arithmetic (in-process)."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_swift.data.errors import DataError
from megatron_swift.data.sampler import DataParallelSampler, collate
from megatron_swift.data.sources import jsonl_source, mock_source
from megatron_swift.data.tokenizer import ByteTokenizer, build_tokenizer
from megatron_swift.training import run_length


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.eod == 256 and tok.vocab_size == 259


def test_jsonl_source_windows_match_hand_computation(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "de"}) + "\n")
    ds = jsonl_source([str(path)], "text", ByteTokenizer(), seq_length=3)
    # stream: a b c <eod> d e <eod> = 7 tokens -> (7 - 1) // 3 = 2 windows of 4 tokens
    assert len(ds) == 2
    assert ds[0].tolist() == [97, 98, 99, 256]
    assert ds[1].tolist() == [256, 100, 101, 256]
    batch = collate([ds[0], ds[1]])
    assert batch.tokens.tolist() == [[97, 98, 99], [256, 100, 101]]
    assert batch.labels.tolist() == [[98, 99, 256], [100, 101, 256]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: row has no string field 'text'"):
        jsonl_source([str(path)], "text", ByteTokenizer(), 4)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    built = build_tokenizer(str(tmp_path))
    assert built.eod == tok.token_to_id("</s>")
    assert built.encode("the cat") == tok.encode("the cat").ids


def test_mock_source_is_seeded():
    def stream(seed):
        ds = mock_source(8, 100, 16, seed=seed)
        assert len(ds) == 8 and all(ds[i].shape == (17,) for i in range(8))
        # consecutive windows of one stream: each window's last token is the next one's first
        assert all(ds[i][-1] == ds[i + 1][0] for i in range(7))
        return torch.cat([ds[i][:-1] for i in range(8)])

    a, b, c = stream(3), stream(3), stream(4)
    assert torch.equal(a, b)  # the seed fixes the tokens...
    assert (a != c).float().mean() > 0.9  # ...and another seed gives other tokens (1 % of them equal by chance)
    assert a.min() >= 0 and a.max() < 100 and len(set(a.tolist())) > 50  # spread over the vocabulary


def test_sampler_splits_global_batch_disjointly_over_dp():
    n, gbs, mbs, dp = 103, 12, 2, 3
    samplers = [DataParallelSampler(n, gbs, mbs, dp, r, seed=7) for r in range(dp)]
    assert samplers[0].steps_per_epoch == 103 // 12 and samplers[0].num_microbatches == 2
    for it in (0, 5, 8, 9, 17):  # 8 steps per epoch: 8, 9 and 17 are in later epochs
        seen = torch.cat([torch.cat(s.microbatch_indices(it)) for s in samplers])
        assert sorted(seen.tolist()) == sorted(samplers[0].global_batch(it).tolist())
        assert len(set(seen.tolist())) == gbs
    epoch0 = torch.cat([samplers[0].global_batch(i) for i in range(8)])
    assert len(set(epoch0.tolist())) == 8 * gbs  # no sample twice within an epoch
    assert not torch.equal(samplers[0].global_batch(0), samplers[0].global_batch(8))  # reshuffled


def test_run_length_takes_the_first_limit():
    assert run_length.plan(100, 8, max_epochs=2, train_iters=None).total_iters == 24
    assert run_length.plan(100, 8, max_epochs=2, train_iters=5).total_iters == 5
    assert run_length.plan(100, 8, max_epochs=None, train_iters=50).total_iters == 50
    plan = run_length.plan(100, 8, 3, None)
    assert plan.ends_epoch(12) and not plan.ends_epoch(13) and plan.epoch_of(12) == 1
    with pytest.raises(ValueError, match="fewer than train.global_batch_size=8"):
        run_length.plan(5, 8, 1, None)
