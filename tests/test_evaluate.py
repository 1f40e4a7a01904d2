"""Tests of gad.evaluate: hand-computed text metrics, and lab metrics on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from gad.data.chats import Record, encode_prompt, encode_response, end_of_turn_id
from gad.eval import evaluate as ev
from gad.models.store import build_tiny, load
from gad.train.rollout import Sampling, TransformersRollout

# ---------------------------------------------------------------- n-gram F1 and ROUGE-L


def test_tokenize_lowercases_and_splits_on_non_alphanumerics():
    assert ev.tokenize("The CAT, sat_on  élan 2x!") == ["the", "cat", "sat", "on", "élan", "2x"]


def test_ngram_f1_by_hand():
    cand, ref = "the cat sat on the mat", "The cat is on the mat."
    # Unigrams: cand {the:2, cat, sat, on, mat} (6), ref {the:2, cat, is, on, mat} (6);
    # clipped overlap the:2 + cat + on + mat = 5 -> P = R = 5/6 -> F1 = 5/6.
    assert ev.ngram_f1(cand, ref, 1) == pytest.approx(5 / 6)
    # Bigrams: cand {the cat, cat sat, sat on, on the, the mat} (5),
    # ref {the cat, cat is, is on, on the, the mat} (5); overlap 3 -> F1 = 3/5.
    assert ev.ngram_f1(cand, ref, 2) == pytest.approx(3 / 5)


def test_ngram_f1_clips_counts_and_is_asymmetric_in_p_and_r():
    # Unigrams: cand {the:3}, ref {the:1, cat:1}; overlap clipped to min(3, 1) = 1.
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 2/5 (unclipped it would be P = 1).
    assert ev.ngram_f1("the the the", "the cat", 1) == pytest.approx(2 / 5)
    # Bigrams: cand {the the: 2}, ref {the cat}: no overlap.
    assert ev.ngram_f1("the the the", "the cat", 2) == 0.0


def test_ngram_f1_is_not_measurable_when_a_side_has_fewer_than_n_words():
    # No n-gram on a side is nothing to compare, not a miss: None ("n/a"), never 0.
    assert ev.ngram_f1("", "the cat", 1) is None
    assert ev.ngram_f1("the cat", "", 1) is None
    assert ev.ngram_f1("", "", 1) is None
    assert ev.ngram_f1("!!! ...", "!!!", 1) is None  # punctuation only: no tokens
    assert ev.ngram_f1("the cat", "the cat", 3) is None  # fewer than n tokens: no 3-grams
    assert ev.ngram_f1("the cat sat", "a dog ran", 3) == 0.0  # both have one: no overlap
    with pytest.raises(ValueError):
        ev.ngram_f1("a", "a", 0)


def test_ngram_f1_all():
    # A file compared with itself: three words have no 4-gram, which is n/a, not F1 = 0.
    scores = ev.ngram_f1_all("the cat sat", "the cat sat")
    assert scores == {1: 1.0, 2: 1.0, 3: 1.0, 4: None}


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens;
    # P = R = 5/6 -> F = 5/6.
    assert ev.rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = "a c" = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = (2/3)/(7/6) = 4/7.
    assert ev.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # Argument order matters for P vs R but F is symmetric.
    assert ev.rouge_l("a c e", "a b c d") == pytest.approx(4 / 7)


def test_rouge_l_without_tokens_is_not_measurable():
    assert ev.rouge_l("", "the cat") is None
    assert ev.rouge_l("the cat", "") is None
    assert ev.rouge_l("", "") is None
    assert ev.rouge_l("кошка", "the cat") is None  # rouge-score tokenises ASCII only
    assert ev.rouge_l("dog", "the cat") == 0.0


# ---------------------------------------------------------------- length stats, bootstrap


def test_length_stats_by_hand():
    stats = ev.length_stats([10, 100, 30, 20, 40], [False, True, False, False, False])
    assert stats["count"] == 5
    assert stats["mean"] == pytest.approx(40.0)  # 200 / 5
    assert stats["median"] == 30.0
    # Linear percentile on sorted [10, 20, 30, 40, 100]: rank 0.95 * 4 = 3.8,
    # 40 + 0.8 * (100 - 40) = 88.
    assert stats["p95"] == pytest.approx(88.0)
    assert stats["truncated_share"] == pytest.approx(0.2)


def test_length_stats_empty_and_mismatch():
    assert ev.length_stats([], [])["count"] == 0
    assert ev.length_stats([], [])["mean"] is None
    with pytest.raises(ValueError):
        ev.length_stats([1, 2], [True])


def test_bootstrap_ci_contains_mean_shrinks_and_is_deterministic():
    small = [float(i % 7) for i in range(20)]
    large = [float(i % 7) for i in range(2000)]
    mean, low, high = ev.bootstrap_ci(small, reps=500, seed=1)
    assert mean == pytest.approx(sum(small) / len(small))
    assert low < mean < high
    big_mean, big_low, big_high = ev.bootstrap_ci(large, reps=500, seed=1)
    assert big_low < big_mean < big_high
    assert (big_high - big_low) < 0.5 * (high - low)  # width ~ 1/sqrt(n): 10x less here
    assert ev.bootstrap_ci(small, reps=500, seed=1) == (mean, low, high)
    assert ev.bootstrap_ci(small, reps=500, seed=2) != (mean, low, high)
    assert ev.bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        ev.bootstrap_ci([])


# ---------------------------------------------------------------- compare_to_teacher


def _rec(record_id: str, answer: str | None, prompt_id: str | None = None) -> Record:
    messages = [{"role": "user", "content": "q"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return Record(record_id, messages, {"prompt_id": prompt_id} if prompt_id else {})


def test_compare_to_teacher_matches_by_prompt_id_and_reports_unmatched():
    teacher = [_rec("p1", "the cat sat"), _rec("p2", "hello world"), _rec("p3", "unused")]
    student = [
        _rec("s1", "the cat sat", prompt_id="p1"),  # n <= 3: 1 (1 trigram, no 4-gram: n/a)
        _rec("s2", "goodbye world", prompt_id="p2"),  # unigram F1 1/2, ROUGE-L 1/2, bigram 0
        _rec("p2", "hello world"),  # no meta: matched by its id; n=1,2: 1, n>=3: n/a
        _rec("s9", "orphan", prompt_id="p9"),  # no teacher for p9
    ]
    out = ev.compare_to_teacher(student, teacher)
    assert out["matched"] == 3
    assert out["rouge_l"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["ngram_f1"][1] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["ngram_f1"][2] == pytest.approx((1 + 0 + 1) / 3)
    assert out["ngram_f1"][3] == 1.0 and len(out["ngram_f1_values"][3]) == 1
    assert out["ngram_f1"][4] is None and out["ngram_f1_values"][4] == []
    assert out["unmatched_student"] == ["s9"]
    assert out["unmatched_teacher"] == ["p3"]
    assert out["no_response"] == []


def test_compare_to_teacher_missing_responses_and_duplicates():
    out = ev.compare_to_teacher([_rec("s1", None, prompt_id="p1")], [_rec("p1", "x")])
    assert out["matched"] == 0 and out["rouge_l"] is None
    assert out["no_response"] == ["student:s1"]
    assert out["unmatched_teacher"] == []
    with pytest.raises(ValueError, match="share prompt id"):
        ev.compare_to_teacher([], [_rec("a", "x", prompt_id="p"), _rec("b", "y", prompt_id="p")])


# ---------------------------------------------------------------- lab metrics


PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny random models (seeds 0 and 1) and 16 temperature-1 samples from the first."""
    root = tmp_path_factory.mktemp("tiny")
    a = load(build_tiny(root / "a", seed=0), device="cpu")
    b = load(build_tiny(root / "b", seed=1), device="cpu")
    for m, _ in (a, b):
        # Random init gives near-uniform next-token distributions (logit std ~0.16, so every
        # log-prob is ~ -log 512), which buries the effects tested below in sampling noise.
        # Scaling the final norm scales the logits (temperature 1/8): peaked, like a trained LM.
        with torch.no_grad():
            m.model.norm.weight.mul_(8.0)
    model, tok = a
    rollout = TransformersRollout(model, tok, batch_size=16, eos_id=end_of_turn_id(tok))
    comps = rollout.generate(
        [encode_prompt(tok, p) for p in PROMPTS],
        8,
        Sampling(temperature=1.0, top_p=1.0, max_response_tokens=8),
        seeds=[0, 1],
    )
    prompts = [p for p, group in zip(PROMPTS, comps, strict=True) for _ in group]
    samples = [c.text for group in comps for c in group]
    return a, b, prompts, samples


def test_sequence_logprob_matches_unbatched_forward(tiny):
    (model, tok), _, prompts, samples = tiny
    got = ev.sequence_logprob(model, tok, prompts[:3], samples[:3])
    # Batching with right padding must not change anything: batch of 1 == batch of 3.
    one = ev.sequence_logprob(model, tok, prompts[:3], samples[:3], batch_size=1)
    assert got == pytest.approx(one, abs=1e-4)
    # Independent reference: full log-softmax on the unpadded sequence.
    p_ids = encode_prompt(tok, prompts[0])
    r_ids = encode_response(tok, prompts[0], samples[0])
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + r_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(r_ids))
    assert got[0] == pytest.approx(want, abs=1e-4)
    # teacher_logprob is the per-token mean of the same log-probs.
    mean = ev.teacher_logprob(model, tok, prompts[:1], samples[:1])[0]
    assert mean == pytest.approx(want / len(r_ids), abs=1e-5)


def test_reverse_kl_of_model_against_itself_is_zero(tiny):
    (model, tok), _, prompts, samples = tiny
    out = ev.reverse_kl_estimate(model, tok, model, tok, prompts, samples)
    assert out["n"] == 16
    assert abs(out["mean"]) < 1e-4
    assert abs(out["per_token"]) < 1e-4


def test_reverse_kl_against_other_model_is_positive(tiny):
    (s_model, s_tok), (t_model, t_tok), prompts, samples = tiny
    out = ev.reverse_kl_estimate(s_model, s_tok, t_model, t_tok, prompts, samples)
    assert out["n"] == 16
    # KL >= 0; with these seeds the estimate is several standard errors above 0.
    assert out["mean"] > 2 * out["stderr"] > 0
    assert out["per_token"] > 0 and out["per_char"] > 0
    assert math.isfinite(out["stderr"])


def test_teacher_prefers_its_own_samples_to_random_tokens(tiny):
    (teacher, tok), _, prompts, samples = tiny  # model "a" is the teacher of its own samples
    gen = torch.Generator().manual_seed(0)
    n_regular = len(tok) - 3  # the tiny vocabulary puts its 3 special tokens last
    random_texts = [
        tok.decode(torch.randint(0, n_regular, (8,), generator=gen).tolist()) for _ in samples
    ]
    own = ev.teacher_logprob(teacher, tok, prompts, samples, batch_size=8)
    rand = ev.teacher_logprob(teacher, tok, prompts, random_texts, batch_size=8)
    assert len(own) == len(rand) == 16
    assert sum(own) / len(own) > sum(rand) / len(rand)


def test_lab_metrics_reject_mismatched_lengths(tiny):
    (model, tok), _, prompts, samples = tiny
    with pytest.raises(ValueError):
        ev.sequence_logprob(model, tok, prompts[:2], samples[:1])
