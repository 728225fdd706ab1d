"""A trained model ready to generate: the GPT (+ an optional LoRA adapter) and its tokenizer.

    generator = load_generator(root / "models/base", adapter=root / "models/lora")
    result = generator.generate("The movie was full of", GenerationConfig(strategy="beam"))

Used by `llmpipe generate`; text goes in and out, ids and special tokens are handled here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.generate import Generation, GenerationConfig, Step, generate, stream
from tasks.layout import TOKENIZER_DIR
from tasks.tokenizer import load_tokenizer


@dataclass
class Generator:
    model: Any  # model.gpt.GPT, in eval mode
    tokenizer: Any  # tokenizers.Tokenizer (special spellings in text stay text)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id("<|eos|>")

    def encode(self, text: str) -> list[int]:
        """The prompt's ids, exactly the text (as a transformers tokenizer from models/base/hf encodes it)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token(self, token_id: int) -> str:
        """How one token reads on its own (special tokens by name)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _config(self, config: GenerationConfig) -> GenerationConfig:
        return config if config.eos_id is not None else replace(config, eos_id=self.eos_id)

    def generate(self, prompt: str | list[int], config: GenerationConfig) -> Generation:
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        return generate(self.model, ids, self._config(config), self.decode)

    def stream(self, prompt: str | list[int], config: GenerationConfig) -> Iterator[Step]:
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        return stream(self.model, ids, self._config(config), self.decode)


def load_generator(
    checkpoint: Path, root: Path, adapter: Path | None = None, device: str = "cpu"
) -> Generator:
    """models/base (or a training checkpoint), plus the LoRA adapter in `adapter` (models/lora)."""
    from model.lora import load_adapter
    from tasks.pretrain import load_checkpoint

    model = load_checkpoint(Path(checkpoint))
    if adapter is not None:
        load_adapter(model, Path(adapter))
    tokenizer_dir = next(
        (d for d in (Path(checkpoint), Path(adapter or checkpoint)) if (d / "tokenizer.json").is_file()),
        root / TOKENIZER_DIR,
    )
    return Generator(model.to(device).eval(), load_tokenizer(tokenizer_dir))
