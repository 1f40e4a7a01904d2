import json

import pytest
import torch

from gad.config import load as cfg
from gad.models import lora_roles, precision
from gad.train import sft


def test_auto_on_cpu_follows_the_probe():
    slow = precision.resolve("auto", cpu_ratio=lambda dtype: 98.0, gpu=None)
    fast = precision.resolve("auto", cpu_ratio=lambda dtype: 0.3, gpu=None)
    assert slow.mixed_precision == "no" and "98.0x" in slow.reason and slow.warning is None
    assert fast.mixed_precision == "bf16" and "0.30x" in fast.reason


def test_no_never_runs_the_probe():
    def probe(dtype):
        raise AssertionError("probed")

    assert precision.resolve("no", cpu_ratio=probe).mixed_precision == "no"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "no")],
)
def test_auto_on_gpu_follows_the_compute_capability(capability, expected):
    def probe(dtype):
        raise AssertionError("a GPU run must not time the CPU")

    choice = precision.resolve("auto", cpu_ratio=probe, gpu=(capability, "GPU"))
    assert choice.mixed_precision == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def test_explicit_bf16_on_an_old_gpu_is_honoured_with_a_warning():
    choice = precision.resolve("bf16", gpu=((7, 5), "T4"))
    assert choice.mixed_precision == "bf16" and "no bf16 tensor cores" in choice.warning


def test_explicit_bf16_on_a_slow_cpu_runs_and_warns(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cached_cpu_ratio", lambda dtype: 97.0)
    records = tmp_path / "train.jsonl"
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    records.write_text(json.dumps({"messages": messages}) + "\n")
    config = cfg.SFTConfig(
        data=str(records),
        model=str(tiny_dir),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        micro_batch_size=1,
        mixed_precision="bf16",
        save_state=False,
    )
    assert (sft.train(config) / "model.safetensors").exists()
    err = capsys.readouterr().err
    assert "mixed precision: bf16" in err
    assert "measured 97.0x slower than float32" in " ".join(err.split())
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "mixed_precision: bf16" in saved and "# resolved: bf16: asked for" in saved


def test_auto_is_resolved_in_the_saved_config(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cached_cpu_ratio", lambda dtype: 50.0)
    records = tmp_path / "train.jsonl"
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    records.write_text(json.dumps({"messages": messages}) + "\n")
    config = cfg.SFTConfig(
        data=str(records), model=str(tiny_dir), output_dir=str(tmp_path / "run"), epochs=1
    )
    assert config.mixed_precision == "auto"
    sft.train(dataclass_replace(config, save_state=False))
    saved = cfg.load(cfg.SFTConfig, tmp_path / "run" / "config.yaml")
    assert saved.mixed_precision == "no"
    assert (
        "# resolved: auto: a bf16 matmul took 50.0x"
        in (tmp_path / "run" / "config.yaml").read_text()
    )


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_the_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GAD_CACHE", str(tmp_path))
    calls = []
    real = precision.measure_cpu_ratio

    def counting(dtype="bf16", reps=5):
        calls.append(dtype)
        return real(dtype, reps=2)

    monkeypatch.setattr(precision, "measure_cpu_ratio", counting)
    first = precision.cached_cpu_ratio("bf16")
    second = precision.cached_cpu_ratio("bf16")
    assert first == second > 0 and calls == ["bf16"]
    assert list(json.loads((tmp_path / "precision-probe.json").read_text()).values()) == [first]


def test_machine_names_what_a_figure_depends_on():
    info = precision.machine()
    assert {"cpu", "cpu_flags", "torch_cpu_capability", "threads", "torch"} <= set(info)
    assert set(info["cpu_flags"]) <= set(precision.CPU_FLAGS)


def test_casting_weights_once_is_bit_for_bit_autocast(tiny_dir):
    """The rollout's fast path (bf16 weights cast once per generate) samples exactly what
    autocast's per-call casts sample; a LoRA view's (its adapter merged for the rollout) gives
    the same logits up to float rounding."""
    from gad.config import load as cfg
    from gad.data import chats
    from gad.models import store
    from gad.train.rollout import Sampling, TransformersRollout

    model, tokenizer = store.load(str(tiny_dir))
    forward = model.forward

    def autocast_forward(*args, **kwargs):  # what accelerate's prepare does with bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    prompts = [chats.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in "ab"]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with precision.cast_weights_once(model, torch.bfloat16):
            fast = model(input_ids=ids).logits
    assert torch.equal(plain, fast)
    samples = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        rollout = TransformersRollout(model, tokenizer, batch_size=4, autocast_dtype=dtype)
        groups = rollout.generate(prompts, 2, Sampling(1.0, 1.0, 12))
        samples.append([c.token_ids for g in groups for c in g])
    assert samples[0] == samples[1]
    # Outside autocast the layers run as usual (no dtype mismatch).
    plain_model, _ = store.load(str(tiny_dir))
    with torch.no_grad(), precision.cast_weights_once(plain_model, torch.bfloat16):
        assert plain_model(input_ids=ids).logits.dtype == torch.float32

    adapters, _ = lora_roles.base_adapters(str(tiny_dir))
    view = lora_roles.policy(adapters, cfg.GADConfig(lora_rank=4), None)
    with torch.no_grad():
        for _, p in adapters.named_parameters("policy"):
            p.add_(0.05)  # a non-zero adapter
        unmerged = view(input_ids=ids).logits
        with view.rollout_weights(None):
            merged = view(input_ids=ids).logits
        assert torch.allclose(unmerged, merged, atol=1e-5)
        adapters.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        unmerged = view(input_ids=ids).logits.float()
        with view.rollout_weights(torch.bfloat16):
            merged = view(input_ids=ids).logits.float()
        assert (unmerged - merged).abs().max() < 0.1 * unmerged.abs().max()
    # The rollout undoes its patches: the adapter's own path is back.
    with torch.no_grad():
        assert torch.equal(view(input_ids=ids).logits.float(), unmerged)


def test_training_attention_is_float32_sdpa_under_grad_and_plain_sdpa_otherwise(tiny_dir, tmp_path):
    """Our `sdpa` (store.load gives it) computes a CPU bf16 training forward's attention in
    float32 and is transformers' `sdpa` everywhere else: no-grad logits are bit for bit plain
    sdpa's, a training forward's gradients are closer to a float32 run than plain sdpa's, and
    the saved folder does not name it."""
    from transformers import AutoModelForCausalLM

    from gad.models import store

    ours, _ = store.load(str(tiny_dir))
    assert ours.config._attn_implementation == precision.TRAINING_ATTENTION
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa")
    ours.train(), plain.train()
    torch.manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding: an explicit mask
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(
            ours(input_ids=ids, attention_mask=mask).logits,
            plain(input_ids=ids, attention_mask=mask).logits,
        )

    def grads(model, bf16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float().log_softmax(-1)[..., 0] * mask).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    reference = grads(plain, bf16=False)
    ours_bt, plain_bt = grads(ours, bf16=True), grads(plain, bf16=True)
    assert not torch.equal(ours_bt, plain_bt)  # the float32 path ran
    assert (ours_bt - reference).norm() < (plain_bt - reference).norm()
    assert torch.allclose(ours_bt, reference, rtol=0.1, atol=0.1 * reference.abs().max())
    ours.save_pretrained(tmp_path / "saved")
    assert precision.TRAINING_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()


def test_frozen_passes_cast_weights_once_with_the_same_numbers(tiny_dir, monkeypatch):
    """A no-grad pass over several micro-batches (reference log-probs, frozen scores) casts the
    weights once on a CPU under autocast, and gives what per-micro-batch casts give, bit for bit."""
    import contextlib

    from gad.config import load as cfg
    from gad.data import chats
    from gad.models import discriminator, store
    from gad.train import engine

    model, tokenizer = store.load(str(tiny_dir))
    scorer = discriminator.build(str(tiny_dir), pad_token_id=tokenizer.pad_token_id, seed=0)
    adapters, _ = lora_roles.base_adapters(str(tiny_dir))
    lora_scorer = lora_roles.scorer(adapters, cfg.GADConfig(lora_rank=4), None, seed=0)
    with torch.no_grad():
        for _, p in adapters.named_parameters("discriminator"):
            p.add_(0.05)  # a non-zero adapter
    torch.manual_seed(0)
    examples = [
        chats.Example(str(i), torch.randint(3, 60, (6 + i,)).tolist(), 4, False) for i in range(5)
    ]
    parts = engine.length_sorted_chunks(examples, 2)

    def passes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = engine.logprobs(model, examples, tokenizer.pad_token_id, parts, 0.8)
            score = engine.scores(scorer, examples, tokenizer.pad_token_id, 2)
            lora_score = engine.scores(lora_scorer, examples, tokenizer.pad_token_id, 2)
        return logp, score, lora_score

    def first_linear(m):
        return next(x for x in m.modules() if isinstance(x, torch.nn.Linear))

    linear = first_linear(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with precision.frozen_weights(model, torch.device("cpu")):
            assert "forward" in vars(linear)  # its weight cast once, for the whole pass
        # A LoRA scorer's pass casts the shared backbone it runs, not only its head.
        backbone_linear = first_linear(adapters.backbone())
        with precision.frozen_weights(lora_scorer, torch.device("cpu")):
            assert "forward" in vars(backbone_linear)
    with precision.frozen_weights(model, torch.device("cpu")):
        assert "forward" not in vars(linear)  # no autocast: nothing to cast
    once = passes()
    casts = []
    monkeypatch.setattr(
        precision, "frozen_weights", lambda m, d: casts.append(m) or contextlib.nullcontext()
    )
    per_micro = passes()
    assert casts == [model, scorer, lora_scorer]  # every pass went through it
    assert all(torch.equal(a, b) for a, b in zip(once[0], per_micro[0], strict=True))
    assert torch.equal(once[1], per_micro[1])
    assert torch.equal(once[2], per_micro[2])
