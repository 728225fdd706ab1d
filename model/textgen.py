"""A trained model and its tokenizer: text in, text out.

    generator = load_generator(Path("models/base"), adapter=Path("models/lora"))   # or a .gguf, an HF dir
    result = generator.generate("The movie was full of", GenerationConfig(strategy="beam"))
    for step in generator.stream("Once upon", GenerationConfig(strategy="sample", seed=1)): ...

Used by `llmpipe generate` and `llmpipe chat`, the evaluate stage and the MLflow pyfunc model, so all of
them encode prompts and decode answers the same way: special-token spellings typed in a prompt stay text
(`encode_special_tokens`, as the tokenizer stage requires), special tokens are left out of the decoded
text, and an empty prompt means "the start of a document" (the token that ends the one before it).
Generation stops at the tokenizer's eos token or the end of a document (model.tokens.SpecialTokens), and
`llmpipe chat` uses the tokenizer directory's own chat template (model.chat.ChatTemplate).
Depends on torch, tokenizers and model/ only (the pyfunc model ships model/ as its code); torch is
imported on first use, so the tokenizer stages can load a tokenizer from here without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from model.chat import ChatTemplate
from model.tokens import (
    TOKENIZER_FILE,
    SpecialTokens,
    for_ordinary_text,
    load_tokenizer,
    named_specials,
    special_tokens,
)

if TYPE_CHECKING:
    from model.generate import Generation, GenerationConfig, Step
    from model.gpt import GPT


@dataclass
class Generator:
    model: GPT  # in eval mode
    tokenizer: Tokenizer
    special: SpecialTokens
    template: ChatTemplate | None = None  # the tokenizer directory's chat template

    @classmethod
    def load(cls, model: GPT, tokenizer_dir: Path) -> Generator:
        """`model` with the tokenizer, special tokens and chat template of `tokenizer_dir`."""
        tokenizer = load_tokenizer(tokenizer_dir)
        template = ChatTemplate.load(tokenizer_dir)
        return cls(model, tokenizer, special_tokens(tokenizer_dir, tokenizer), template)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What ends a generated text (GenerationConfig.eos_id): eos, and the end of a document."""
        return self.special.stop_ids

    def chat_template(self) -> ChatTemplate:
        if self.template is None:
            raise ValueError(
                "this model's tokenizer has no chat template (tokenizer_config.json `chat_template`)"
            )
        return self.template

    @property
    def context(self) -> int:
        return self.model.config.block_size

    def encode(self, text: str) -> list[int]:
        """The prompt's ids, exactly the text (as a transformers tokenizer from models/base/hf encodes it);
        an empty prompt is the document boundary."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids or [self.special.document_end]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token(self, token_id: int) -> str:
        """How one token reads on its own (special tokens by name)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _config(self, config: GenerationConfig) -> GenerationConfig:
        return config if config.eos_id is not None else replace(config, eos_id=self.stop_ids)

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompt: str | Sequence[int], config: GenerationConfig) -> Generation:
        return self.generate_batch([prompt], config)[0]

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig
    ) -> list[Generation]:
        """Several prompts in one left-padded batch (beam search: one after another)."""
        from model.generate import generate_batch

        return generate_batch(self.model, [self._ids(p) for p in prompts], self._config(config), self.decode)

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig) -> Iterator[Step]:
        from model.generate import stream

        return stream(self.model, self._ids(prompt), self._config(config), self.decode)


def load_generator(
    checkpoint: Path, adapter: Path | None = None, tokenizer: Path | None = None, device: str = "cpu"
) -> Generator:
    """A model plus an optional LoRA adapter (models/lora). `checkpoint` is models/base (or a training
    checkpoint), a `.gguf` file, or a Hugging Face model directory (GPT-2, Llama, Mistral). The tokenizer
    comes from `tokenizer`, else from the first of checkpoint and adapter that holds tokenizer.json (a
    GGUF file carries its own)."""
    from model.lora import load_adapter

    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".gguf":
        from model.gguf import read_gguf

        gguf = read_gguf(checkpoint)
        model = gguf.model()
        generator = Generator(
            model, for_ordinary_text(gguf.tokenizer), named_specials(gguf.tokenizer, gguf.tokenizer_config),
            ChatTemplate.of(gguf.tokenizer_config),
        )  # fmt: skip
    else:
        model = _load_directory(checkpoint)
        if tokenizer is None:
            holders = [Path(d) for d in (checkpoint, adapter) if d is not None]
            tokenizer = next((d for d in holders if (d / TOKENIZER_FILE).is_file()), checkpoint)
        generator = Generator.load(model, tokenizer)
    if adapter is not None:
        load_adapter(model, Path(adapter))
    generator.model = model.to(device).eval()
    return generator


def _load_directory(directory: Path) -> GPT:
    """llmpipe's checkpoint directories (config.json is a GPTConfig), else a transformers one."""
    import json

    from model.checkpoint import load_checkpoint
    from model.hf import load_hf

    config = directory / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text(encoding="utf-8")):
        return load_hf(directory)
    return load_checkpoint(directory)
