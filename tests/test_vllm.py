"""The vLLM engine (`engine: vllm`), run for real: these tests need vLLM, which lives in its own
environment (`make setup-vllm`: vLLM's CPU build pins transformers < 5.20); `make test` runs
them there. In an environment without vLLM they are skipped, saying so.
"""

from __future__ import annotations

import os

import pytest
import torch

from gad.data import chats
from gad.models import store
from gad.train import engines, vllm_rollout
from gad.train.rollout import Sampling, TransformersRollout

pytestmark = pytest.mark.skipif(
    not vllm_rollout.available(),
    reason="vLLM is not installed here: `make test` runs these in .venv-vllm",
)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUESTIONS = ["Hi", "What is the capital of France? Tell me in a few words.", "2 + 2?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random-init Llama whose head size (32) the CPU build's attention accepts."""
    return store.build_tiny(tmp_path_factory.mktemp("vllm") / "m", seed=0, hidden_size=128)


def prompts_of(tokenizer):
    return [chats.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def test_greedy_decoding_matches_the_transformers_loop_ids_text_and_finish(folder):
    model, tokenizer = store.load(str(folder))
    eot = chats.end_of_turn_id(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = vllm_rollout.VLLMRollout(folder, tokenizer, policy=model, optimizer=optimizer)
    ours = TransformersRollout(model, tokenizer, batch_size=4)
    prompts, greedy = prompts_of(tokenizer), Sampling(0.0, 1.0, 12)
    assert engine.generate(prompts, 1, greedy) == ours.generate(prompts, 1, greedy)
    # An optimizer step whose update makes it the likeliest next token everywhere (its row
    # becomes the top token's, doubled): the engine pushes before it generates again.
    row = model.get_output_embeddings().weight
    row.grad = torch.zeros_like(row)
    with torch.no_grad():
        row.grad[eot] = row[eot] - 2 * row[198]
    optimizer.step()
    got = engine.generate(prompts, 1, greedy)
    assert engine.pushes == 1
    # Both engines now stop at once, the end-of-turn id kept, finish reason "stop".
    assert got == ours.generate(prompts, 1, greedy)
    assert all(g[0].token_ids[-1] == eot and g[0].finish_reason == "stop" for g in got)
    engine.close()


def test_seeded_samples_depend_only_on_their_seed(folder):
    model, tokenizer = store.load(str(folder))
    engine = vllm_rollout.VLLMRollout(folder, tokenizer)
    prompts, warm = prompts_of(tokenizer), Sampling(1.0, 1.0, 8)
    both = engine.generate(prompts, 3, warm, seeds=[11, 22, 33])
    alone = engine.generate(prompts[1:2], 3, warm, seeds=[22])
    assert both[1] == alone[0]
    assert all(len(g) == 3 for g in both)
    assert all(c.finish_reason in ("stop", "length") for g in both for c in g)
    engine.close()


def test_an_explicit_vllm_that_cannot_run_is_a_named_error(monkeypatch):
    with pytest.raises(vllm_rollout.EngineError, match="lora_rank > 0"):
        engines.choose("vllm", torch.device("cpu"), lora=True)
    assert engines.choose("auto", torch.device("cpu"), lora=False)[0] == "transformers"
    assert engines.choose("vllm", torch.device("cpu"), lora=False)[0] == "vllm"
    monkeypatch.setattr(engines, "available", lambda: False)
    with pytest.raises(vllm_rollout.EngineError, match="make setup-vllm"):
        engines.choose("vllm", torch.device("cpu"), lora=False)


def gad_run(folder, data, out, **overrides):
    from test_gad import gad_values

    from gad.config import load as cfg
    from gad.methods import stage as gad_stage

    values = gad_values(folder, data, out, per_prompt_seeds=True, **overrides)
    return gad_stage.train(cfg.build(cfg.GADConfig, values, "test"))


def test_a_gad_run_on_vllm_logs_the_same_phases_and_resumes_to_the_same_samples(folder, tmp_path):
    from test_gad import WORDS

    from gad.core.tracking import read_metrics

    data = tmp_path / "teacher.jsonl"
    chats.write_records(
        data,
        [
            chats.Record(f"q{i}", [{"role": "user", "content": f"Question {i}?"},
                                   {"role": "assistant", "content": WORDS[i % len(WORDS)] + "."}])
            for i in range(16)
        ],
    )  # fmt: skip
    gad_run(folder, data, tmp_path / "ours", engine="transformers")
    gad_run(folder, data, tmp_path / "full", engine="vllm")
    gad_run(folder, data, tmp_path / "half", engine="vllm", max_steps=2)
    gad_run(folder, data, tmp_path / "half", engine="vllm", resume=True)
    ours, full, resumed = (read_metrics(tmp_path / r / "gad") for r in ("ours", "full", "half"))
    assert [sorted(r) for r in full] == [sorted(r) for r in ours]  # the same phases and metrics
    assert len(full) == len(resumed) == 4
    # Seeded per prompt, the resumed run's samples are the uninterrupted run's.
    for key in ("tokens/generated", "g/response_length_mean"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in full], key


def test_a_local_collection_on_vllm_is_exactly_once(folder, tmp_path):
    from test_collect import write_prompts

    from gad.api import teacher
    from gad.config import load as cfg

    write_prompts(tmp_path / "prompts.jsonl", 5)
    config = cfg.CollectConfig(
        prompts=str(tmp_path / "prompts.jsonl"),
        output=str(tmp_path / "out.jsonl"),
        backend="local",
        model=str(folder),
        engine="vllm",
        n=2,
        max_response_tokens=8,
    )
    first = teacher.collect(config, progress=False)
    records = chats.read_records(tmp_path / "out.jsonl").records
    assert first.done == 10 and len(records) == 10
    assert {r.meta["finish_reason"] for r in records} <= {"stop", "length"}
    again = teacher.collect(config, progress=False)  # rerun: everything is already there
    assert again.done == 0 and again.already_done == 10
    assert len(chats.read_records(tmp_path / "out.jsonl").records) == 10
