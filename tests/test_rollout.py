import json
from dataclasses import asdict

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from typer.testing import CliRunner

from mlx_tokenrl import rollout as rollout_module
from mlx_tokenrl.models import ModelLoadError
from mlx_tokenrl.rollout import (SamplingParams, check_batched_rollouts, encode_prompts,
                                 generate_tokens, rollout)
from mlx_tokenrl.tasks import format_prompt
from mlx_tokenrl.toy import build_tokenizer, tiny_family_model
from tokenrl_cli.main import app

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


# Families whose cache is a plain KVCache on every layer, with the heads test_loss checks.
PLAIN_KV = {"llama": {}, "gemma2": {"final_logit_softcapping": 2.0, "num_key_value_heads": 4},
            "cohere": {"logit_scale": 0.25}, "phi3": {}}
SLIDING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}
# (model type, config, what the one-line refusal names)
UNBATCHABLE = {
    "llama with sliding-window layers": ("llama", SLIDING, "RotatingKVCache"),
    "mamba": ("mamba", {"state_size": 8, "conv_kernel": 4, "use_bias": False,
                        "use_conv_bias": True, "time_step_rank": 4}, "ArraysCache"),
    # A plain KVCache, but its grouped-query attention cannot take the batch's padding mask.
    "gemma2 with grouped-query attention": ("gemma2", {}, "batched rollouts fail in its forward"),
}


@pytest.mark.parametrize("model_type", PLAIN_KV)
def test_other_families_greedy_matches_mlx_lm_with_compaction(model_type, monkeypatch):
    """Left-padded prompts of different lengths, rows dropped as they hit EOS: each row is
    still what mlx-lm's own one-sequence greedy decoding (its own cache) produces."""
    model = tiny_family_model(model_type, **PLAIN_KV[model_type])
    check_batched_rollouts(model)
    prompts = [np.random.default_rng(n).integers(0, 320, n).tolist() for n in (3, 9, 5)]
    expected = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=8)]
                for p in prompts]
    eos = expected[0][3]  # prompt 0's rows finish early and are dropped from the cache
    monkeypatch.setattr(rollout_module, "COMPACT_FRACTION", 0.0)
    produced = generate_tokens(model, prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=8),
                               {eos}, seeds=[0, 0, 0]).tokens
    for i, want in enumerate(expected):
        until_eos = want[:want.index(eos) + 1] if eos in want else want
        assert produced[2 * i] == until_eos == produced[2 * i + 1]
    assert len(produced[0]) < 8


@pytest.mark.parametrize("case", UNBATCHABLE)
def test_models_rollouts_cannot_batch_are_refused_in_one_line(case):
    model_type, config, reason = UNBATCHABLE[case]
    with pytest.raises(ModelLoadError) as refused:
        check_batched_rollouts(tiny_family_model(model_type, **config))
    message = str(refused.value)
    assert f"model type {model_type!r} is not supported" in message and reason in message
    assert "\n" not in message


def test_rollouts_refuse_a_cache_they_cannot_batch_before_any_forward(monkeypatch):
    """`eval` reaches rollouts without the start-up check: prefill refuses by itself."""
    model = tiny_family_model("llama", **SLIDING)
    monkeypatch.setattr(type(model), "__call__", None)  # any forward would raise TypeError
    with pytest.raises(ModelLoadError, match="RotatingKVCache"):
        generate_tokens(model, [[1, 2, 3]], 2, SamplingParams(max_new_tokens=4), set(), seeds=[0])


def test_start_up_check_catches_a_batch_cache_that_ignores_left_padding(model_and_tokenizer,
                                                                       monkeypatch):
    model, _ = model_and_tokenizer
    check_batched_rollouts(model)
    batch_cache = rollout_module.batch_cache
    monkeypatch.setattr(rollout_module, "batch_cache",
                        lambda model, padding: batch_cache(model, [0] * len(padding)))
    with pytest.raises(ModelLoadError, match="batched rollouts differ from its own forward"):
        check_batched_rollouts(model)


def test_train_refuses_a_sliding_window_model_before_writing_anything(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model = tiny_family_model("llama", vocab_size=build_tokenizer(model_dir), **SLIDING)
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = {k: v for k, v in asdict(model.args).items() if v is not None}
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "multiply", "--model", str(model_dir),
                                      "--out", str(out), "--steps", "1", "--group-size", "2",
                                      "--prompts-per-step", "1", "--max-new-tokens", "4"])
    assert result.exit_code == 1, result.output
    assert "model type 'llama' is not supported" in result.output
    assert "RotatingKVCache" in result.output and "Traceback" not in result.output
    assert not out.exists()


# ---- training's rollouts sample at the run's --temperature and --top-p ----------------------

def nucleus(probs, top_p):
    """`probs` restricted to the fewest most likely tokens whose mass reaches top_p, renormalised
    (written out here, not mlx-lm's apply_top_p)."""
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros_like(probs)
    kept[order[mass_before < top_p]] = probs[order[mass_before < top_p]]
    return kept / kept.sum()


def tempered(logits, temperature, top_p):
    z = np.asarray(logits, dtype=np.float64) / temperature
    return nucleus(np.exp(z - z.max()) / np.exp(z - z.max()).sum(), top_p)


@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (1.6, 1.0), (1.0, 0.5), (0.8, 0.7)])
def test_training_rollouts_sample_the_softmax_at_the_runs_temperature_and_top_p(
        tiny_model_dir, temperature, top_p):
    """The first token of 4000 completions of one prompt, drawn as a training step draws them
    (rollout_and_select, from the run's config), against softmax(logits / T) cut to top-p,
    both written out here from the model's own logits in float64. Sampling at 1.0 or without
    the top-p cut is many standard errors away (checked below, so the test keeps its bite)."""
    from mlx_tokenrl.config import TrainConfig
    from mlx_tokenrl.models import load_model
    from mlx_tokenrl.tasks import load_task
    from mlx_tokenrl.trainer import rollout_and_select

    model, tokenizer = load_model(str(tiny_model_dir))
    task = load_task("multiply", digits="1x1")
    rows = 4000
    cfg = TrainConfig(task="multiply", algo="grpo", prompts_per_step=1, group_size=rows,
                      max_new_tokens=1, temperature=temperature, top_p=top_p)
    groups = []
    rollout_and_select(model, tokenizer, task, cfg, 0, task.train, [0],
                       on_selected=lambda selected: groups.extend(g.completions for g in selected))
    prompt = encode_prompts(tokenizer, [task.prompt(tokenizer, task.train[0].question)])[0]
    logits = np.array(model(mx.array(prompt)[None])[0, -1], dtype=np.float64)
    probs = tempered(logits, temperature, top_p)
    freq = np.bincount([c.tokens[0] for c in groups[0]], minlength=len(probs)) / rows
    tolerance = 5 * np.sqrt(probs * (1 - probs) / rows) + 1e-3
    assert np.all(np.abs(freq - probs) <= tolerance), np.abs(freq - probs).max()
    # What a sampler ignoring either setting would draw is far outside that tolerance.
    for wrong in (tempered(logits, 1.0, top_p), tempered(logits, temperature, 1.0)):
        if not np.array_equal(wrong, probs):
            assert np.any(np.abs(wrong - probs) > 3 * tolerance)
