"""A teacher that mixes hidden contexts: its exact probabilities against brute force."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from gad.config import load as cfg
from gad.models import mixture

VOCAB, LENGTH = 4, 3
# Two hidden contexts of a purpose-built model: different prefixes before the same answer.
CONTEXTS = ([0, 1], [2, 3, 3])


@pytest.fixture(scope="module")
def small_lm():
    """A random-init Llama with a 4-token vocabulary: every answer of 3 tokens can be listed
    (the built-in `tiny` refuses vocabularies this small)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions: contexts that differ
    return model


def next_logp(model, context, answer):
    """[len(answer)+1, V] the model's next-token log-probs after context + answer[:t]."""
    ids = torch.tensor([context + list(answer)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1 :]
    return torch.log_softmax(logits.double(), -1)


def seq_logp(model, context, answer):
    logp = next_logp(model, context, answer)
    return sum(float(logp[t, y]) for t, y in enumerate(answer))


def test_next_token_distribution_equals_brute_force_enumeration(small_lm):
    weights = [0.3, 0.7]
    log_w = torch.tensor([math.log(w) for w in weights], dtype=torch.float64)
    # The mixture's probability of every answer of LENGTH tokens, enumerated.
    joint = {
        y: sum(
            w * math.exp(seq_logp(small_lm, c, y)) for w, c in zip(weights, CONTEXTS, strict=True)
        )
        for y in itertools.product(range(VOCAB), repeat=LENGTH)
    }
    assert sum(joint.values()) == pytest.approx(1.0)

    def marginal(prefix):
        return sum(p for y, p in joint.items() if y[: len(prefix)] == prefix)

    for answer in [(0, 1, 2), (3, 3, 0), (2, 0, 1)]:
        logp_ktv = torch.stack([next_logp(small_lm, c, answer)[:LENGTH] for c in CONTEXTS])
        got_tv = mixture.next_token_logprobs(logp_ktv, torch.tensor(answer), log_w)
        for t in range(LENGTH):
            for v in range(VOCAB):
                prefix = answer[:t]
                want = marginal(prefix + (v,)) / marginal(prefix)
                assert math.exp(float(got_tv[t, v])) == pytest.approx(want, rel=1e-9)
        # The sampled tokens' log-probs alone (the white-box reward) agree with the rows.
        token_kt = logp_ktv.gather(-1, torch.tensor(answer).expand(2, -1)[..., None])[..., 0]
        tokens = mixture.token_logprobs(token_kt, log_w)
        assert torch.allclose(tokens, got_tv[torch.arange(LENGTH), list(answer)])
        # Their sum telescopes to log(w1 p1(y) + w2 p2(y)).
        assert float(tokens.sum()) == pytest.approx(math.log(joint[answer]), abs=1e-9)


def test_an_even_mixture_sequence_logprob_is_log_of_the_mean(small_lm):
    answer = (1, 2, 3)
    p1, p2 = (math.exp(seq_logp(small_lm, c, answer)) for c in CONTEXTS)
    token_kt = torch.tensor(
        [
            [float(next_logp(small_lm, c, answer)[t, y]) for t, y in enumerate(answer)]
            for c in CONTEXTS
        ],
        dtype=torch.float64,
    )
    log_w = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert float(mixture.token_logprobs(token_kt, log_w).sum()) == pytest.approx(
        math.log(0.5 * p1 + 0.5 * p2), abs=1e-9
    )
    # Before the first token the posterior is the prior; after the answer it favours the
    # context that explains it better.
    post = mixture.posterior(token_kt, log_w).exp()
    assert post[:, 0].tolist() == pytest.approx([0.5, 0.5])


def test_one_context_is_the_mixture_of_one():
    token_kt = torch.tensor([[-0.5, -1.25, -2.0]])
    got = mixture.token_logprobs(token_kt, torch.zeros(1, dtype=torch.float64))
    assert got.tolist() == [-0.5, -1.25, -2.0]


def test_context_files(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(msgs))
    assert mixture.load(str(single)) == [mixture.Component(1.0, msgs)]
    assert mixture.load(None) == [mixture.Component(1.0, [])]
    mix = tmp_path / "mix.json"
    other = [{"role": "system", "content": "Talk like a pirate."}]
    parts = [{"weight": 1, "messages": msgs}, {"weight": 3, "messages": other}]
    mix.write_text(json.dumps({"mixture": parts}))
    assert mixture.load(str(mix)) == [
        mixture.Component(0.25, msgs),
        mixture.Component(0.75, other),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mixture": [{"weight": 0, "messages": msgs}, parts[1]]}))
    with pytest.raises(cfg.ConfigError, match=r"mixture\[0\]: 'weight' must be a positive"):
        mixture.load(str(bad))
    bad.write_text(json.dumps({"mixture": [parts[0], {"weight": 1, "messages": "hi"}]}))
    with pytest.raises(cfg.ConfigError, match=r"mixture\[1\] must hold a JSON list"):
        mixture.load(str(bad))
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        mixture.load(str(tmp_path / "missing.json"))


def test_whitebox_trains_against_a_mixture_teacher(tiny_dir, tmp_path):
    """The product's white-box ceiling takes a mixture file: the reward is the mixture's exact
    log-prob, and a mixture of two identical contexts is that context (same run, bit for bit)."""
    from gad.core.tracking import read_metrics
    from gad.data import chats
    from gad.methods import stage as gad_stage

    records = [
        chats.Record(f"q{i}", [{"role": "user", "content": f"Question {i}?"}], {}) for i in range(8)
    ]
    answered = [
        chats.Record(r.id, r.prompt + [{"role": "assistant", "content": "Yes."}], {})
        for r in records
    ]
    chats.write_records(tmp_path / "train.jsonl", answered[:6])
    chats.write_records(tmp_path / "held.jsonl", answered[6:])
    msgs = [{"role": "system", "content": "Be brief."}]
    (tmp_path / "one.json").write_text(json.dumps(msgs))
    twice = {"mixture": [{"weight": 1, "messages": msgs}, {"weight": 2, "messages": msgs}]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    rows = {}
    for name in ("one", "twice"):
        config = cfg.GADConfig(
            data=str(tmp_path / "train.jsonl"),
            model=str(tiny_dir),
            method="whitebox",
            teacher_model=str(tiny_dir),
            teacher_context=str(tmp_path / f"{name}.json"),
            output_dir=str(tmp_path / name),
            stage="gad",
            batch_prompts=2,
            n_samples=2,
            max_response_tokens=6,
            epochs=1.0,
            max_steps=2,
            lr=1e-3,
            mixed_precision="no",
            save_every=0,
            save_state=False,
            eval_every=2,
            eval_data=str(tmp_path / "held.jsonl"),
        )
        gad_stage.train(config)
        rows[name] = read_metrics(tmp_path / name / "gad")
    pick = ("g/teacher_kl", "g/loss", "eval/reverse_kl")
    got = [r.get(k, math.nan) for r in rows["twice"] for k in pick]
    want = [r.get(k, math.nan) for r in rows["one"] for k in pick]
    assert len(got) == 9 and not any(math.isnan(x) for x in got[-3:])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)


def test_a_shared_prefix_cache_gives_the_full_passes_numbers(tiny_dir):
    """The white-box teacher reads its context once per call (`engine.SharedPrefix`): the
    log-probs equal full passes over context + prompt + answer, whatever the prompts' and
    answers' lengths in one padded batch."""
    from gad.data import chats
    from gad.models import store
    from gad.train import engine

    model, tokenizer = store.load(str(tiny_dir))
    context = [{"role": "system", "content": "A hidden context, long enough to be worth a cache."}]
    questions = ("hi", "a much longer question than the first one", "third?")
    prompts = [
        chats.encode_prompt(tokenizer, context + [{"role": "user", "content": q}])
        for q in questions
    ]
    answers = ([5, 6, 7, 8, 9], [10], [11, 12, 13])
    examples = [
        chats.Example(str(i), p + list(a), len(p), False)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    prefix = engine.SharedPrefix(model, prompts)
    assert prefix.cache is not None and prefix.length >= 16
    parts = [[0, 1, 2], [2, 0]]
    cached = engine.logprobs(model, examples, engine.pad_id_of(tokenizer), parts, 0.8, prefix)
    full = engine.logprobs(model, examples, engine.pad_id_of(tokenizer), parts, 0.8)
    for a, b, answer in zip(cached, full, answers, strict=True):
        assert a.shape == b.shape == (len(answer),)
        assert torch.allclose(a, b, atol=1e-5)
    # Prompts that share too little: plain full passes.
    assert engine.SharedPrefix(model, [[1, 2, 3], [1, 2, 4]]).cache is None
