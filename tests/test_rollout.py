"""The rollout's own decode loop: greedy equals transformers' `generate`, and the sampler draws
from the softmax at the temperature, cut to the nucleus."""

import torch

from gad.data import chats
from gad.models import store
from gad.train.rollout import Sampling, TransformersRollout, decode, sample_next


def test_greedy_decode_equals_transformers_generate(tiny_dir):
    model, tokenizer = store.load(str(tiny_dir))
    questions = ["Hi", "What is the capital of France? Tell me in a few words.", "2 + 2?"]
    prompts = [chats.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    eos = chats.end_of_turn_id(tokenizer)
    ours = decode(model, ids, mask, Sampling(0.0, 1.0, 12), eos, tokenizer.pad_token_id)
    theirs = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )[:, width:]
    assert torch.equal(ours[:, : theirs.size(1)], theirs)
    # The rollout cuts at end-of-turn and names the finish.
    rollout = TransformersRollout(model, tokenizer, batch_size=2)
    for group, row in zip(
        rollout.generate(prompts, 1, Sampling(0.0, 1.0, 12)), theirs, strict=True
    ):
        completion = group[0]
        n = len(completion.token_ids)
        assert completion.token_ids == row[:n].tolist()
        assert completion.finish_reason == ("stop" if completion.token_ids[-1] == eos else "length")


def test_sampler_draws_the_tempered_softmax_and_its_nucleus():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    draws = 40_000
    for temperature in (1.0, 0.5):
        picks = sample_next(logits.expand(draws, -1), Sampling(temperature, 1.0, 1))
        freq = torch.bincount(picks, minlength=5).float() / draws
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        assert torch.allclose(freq, expected, atol=0.01), (temperature, freq, expected)
    # top_p = 0.8: the smallest set of top tokens with mass >= 0.8, renormalised.
    probs = torch.softmax(logits[0], dim=-1)  # 0.47, 0.17, 0.06, 0.02, 0.29 (approx.)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    kept = order[mass_before < 0.8]
    nucleus = torch.zeros(5)
    nucleus[kept] = probs[kept] / probs[kept].sum()
    picks = sample_next(logits.expand(draws, -1), Sampling(1.0, 0.8, 1))
    freq = torch.bincount(picks, minlength=5).float() / draws
    assert set(picks.unique().tolist()) == set(kept.tolist())
    assert torch.allclose(freq, nucleus, atol=0.01)
    # Greedy: the argmax, no randomness.
    assert sample_next(logits, Sampling(0.0, 1.0, 1)).item() == 0
