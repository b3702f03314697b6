"""Reward functions for GRPO: registry, built-ins (values worked out by hand), plugin files, LLM judge."""
from __future__ import annotations

import re
import textwrap

import pytest

from megatron_swift.rewards import (JudgeReward, JudgeTemplateError, RewardError, RewardPluginError, RewardResult,
                                    UnknownReward, builtin, call, combine, configure, get, load_plugins, names,
                                    registry, reward)
from megatron_swift.rewards.judge import DEFAULT_PATTERN, JudgeError, truncated_reply
from megatron_swift.tasks.configs import JudgeConfig

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 7?"}]


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test sees the built-ins only, whatever it registers or configures."""
    state = registry._snapshot()
    yield
    registry._restore(state)


def run(name, completions, **columns):
    """``call`` the registered reward ``name`` with one (identical) prompt per completion."""
    return call(name, get(name), [PROMPT] * len(completions), completions, columns)


# ------------------------------------------------------------------------------------------ registry

def test_register_get_names():
    @reward("double_len")
    def double_len(prompts, completions, **_):
        return [2 * len(c) for c in completions]

    assert get("double_len") is double_len
    assert {"accuracy", "format", "soft_overlong", "repetition", "double_len"} <= set(names())
    assert names() == sorted(names())
    reward("double_len")(double_len)  # the same function again is not a clash


def test_duplicate_name_names_both_functions():
    @reward("twice")
    def first(prompts, completions, **_):
        return [0.0] * len(completions)

    def second(prompts, completions, **_):
        return [1.0] * len(completions)

    with pytest.raises(ValueError) as e:
        reward("twice")(second)
    assert "first" in str(e.value) and "second" in str(e.value) and "'twice'" in str(e.value)
    assert get("twice") is first


def test_unknown_name_lists_known_and_plugins():
    with pytest.raises(UnknownReward) as e:
        get("acuracy")
    assert isinstance(e.value, KeyError)
    msg = str(e.value)
    assert "'acuracy'" in msg
    known = msg.split("known rewards: ")[1].split(". ")[0].split(", ")
    assert {"accuracy", "format", "repetition", "soft_overlong"} <= set(known) and known == sorted(known)
    assert "task.reward_plugins" in msg


def test_call_converts_and_counts_none():
    @reward("mixed")
    def mixed(prompts, completions, **_):
        return [True, 2, 0.5, None, float("nan")]

    out = run("mixed", ["a"] * 5)
    assert isinstance(out, RewardResult) and isinstance(out, list)
    assert out == [1.0, 2.0, 0.5, 0.0, 0.0] and all(type(v) is float for v in out)
    assert (out.skipped, out.errors, out.name) == (2, 0, "mixed")


def _fails_on_x(prompts, completions, **_):
    """Batched: raises as soon as one completion is 'x'."""
    return [1.0 / (c != "x") for c in completions]


def test_call_raise_names_function_and_row():
    with pytest.raises(RewardError) as e:
        call("inv", _fails_on_x, [PROMPT] * 4, ["a", "b", "x", "x"], {})
    msg = str(e.value)
    assert "\n" not in msg
    assert "'inv'" in msg and "_fails_on_x" in msg and "test_rewards.py" in msg
    assert "row 2" in msg and "ZeroDivisionError: float division by zero" in msg


def test_call_zero_scores_failing_rows_and_counts_them():
    out = call("inv", _fails_on_x, [PROMPT] * 4, ["x", "b", "x", "c"], {}, on_error="zero")
    assert out == [0.0, 1.0, 0.0, 1.0]
    assert out.errors == 2 and "row 0" in out.first_error


def test_call_batch_only_failure():
    def batch_only(prompts, completions, **_):
        if len(completions) > 1:
            raise MemoryError("batch too big")
        return [1.0]

    with pytest.raises(RewardError, match="on no single row: MemoryError: batch too big"):
        call("b", batch_only, [PROMPT] * 2, ["a", "b"], {})
    out = call("b", batch_only, [PROMPT] * 2, ["a", "b"], {}, on_error="zero")
    assert out == [1.0, 1.0] and out.errors == 0


@pytest.mark.parametrize("result, what", [([1.0], "returned 1 values for 2"), (0.5, "returned float"),
                                          (["1", 2], "returned str '1' for row 0"),
                                          ([1.0, float("inf")], "returned inf for row 1")])
def test_call_bad_result_is_an_error_in_both_modes(result, what):
    def bad(prompts, completions, **_):
        return result

    for mode in ("raise", "zero"):
        with pytest.raises(RewardError) as e:
            call("bad", bad, [PROMPT] * 2, ["a", "b"], {}, on_error=mode)
        assert what in str(e.value) and "'bad'" in str(e.value)


def test_call_checks_alignment():
    with pytest.raises(ValueError, match="column 'solution' has 1 entries for 2 completions"):
        run("accuracy", ["1", "2"], solution=["1"])


def test_combine_weighted_sum():
    # 0.5*1 + 2*(-0.25) = 0 ; 0.5*0 + 2*1 = 2 ; 0.5*1 + 2*0.5 = 1.5
    assert combine({"a": [1.0, 0.0, 1.0], "b": [-0.25, 1.0, 0.5]}, [0.5, 2.0]) == [0.0, 2.0, 1.5]
    assert combine({"a": [1.0], "b": [2.0]}, None) == [3.0]
    with pytest.raises(ValueError, match="1 weights for 2 reward functions"):
        combine({"a": [1.0], "b": [2.0]}, [1.0])


def test_configure_errors():
    with pytest.raises(ValueError, match="'accuracy' takes no parameters"):
        configure("accuracy", x=1)
    with pytest.raises(ValueError, match="'repetition'.*ngram"):
        configure("repetition", ngram=2)
    with pytest.raises(UnknownReward):
        configure("nope", x=1)


# -------------------------------------------------------------------------------------- accuracy

ACCURACY_CASES = [
    # (completion, solution, expected)
    ("<think>6*7</think><answer>42</answer>", "42", 1.0),
    ("so the answer is \\boxed{42}.", "$42$", 1.0),
    ("The result is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>41</answer>", "42", 0.0),
    ("I first get 42 but then 41", "42", 0.0),       # the last number counts
    ("no answer at all", "42", 0.0),
    ("", "42", 0.0),
]


@pytest.mark.parametrize("completion, solution, expected", ACCURACY_CASES)
def test_accuracy_math_verify(completion, solution, expected):
    pytest.importorskip("math_verify")
    assert builtin._load_math_verify() is not None
    assert run("accuracy", [completion], solution=[solution]) == [expected]


@pytest.mark.parametrize("completion, solution, expected", ACCURACY_CASES + [
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer> $3$. </answer>", "3", 1.0),
    ("<answer>3.50</answer>", "7/2", 1.0),
    ("<answer>paris</answer>", "Paris", 1.0),
    ("<answer>Lyon</answer>", "Paris", 0.0),
    ("\\boxed{x+1}", "\\boxed{x + 1}", 1.0),
])
def test_accuracy_fallback_without_math_verify(monkeypatch, completion, solution, expected):
    monkeypatch.setattr(builtin, "_load_math_verify", lambda: None)
    assert run("accuracy", [completion], solution=[solution]) == [expected]


@pytest.mark.parametrize("text, answer", [("a \\boxed{1} then \\boxed{\\frac{2}{3}} end", "\\frac{2}{3}"),
                                          ("<answer>x = 12.</answer> and 99 outside", "12"),
                                          ("-5", "-5"), ("  Paris. ", "Paris"), ("\\boxed{{a}", "\\boxed{{a}")])
def test_extract_answer(text, answer):
    assert builtin.extract_answer(text) == answer


def test_accuracy_rows_without_solution_are_skipped_and_column_is_required():
    out = run("accuracy", ["<answer>1</answer>", "<answer>2</answer>"], solution=[None, "2"])
    assert out == [0.0, 1.0] and out.skipped == 1
    with pytest.raises(RewardError, match="needs a 'solution' column"):
        run("accuracy", ["1"])


# --------------------------------------------------------------------------------- format, lengths

def test_format_default_and_configured():
    good = "<think>\nstep 1\nstep 2\n</think>\n\n<answer>42</answer>"
    assert run("format", [good, "<answer>42</answer>", good + " extra", "<think></think><answer></answer>"]) \
        == [1.0, 0.0, 0.0, 1.0]
    configure("format", pattern=r"^<answer>\d+</answer>$")
    assert run("format", [good, "<answer>42</answer>", "<answer>x</answer>"]) == [0.0, 1.0, 0.0]
    # A factory-made reward leaves the registry alone.
    fn = builtin.make_format(r"think")
    assert fn([PROMPT], [good]) == [1.0] and get("format").pattern == r"^<answer>\d+</answer>$"
    with pytest.raises(ValueError, match="invalid pattern"):
        builtin.make_format("(")


def test_soft_overlong():
    with pytest.raises(RewardError, match="not configured"):
        run("soft_overlong", ["a"], completion_lengths=[1])
    configure("soft_overlong", max_completion_length=100, buffer=20)
    # L - B = 80: <= 80 -> 0; 90 -> (80 - 90) / 20 = -0.5; 95 -> -0.75; 100 -> -1; beyond -> -1
    assert run("soft_overlong", ["x"] * 7, completion_lengths=[0, 50, 80, 90, 95, 100, 150]) \
        == [0.0, 0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    with pytest.raises(RewardError, match="needs a 'completion_lengths' column"):
        run("soft_overlong", ["x"])
    for bad in ({"max_completion_length": 10, "buffer": 0}, {"max_completion_length": 10, "buffer": 11},
                {"max_completion_length": 0, "buffer": 1}):
        with pytest.raises(ValueError):
            builtin.make_soft_overlong(**bad)


def test_repetition():
    # "a b c a b c", n=3: 4 trigrams (abc, bca, cab, abc), 3 distinct -> 1 - 3/4 = 0.25 -> -0.25
    # "the cat sat", n=3: 1 trigram -> 0; two words < n -> 0; empty -> 0
    texts = ["a b c a b c", "the cat sat", "one two", "", "x x x x x x"]
    # "x x x x x x": 4 trigrams, 1 distinct -> 1 - 1/4 = 0.75
    assert run("repetition", texts) == [-0.25, 0.0, 0.0, 0.0, -0.75]
    configure("repetition", ngram_size=1, max_penalty=-2.0)
    # unigrams of "A a b a" (lower-cased): a, a, b, a -> 4 total, 2 distinct -> 0.5 * -2 = -1
    assert run("repetition", ["A a b a", "one two"]) == [-1.0, 0.0]
    with pytest.raises(ValueError, match="max_penalty must be <= 0"):
        builtin.make_repetition(max_penalty=1.0)
    with pytest.raises(ValueError, match="ngram_size"):
        builtin.make_repetition(ngram_size=0)


# ------------------------------------------------------------------------------------------ plugins

def _plugin(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return str(path)


def test_plugin_registers_and_receives_columns_by_name(tmp_path):
    path = _plugin(tmp_path, "my_rewards.py", """\
        from megatron_swift.rewards import reward

        @reward("my_reward")
        def my_reward(prompts, completions, solution, bonus, **columns):
            # columns by name, whatever order the caller uses
            return [float(s in c) + b for s, c, b in zip(solution, completions, bonus)]
        """)
    assert load_plugins([path]) == ["my_reward"]
    fn = get("my_reward")
    out = call("my_reward", fn, [PROMPT] * 3, ["it is 42", "it is 41", "7"],
               {"bonus": [0.5, 0.0, 0.25], "solution": ["42", "42", "8"], "unused": [1, 2, 3]})
    assert out == [1.5, 0.0, 0.25]
    assert load_plugins([path]) == ["my_reward"]  # loading again is not a clash


@pytest.mark.parametrize("source, where", [
    ("x = 1\ny = 2\ndef f(:\n    pass\n", ":3: SyntaxError: "),
    ("from megatron_swift.rewards import reward\n\n\n\n\n\ny = x\n", ":7: NameError: name 'x' is not defined"),
    ("import os\nraise SystemExit(3)\n", ":2: SystemExit: 3"),
])
def test_plugin_errors_are_one_line_with_file_and_line(tmp_path, source, where):
    path = _plugin(tmp_path, "broken.py", source)
    with pytest.raises(RewardPluginError) as e:
        load_plugins([path])
    msg = str(e.value)
    assert msg.startswith(path + where) and "\n" not in msg


def test_plugin_missing_file_and_name_clash_rolls_back(tmp_path):
    with pytest.raises(RewardPluginError, match="nope.py: reward plugin file not found"):
        load_plugins([str(tmp_path / "nope.py")])
    path = _plugin(tmp_path, "clash.py", """\
        from megatron_swift.rewards import reward

        @reward("fine")
        def fine(prompts, completions, **_):
            return [1.0] * len(completions)

        @reward("accuracy")
        def accuracy(prompts, completions, **_):
            return [1.0] * len(completions)
        """)
    with pytest.raises(RewardPluginError) as e:
        load_plugins([path])
    msg = str(e.value)
    assert msg.startswith(path + ":7: ValueError: reward 'accuracy' is already registered by accuracy (")
    assert "builtin.py" in msg and "clash.py" in msg
    assert "fine" not in names()  # the failed file left nothing behind


@pytest.mark.parametrize("name", ["code", "judge", "accuracy"])
def test_a_plugin_cannot_take_a_builtin_name(tmp_path, name):
    """Issue 25: a plugin registering code or judge was silently ignored (the run used the built-in)."""
    path = _plugin(tmp_path, f"takes_{name}.py", f"""\
        from megatron_swift.rewards import reward

        @reward("{name}")
        def mine(prompts, completions, **_):
            return [1.0] * len(completions)
        """)
    with pytest.raises(RewardPluginError) as e:
        load_plugins([path])
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ValueError: reward '{name}' is already registered by "), msg
    assert "cannot register mine (" in msg and "\n" not in msg


def test_plugin_reward_failure_names_plugin_file(tmp_path):
    path = _plugin(tmp_path, "flaky.py", """\
        from megatron_swift.rewards import reward

        @reward("flaky")
        def flaky(prompts, completions, **_):
            return [float(c) for c in completions]
        """)
    load_plugins([path])
    with pytest.raises(RewardError) as e:
        run("flaky", ["1", "2", "two"])
    assert "flaky.py:3" in str(e.value) and "row 2" in str(e.value) and "ValueError" in str(e.value)


# -------------------------------------------------------------------------------------------- judge

class FakeJudge:
    """Returns canned replies in turn and records every batch of prompts."""

    def __init__(self, replies):
        self.replies, self.batches = list(replies), []

    def __call__(self, prompts):
        self.batches.append(list(prompts))
        out, self.replies = self.replies[:len(prompts)], self.replies[len(prompts):]
        return out


def test_judge_parses_scales_and_counts_malformed():
    gen = FakeJudge(["Score: 7", "I think 3.\n\n**Score:** 8", "no idea", "Score: 10/10",
                     "Score: 4.5", "???"])
    judge = JudgeReward(gen, scale=10)
    assert judge([PROMPT] * 4, ["a", "b", "c", "d"]) == [0.7, 0.8, 0.0, 1.0]
    assert (judge.last_malformed, judge.malformed) == (1, 1)
    assert judge([PROMPT] * 2, ["e", "f"]) == [0.45, 0.0]
    assert (judge.last_malformed, judge.malformed, judge.replies) == (1, 2, 6)
    assert judge.stats() == {"malformed": 1.0, "malformed_frac": 0.5}
    assert len(gen.batches) == 2  # one generate call per reward call
    custom = JudgeReward(FakeJudge(["[[YES]] 9", "[[NO]]"]), pattern=r"\[\[(YES|NO)\]\]")
    assert custom([PROMPT] * 2, ["x", "y"]) == [0.0, 0.0] and custom.last_malformed == 2  # group not a number


def test_judge_reads_only_a_final_score_line_and_clamps():
    """Issue 25: the old parser took the reply's last number anywhere and never clamped: 'Score: 7/10' scored
    1.0, 'Score: 1000' 100, and a reply cut off at the token limit counted."""
    replies = ["Score: 7/10", "Score: 1000", "Score: -4", "I give it a 9 out of 10", "Score: 6\nActually, let me rethink",
               "Score: 70/100", "score = 3.", truncated_reply("Long reasoning... Score: 1")]
    judge = JudgeReward(FakeJudge(replies), scale=10)
    out = judge([PROMPT] * len(replies), ["c"] * len(replies))
    assert out == [0.7, 1.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0]
    assert judge.last_malformed == 4
    ranged = JudgeReward(FakeJudge(["Score: 4", "Score: 0"]), scale=None, score_range=(1, 5))
    assert ranged([PROMPT] * 2, ["a", "b"]) == [4.0, 1.0]
    with pytest.raises(ValueError, match="score_range"):
        JudgeReward(FakeJudge([]), score_range=(5, 1))
    assert JudgeConfig().pattern == DEFAULT_PATTERN  # the config's default is the parser's


def test_judge_template_variables():
    gen = FakeJudge(["1", "2"])
    template = "{{ prompt }}|{{ completion }}|{{ solution }}|{{ messages | length }}|{{ messages[0].content }}"
    judge = JudgeReward(gen, template=template, columns=["solution"])
    judge([PROMPT, "plain prompt"], ["c1", "c2"], solution=["42", "s2"])
    assert gen.batches == [["What is 6 * 7?|c1|42|2|Be brief.", "plain prompt|c2|s2|1|plain prompt"]]
    # The default template shows the reference only when there is a solution column.
    for columns in ({}, {"solution": ["42"]}):
        gen = FakeJudge(["Score: 5"])
        JudgeReward(gen)([PROMPT], ["forty-two"], **columns)
        text = gen.batches[0][0]
        assert "What is 6 * 7?" in text and "forty-two" in text and ("Reference answer" in text) == bool(columns)


def test_judge_strict_undefined_and_sandbox():
    with pytest.raises(JudgeTemplateError, match="undefined variable.*solutoin.*available: completion"):
        JudgeReward(FakeJudge([]), template="{{ solutoin }}", columns=["solution"])
    judge = JudgeReward(FakeJudge(["1"]), template="{{ completion }} {{ solutoin }}")  # columns unknown yet
    with pytest.raises(JudgeTemplateError, match="solutoin"):
        judge([PROMPT], ["c"], solution=["1"])
    with pytest.raises(JudgeTemplateError, match="list object has no element 5"):
        JudgeReward(FakeJudge(["1"]), template="{{ messages[5].content }}")([PROMPT], ["c"])
    with pytest.raises(JudgeTemplateError):
        JudgeReward(FakeJudge(["1"]), template="{{ completion.__class__.__mro__ }}")([PROMPT], ["c"])
    with pytest.raises(JudgeTemplateError, match="line 1"):
        JudgeReward(FakeJudge([]), template="{{ completion ")
    with pytest.raises(JudgeError, match="1 replies"):
        JudgeReward(FakeJudge(["1"]))([PROMPT] * 2, ["a", "b"])


def test_judge_through_registry_call():
    judge = reward("my_judge")(JudgeReward(FakeJudge(["Score: 6", "nothing"]), scale=10))
    out = call("my_judge", get("my_judge"), [PROMPT] * 2, ["a", "b"], {"solution": ["1", "2"]})
    assert out == [0.6, 0.0] and judge.last_malformed == 1


@pytest.fixture(scope="module")
def tiny_model_generate():
    """Greedy generation (8 new tokens) with a random-weight tiny Qwen2 and a BPE trained on the fly."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["You are grading an answer to a question.", "Rate the answer from 0 to 10.",
              "Score: 7", "The answer is 42 because 6 times 7 is 42.", "what is the capital of France? Paris",
              "no idea at all, maybe twelve or 3.5"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf.padding_side = "left"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(hf), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=1024, pad_token_id=hf.pad_token_id,
                                      eos_token_id=hf.eos_token_id, bos_token_id=hf.eos_token_id)
    model = transformers.Qwen2ForCausalLM(config).eval()

    def generate(prompts, favour=None):
        """Replies to ``prompts``; ``favour``: a string whose token gets a large logit bias (to force digits)."""
        bias = {(hf.convert_tokens_to_ids(favour),): 20.0} if favour else None
        batch = hf(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=hf.pad_token_id,
                                 sequence_bias=bias)
        return hf.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def test_judge_with_tiny_model(tiny_model_generate):
    seen = []

    def generate(prompts):
        # Random weights rarely write a number: the second half of the batch gets digits favoured, so one
        # judge call sees both unparsable and parsable replies.
        half = len(prompts) // 2
        replies = tiny_model_generate(prompts[:half]) + tiny_model_generate(prompts[half:], favour="7")
        seen.extend(replies)
        return replies

    completions = ["42", "It is 41.", "Paris", "", "six times seven is forty-two", "7 * 6 = 42", "no", "3.5"]
    ends_in_number = r"(-?\d+(?:\.\d+)?)\s*$"  # random weights never write "Score:": a number ending the reply
    judge = JudgeReward(generate, pattern=ends_in_number, scale=10)
    out = call("judge", judge, [PROMPT] * len(completions), completions, {"solution": ["42"] * len(completions)})
    assert len(seen) == len(completions) and all(type(v) is float for v in out)
    # Independently of the judge: the number ending each reply's last non-empty line, clamped to 0-10.
    lines = [[line for line in r.splitlines() if line.strip()] for r in seen]
    numbers = [re.findall(ends_in_number, ls[-1].strip()) if ls else [] for ls in lines]
    assert judge.last_malformed == sum(not n for n in numbers)
    assert 1 <= judge.last_malformed < len(completions)
    assert out == [min(max(float(n[-1]), 0.0), 10.0) / 10 if n else 0.0 for n in numbers]
