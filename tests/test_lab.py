"""benchmarks/lab.py (lab v2): the exact KL against hand-computed values, the --tiny path end to
end, its JSON, and the refusal to reuse an earlier run's folder."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gad import data, models

LAB_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "lab.py"


def _load_lab():
    spec = importlib.util.spec_from_file_location("lab_v2", LAB_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lab_v2"] = module
    spec.loader.exec_module(module)
    return module


lab = _load_lab()


class Bigram(torch.nn.Module):
    """Logits depend on the current token only, plus `bias` once `marker` has been seen in the
    row: a model whose every next-token distribution we can write down by hand."""

    def __init__(self, table: torch.Tensor, marker: int = -1, bias: torch.Tensor | None = None):
        super().__init__()
        self.table, self.marker = table, marker
        self.bias = torch.zeros(table.size(1)) if bias is None else bias

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        seen = (input_ids == self.marker).cumsum(dim=1).clamp(max=1).float()
        logits = self.table[input_ids] + seen[..., None] * self.bias
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def _hand_kl(q, p, q_ids, p_ids, q_start, p_start, n):
    """Σ over response positions of KL(q||p), one position at a time, no batching."""
    total, logp = 0.0, 0.0
    for j in range(n):
        qi, pi = q_ids[: q_start + j], p_ids[: p_start + j]
        lq = torch.log_softmax(q(torch.tensor([qi]), None, None, 1).logits[0, -1], -1)
        lp = torch.log_softmax(p(torch.tensor([pi]), None, None, 1).logits[0, -1], -1)
        total += float((lq.exp() * (lq - lp)).sum())
        logp += float(lp[p_ids[p_start + j]])
    return total, logp


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return models.load_tokenizer(models.build_tiny(tmp_path_factory.mktemp("tiny"), seed=3))


def test_exact_token_kl_matches_hand_computed_values_with_a_hidden_context(tokenizer):
    vocab = len(tokenizer)
    gen = torch.Generator().manual_seed(0)
    context = [{"role": "system", "content": "hidden words"}]
    prompt = [{"role": "user", "content": "hello there"}]
    records = [
        data.Record("a", prompt + [{"role": "assistant", "content": "a b c"}], {}),
        # Cut at its limit: no end-of-turn position is scored.
        data.Record(
            "b",
            prompt + [{"role": "assistant", "content": "b c"}],
            {"finish_reason": "length"},
        ),
    ]
    plain = set(data.encode_prompt(tokenizer, prompt))
    for r in records:
        plain |= set(data.encode_response(tokenizer, r.prompt, r.response))
    only_in_context = set(data.encode_prompt(tokenizer, context + prompt)) - plain
    assert only_in_context, "the test needs a token that only the hidden context has"
    marker = min(only_in_context)
    q = Bigram(torch.randn(vocab, vocab, generator=gen))
    p = Bigram(
        torch.randn(vocab, vocab, generator=gen), marker, 3 * torch.randn(vocab, generator=gen)
    )

    got = lab.exact_token_kl(q, p, tokenizer, records, p_context=context)

    kl, logp, tokens = 0.0, 0.0, 0
    eot = data.end_of_turn_id(tokenizer)
    for r in records:
        response = data.encode_response(tokenizer, r.prompt, r.response)
        if r.meta.get("finish_reason") == "length":
            assert response[-1] == eot
            response = response[:-1]
        q_prompt = data.encode_prompt(tokenizer, r.prompt)
        p_prompt = data.encode_prompt(tokenizer, context + r.prompt)
        k, lp = _hand_kl(
            q,
            p,
            q_prompt + response,
            p_prompt + response,
            len(q_prompt),
            len(p_prompt),
            len(response),
        )
        kl, logp, tokens = kl + k, logp + lp, tokens + len(response)
    assert got["kl"] == pytest.approx(kl / tokens, rel=1e-4)
    assert got["p_logp"] == pytest.approx(logp / tokens, rel=1e-4)
    assert got["tokens"] == tokens / len(records)
    # The context reaches the p side only: without it the marker's bias never applies.
    without = lab.exact_token_kl(q, p, tokenizer, records)
    assert not math.isclose(without["kl"], got["kl"], rel_tol=1e-3)
    # KL of a model against itself is zero.
    assert lab.exact_token_kl(q, q, tokenizer, records)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_tiny_lab_end_to_end_writes_per_seed_json_and_refuses_a_used_out(tmp_path, capsys):
    out = tmp_path / "lab"
    results = lab.main(["--tiny", "--out", str(out), "--seeds", "0"])

    written = json.loads((out / "lab-v2.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written) == {"context", "cross-tokenizer"}
    context = written["context"]
    for method in ("before", "seqkd", "gad", "gad_equal_exposure", "whitebox", "gad_long"):
        assert method in context, method
    for method in lab.STABILISERS:
        assert method in context, method
    assert "whitebox" not in written["cross-tokenizer"]
    # The budget runs SeqKD and GAD only in the cross-tokenizer setting (--cross-methods).
    assert set(written["cross-tokenizer"]) == {"before", "seqkd", "gad"}
    for by_method in written.values():
        for rows in by_method.values():
            assert isinstance(rows, list) and [r["seed"] for r in rows] == [0]
            for key in lab.METRICS:
                assert isinstance(rows[0][key], float), key
    # The gap share is 0 for SeqKD and 1 for the ceiling by definition.
    assert context["seqkd"][0]["gap_closed"] == pytest.approx(0.0)
    assert context["whitebox"][0]["gap_closed"] == pytest.approx(1.0)
    run = json.loads((out / "run.json").read_text())
    assert run["context"] == json.loads(lab.CONTEXT_FILE.read_text())
    assert "| seqkd |" in (out / "table.md").read_text()

    with pytest.raises(SystemExit, match="not empty"):
        lab.main(["--tiny", "--out", str(out), "--seeds", "0"])


def test_a_method_whose_config_field_is_missing_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(lab.NEEDS, "gad", ("no_such_field",))
    with pytest.raises(SystemExit, match="gad needs no_such_field"):
        lab.main(["--tiny", "--out", str(tmp_path / "x"), "--methods", "seqkd", "gad"])
    assert not any((tmp_path / "x").iterdir())
