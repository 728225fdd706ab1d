"""GGUF import: start llmpipe from a llama.cpp checkpoint (`*.gguf`), weights and tokenizer both.

    checkpoint = read_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))   # config, fp32 state, tokenizer
    model = load_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))        # a GPT in eval mode
    import_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("models/base"))  # what load_checkpoint reads

- Only llama.cpp's "llama" architecture (Mistral's files say "llama" too) has an exact twin in llmpipe's
  GPT (rope in transformers' rotate_half layout, RMSNorm, SwiGLU, grouped-query attention); anything
  else, rope scaling, a head width other than n_embd / n_head, or a mixture of experts is refused with
  an error naming the file. A sliding window is taken from the metadata where it states one.
- Quantized tensors are dequantized to fp32 by the gguf package's own `gguf.quants.dequantize`, so every
  type it knows is read (F32, F16, BF16, Q4_0 … Q8_0, the K-quants, ...); an error names the tensor and
  type it does not know. The result is the quantized model's function, not the original fp16 one.
- llama.cpp's converter reorders the rows of attn_q / attn_k (and their biases) for its interleaved rope
  (`LlamaModel.permute` in convert_hf_to_gguf.py); they are put back in transformers' half-split order
  here. Where the file has some biases, the linear layers it lacks them for get zeros (the same function).
- The tokenizer is rebuilt from the metadata to encode what transformers' GGUF tokenizer
  (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) encodes: byte-level BPE ("gpt2") from the token
  list and merges, CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens, and
  the text split by GPT-2's pattern unless `tokenizer.ggml.pre` names a Llama-3 one. That is transformers'
  choice, not always llama.cpp's: for "smollm" llama.cpp also splits digits apart first, so a run of
  spaces before a digit ("  1") encodes differently there. SentencePiece ("llama") vocabularies go through
  transformers' own converter, to be exactly its tokenizer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, LlamaFileType, ReaderTensor, TokenType
from gguf.quants import dequantize
from safetensors.torch import save_model
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from model.config import GPTConfig
from model.gpt import GPT
from model.tokens import TOKENIZER_FILE

SUPPORTED_ARCHITECTURES = ("llama",)

#: llama.cpp's global tensor names → llmpipe's.
_GLOBAL_NAMES = {"token_embd": "tok_emb", "output_norm": "norm", "output": "lm_head"}
#: Per-layer names (`blk.N.attn_q.weight` → `blocks.N.attn.q_proj.weight`).
_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: `tokenizer.ggml.pre` → the split pattern transformers uses for it (None: GPT-2's, ByteLevel's own).
PRE_TOKENIZERS: dict[str | None, str | None] = {
    None: None,
    "default": None,
    "gpt-2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
}
#: tokenizer_config.json's names of the special tokens, and the metadata keys of their ids.
_SPECIAL_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@dataclass
class GGUFCheckpoint:
    config: GPTConfig
    state: dict[str, torch.Tensor]  # fp32, GPT.state_dict() names; no lm_head.weight when tied
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]  # what tokenizer_config.json holds
    metadata: dict[str, Any]  # name, architecture, quantization, special ids, ... (for reports)

    def model(self) -> GPT:
        """The checkpoint as llmpipe's GPT (fp32, eval mode)."""
        model = GPT(self.config)
        model.load_state_dict(self.state, strict=not self.config.tie_embeddings)
        return model.eval()


def read_gguf(path: Path) -> GGUFCheckpoint:
    """Config, fp32 weights under llmpipe's names, tokenizer and a summary of a llama-architecture GGUF."""
    path = Path(path)
    reader = _open(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = _config(path, fields, tensors)
    tokenizer, tokenizer_config = _tokenizer(path, fields, config)  # before the slow part, to fail fast
    state = _state(path, config, tensors)
    metadata = {
        "file": str(path),
        "name": fields.get("general.name"),
        "architecture": fields["general.architecture"],
        "file_type": _file_type(fields.get("general.file_type")),
        "tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors).most_common()),
        "parameters": sum(int(tensor.n_elements) for tensor in reader.tensors),
        "context_length": config.block_size,
        "tokenizer_model": fields.get("tokenizer.ggml.model"),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
        **{key: fields.get(f"tokenizer.ggml.{key}") for key in _SPECIAL_KEYS.values()},
    }
    return GGUFCheckpoint(config, state, tokenizer, tokenizer_config, metadata)


def load_gguf(path: Path) -> GPT:
    """The GGUF's model as llmpipe's GPT (fp32, eval mode)."""
    return read_gguf(path).model()


def import_gguf(path: Path, out: Path) -> GGUFCheckpoint:
    """Write the GGUF as an llmpipe model directory into `out` (which exists): config.json and
    model.safetensors (what `load_checkpoint` reads), tokenizer.json, tokenizer_config.json and
    special_tokens_map.json (what `AutoTokenizer.from_pretrained` reads). Returns what was read."""
    checkpoint = read_gguf(path)
    out = Path(out)
    (out / "config.json").write_text(
        json.dumps(checkpoint.config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    save_model(checkpoint.model(), str(out / "model.safetensors"))
    checkpoint.tokenizer.save(str(out / TOKENIZER_FILE))
    special = {
        key: checkpoint.tokenizer_config[key] for key in _SPECIAL_KEYS if key in checkpoint.tokenizer_config
    }
    for name, values in (
        ("tokenizer_config.json", checkpoint.tokenizer_config),
        ("special_tokens_map.json", special),
    ):
        (out / name).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return checkpoint


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError) as error:  # what GGUFReader raises on a foreign or cut-off file
        raise ValueError(f"{path}: not a readable GGUF file (truncated?): {error}") from error


def _file_type(value: int | None) -> str | None:
    """general.file_type's name (MOSTLY_Q4_1): what most of the weights are quantized to."""
    try:
        return None if value is None else LlamaFileType(value).name
    except ValueError:  # a type newer than this gguf package
        return str(value)


def _config(path: Path, fields: dict[str, Any], tensors: dict[str, ReaderTensor]) -> GPTConfig:
    """GPTConfig from `{arch}.*` metadata; ValueError for what llmpipe's GPT cannot compute exactly."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported (only {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: metadata {arch}.{name} is missing")
        if isinstance(value, list):
            raise ValueError(f"{path}: per-layer {arch}.{name} {value} is not supported")
        return value

    n_head, n_embd = key("attention.head_count"), key("embedding_length")
    if (scaling := fields.get(f"{arch}.rope.scaling.type", "none")) != "none":
        raise ValueError(f"{path}: rope scaling {scaling!r} ({arch}.rope.scaling.type) is not supported")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: rope scaling by frequency factors (rope_freqs.weight) is not supported")
    if fields.get(f"{arch}.expert_count", 0):
        raise ValueError(f"{path}: a mixture of experts ({arch}.expert_count) is not supported")
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if key(name, n_embd // n_head) != n_embd // n_head:
            raise ValueError(
                f"{path}: {arch}.{name} = {key(name)} ≠ embedding_length / head_count = {n_embd // n_head}"
            )
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    return GPTConfig(
        vocab_size=len(fields["tokenizer.ggml.tokens"]), n_layer=key("block_count"),
        n_head=n_head, n_embd=n_embd, block_size=key("context_length"),
        n_kv_head=key("attention.head_count_kv", n_head), mlp_hidden=key("feed_forward_length"),
        bias=any(name.startswith("blk.") and name.endswith(".bias") for name in tensors),
        tie_embeddings="output.weight" not in tensors, rope_theta=_decimal(key("rope.freq_base", 10000.0)),
        norm_eps=_decimal(key("attention.layer_norm_rms_epsilon")),
        sliding_window=fields.get(f"{arch}.attention.sliding_window"),
    )  # fmt: skip


def _decimal(value: float) -> float:
    """The shortest decimal a float32 metadata value reads as (1e-06, not 9.999999974752427e-07): the
    same float32, so the same function, and the number the model's authors wrote."""
    return float(str(np.float32(value)))


def llmpipe_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` → `blocks.3.attn.q_proj.weight`; None for a tensor llmpipe has no place for."""
    if (match := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)) and match[2] in _BLOCK_NAMES:
        return f"blocks.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"
    if (match := re.fullmatch(r"(\w+)\.(weight|bias)", name)) and match[1] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match[1]]}.{match[2]}"
    return None


def _state(path: Path, config: GPTConfig, tensors: dict[str, ReaderTensor]) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under llmpipe's name, q/k rows back in half-split rope order."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    names = {name: llmpipe_name(name) for name in tensors}
    unknown = sorted(name for name, ours in names.items() if ours not in expected)
    missing = sorted(set(expected) - set(names.values()) - {n for n in expected if n.endswith(".bias")})
    if unknown or missing:
        raise ValueError(f"{path}: tensors llmpipe has no place for: {unknown}; missing tensors: {missing}")
    state = {}
    for name, tensor in tensors.items():
        ours = names[name]
        assert ours is not None  # checked above
        weight = _dequantize(path, tensor)
        if tuple(weight.shape) != expected[ours]:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(weight.shape)}, expected {expected[ours]}"
            )
        if ".attn_q." in name:
            weight = _unpermute(weight, config.n_head)
        elif ".attn_k." in name:
            weight = _unpermute(weight, config.kv_heads)
        state[ours] = weight
    for name in expected.keys() - state.keys():  # biases this file lacks: zero changes nothing
        state[name] = torch.zeros(expected[name])
    return state


def _dequantize(path: Path, tensor: ReaderTensor) -> torch.Tensor:
    """fp32 in torch's dimension order (GGUF lists ne0, the contiguous one, first)."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot dequantize"
        ) from None
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute`: per head, rows (pairs, 2) → (2, pairs): half-split order."""
    return weight.reshape(heads, -1, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tokenizer(path: Path, fields: dict[str, Any], config: GPTConfig) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer and its tokenizer_config.json, as transformers builds them from this metadata."""
    tokens, kind = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(path, fields)
    elif kind == "llama":
        tokenizer = _sentencepiece(fields)
    else:
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (gpt2, llama)")
    special = {
        name: tokens[fields[f"tokenizer.ggml.{key}"]]
        for name, key in _SPECIAL_KEYS.items()
        if f"tokenizer.ggml.{key}" in fields
    }
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in special.values() if t not in added])
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama") and "bos_token" in special)
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in special)
    tokenizer.post_processor = _template(special, tokenizer, add_bos, add_eos)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
    }
    if "tokenizer.chat_template" in fields:
        tokenizer_config["chat_template"] = fields["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


def _byte_level_bpe(path: Path, fields: dict[str, Any]) -> Tokenizer:
    """GPT-2-style BPE over byte symbols; a token spelled outside the byte alphabet is respelled in it."""
    pre = fields.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        supported = ", ".join(name for name in PRE_TOKENIZERS if name)
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported ({supported})")
    if "tokenizer.ggml.merges" not in fields:
        raise ValueError(f"{path}: a byte-level BPE tokenizer without tokenizer.ggml.merges")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens = fields["tokenizer.ggml.tokens"]
    vocab = {
        token if set(token) <= alphabet else "".join(s for s, _ in to_bytes.pre_tokenize_str(token)): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in fields["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    # A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    kinds = list(zip(tokens, fields.get("tokenizer.ggml.token_type", []), strict=False))
    control = [t for t, kind in kinds if kind == TokenType.CONTROL and set(t) <= alphabet]
    user = [t for t, kind in kinds if kind == TokenType.USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


def _sentencepiece(fields: dict[str, Any]) -> Tokenizer:
    """transformers' own GGUF converter for a SentencePiece vocabulary (merges rebuilt from the scores)."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: fields[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in fields
    }
    tokenizer, _ = convert_gguf_tokenizer(fields["general.architecture"], tokenizer_dict)
    return tokenizer


def _template(special: dict[str, str], tokenizer: Tokenizer, add_bos: bool, add_eos: bool) -> Any:
    """transformers' post-processor (`update_post_processor`): BOS / EOS around each sequence as asked."""
    bos = [special["bos_token"]] if add_bos else []
    eos = [special["eos_token"]] if add_eos else []
    single = " ".join([*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos)])
    pair = " ".join([single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)])
    ids = [(token, tokenizer.token_to_id(token)) for token in bos + eos]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
