import mlx_lm
import pytest

from mlx_tokenrl import rollout as rollout_module
from mlx_tokenrl.rollout import SamplingParams, encode_prompts, rollout
from mlx_tokenrl.tasks import format_prompt

QUESTIONS = ["what is 12 times 3?", "he had 5 apples and gave 2. how many are left?",
             "what is 7 times 8?"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return mlx_lm.load(str(tiny_model_dir))


def prompts(tokenizer, questions=QUESTIONS):
    return encode_prompts(tokenizer, [format_prompt(tokenizer, q) for q in questions])


def tokens(completions):
    return [c.tokens for c in completions]


def test_shapes_eos_and_truncation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    params = SamplingParams(temperature=1.0, max_new_tokens=150)
    out = rollout(model, tok, prompts(tok), 4, params, seeds=[1, 2, 3])
    assert [c.prompt_index for c in out] == [0] * 4 + [1] * 4 + [2] * 4
    eos = set(tok.eos_token_ids)
    for c in out:
        assert 1 <= len(c.tokens) <= 150
        if c.truncated:
            assert len(c.tokens) == 150 and not eos & set(c.tokens)
        else:
            assert c.tokens[-1] in eos and not eos & set(c.tokens[:-1])
            assert c.text == tok.decode(c.tokens[:-1])
    assert any(not c.truncated for c in out) and any(c.truncated for c in out)
    assert len({tuple(t) for t in tokens(out)}) > 6  # sampling differs within a group


def test_deterministic_and_independent_of_batch_company(model_and_tokenizer):
    model, tok = model_and_tokenizer
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    p = prompts(tok)
    together = rollout(model, tok, p, 4, params, seeds=[10, 20, 30])
    again = rollout(model, tok, p, 4, params, seeds=[10, 20, 30])
    alone = rollout(model, tok, p[1:2], 4, params, seeds=[20])
    reordered = rollout(model, tok, [p[2], p[1]], 4, params, seeds=[30, 20])
    assert tokens(together) == tokens(again)
    assert tokens(together[4:8]) == tokens(alone) == tokens(reordered[4:8])
    other_seed = rollout(model, tok, p[1:2], 4, params, seeds=[21])
    assert tokens(other_seed) != tokens(alone)


def test_compaction_does_not_change_what_is_sampled(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    params = SamplingParams(temperature=1.0, max_new_tokens=150)
    p = prompts(tok)
    monkeypatch.setattr(rollout_module, "COMPACT_FRACTION", 1.0)  # never compact
    never = rollout(model, tok, p, 4, params, seeds=[1, 2, 3])
    monkeypatch.setattr(rollout_module, "COMPACT_FRACTION", 0.0)  # compact on every finish
    always = rollout(model, tok, p, 4, params, seeds=[1, 2, 3])
    assert tokens(never) == tokens(always)
    assert len({len(c.tokens) for c in never}) > 1  # rows really finished at different steps


def test_greedy_matches_mlx_lm_generate(model_and_tokenizer):
    model, tok = model_and_tokenizer
    texts = [format_prompt(tok, q) for q in QUESTIONS]
    out = rollout(model, tok, encode_prompts(tok, texts), 2,
                  SamplingParams(temperature=0.0, max_new_tokens=10), seeds=[0, 0, 0])
    for i, text in enumerate(texts):
        expected = mlx_lm.generate(model, tok, text, max_tokens=10, verbose=False)
        assert out[2 * i].text == expected == out[2 * i + 1].text


def test_rewards_and_prefixes(model_and_tokenizer):
    model, tok = model_and_tokenizer
    p = prompts(tok)[:1]
    prefix = tok.encode("4", add_special_tokens=False)
    out = rollout(model, tok, p, 3, SamplingParams(temperature=1.0, max_new_tokens=6), seeds=[5],
                  answers=["4"], reward_fn=lambda text, answer: float(text.startswith(answer)),
                  prefixes=[prefix])
    assert all(c.text.startswith("4") and c.reward == 1.0 for c in out)


def test_one_seed_per_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="one seed per prompt"):
        rollout(model, tok, prompts(tok), 2, SamplingParams(), seeds=[1])
