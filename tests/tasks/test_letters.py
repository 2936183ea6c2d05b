import random

import pytest

from rlhf_kernels.tasks import LettersTask, get_task


def test_gold_reward_is_the_program():
    t = LettersTask()
    assert t.gold_reward("abcde:", "aabbccdd") == 1.0
    assert t.gold_reward("abcde:", "zzzzzzzz") == 0.0
    assert t.gold_reward("abcde:", "abcd") == pytest.approx(4 / 8)          # short answers are capped
    assert t.gold_reward("abcde:", "abcdzzzzzz") == pytest.approx(4 / 10)   # off-prompt letters cost
    assert t.gold_reward("abcde:", "") == 0.0


def test_deterministic_from_seed():
    t = get_task("letters")
    assert t.sft_data(50, 3) == t.sft_data(50, 3)
    assert t.preference_data(50, 3) == t.preference_data(50, 3)
    assert t.prompts(50, 3) == t.prompts(50, 3)
    assert t.sft_data(50, 3) != t.sft_data(50, 4)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_sft_data_is_mediocre_and_annotator_is_noisy():
    t = get_task()
    sft = t.sft_data(2000, 0)
    g = sum(t.gold_reward(r["prompt"], r["response"]) for r in sft) / len(sft)
    assert 0.35 < g < 0.6  # room for RLHF to improve
    prefs = t.preference_data(2000, 0)
    agree = sum(t.gold_reward(r["prompt"], r["chosen"]) > t.gold_reward(r["prompt"], r["rejected"]) for r in prefs)
    rate = agree / len(prefs)
    assert 0.7 < rate < 0.95  # mostly right, but a noisy proxy
    lens = {len(r["chosen"]) for r in prefs}
    assert min(lens) <= 3 and max(lens) >= 13


def test_annotator_follows_bradley_terry():
    t = get_task()
    rng = random.Random(0)
    # gold 1.0 vs 0.5 with temperature 0.1: P = sigmoid(5) ≈ 0.993
    wins = sum(t.annotate("abcde:", "aaaaaaaa", "aaaazzzz", rng) for _ in range(2000))
    assert 0.98 < wins / 2000 <= 1.0
    # equal gold: a coin flip
    wins = sum(t.annotate("abcde:", "aaaazzzz", "zzzzaaaa", rng) for _ in range(2000))
    assert 0.45 < wins / 2000 < 0.55


def test_easy_variant_for_smoke_tests():
    t = get_task("letters-easy")
    assert t.prompt_len == 2 and len(t.alphabet) == 8 and t.name == "letters-easy"
    assert all(len(r["prompt"]) == 3 for r in t.prompts(10, 0))
    assert t.prompts(10, 0) != get_task("letters").prompts(10, 0)
