"""HF interop: transformers loads llmpipe's export with the same logits, and llmpipe loads HF checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.hf import hf_layout, load_hf, save_hf

transformers = pytest.importorskip("transformers")

BASE = GPTConfig(vocab_size=101, n_layer=2, n_head=4, n_embd=32, block_size=32)
LAYOUTS = {
    "gpt2": dataclasses.replace(BASE, pos_encoding="learned", norm="layernorm", mlp="gelu"),
    "gpt2-bias-untied": dataclasses.replace(
        BASE, pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False
    ),
    "llama": BASE,
    "llama-gqa-untied": dataclasses.replace(BASE, n_kv_head=2, tie_embeddings=False, rope_theta=500000.0),
    "llama-bias": dataclasses.replace(BASE, bias=True),
    "mistral-window": dataclasses.replace(BASE, sliding_window=6),
}


def random_model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake cannot hide behind 1s and 0s
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", LAYOUTS)
def test_exported_model_has_the_same_logits_in_transformers(name: str, tmp_path: Path) -> None:
    model = random_model(LAYOUTS[name])
    save_hf(model, tmp_path, {"bos_token_id": 0, "eos_token_id": 1})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__.lower().startswith(hf_layout(model.config))
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        expected = model(idx)[0]
        actual = theirs(idx).logits
    assert (actual - expected).abs().max().item() < 1e-5

    reloaded = load_hf(tmp_path).eval()  # and back: the same function again
    assert reloaded.config.n_layer == model.config.n_layer
    with torch.no_grad():
        assert (reloaded(idx)[0] - expected).abs().max().item() < 1e-5


def test_loads_a_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    hf_config = transformers.GPT2Config(vocab_size=90, n_positions=16, n_embd=24, n_layer=2, n_head=3)
    torch.manual_seed(1)
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    idx = torch.randint(0, 90, (1, 16))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-5

    llama_dir = tmp_path / "llama"
    llama_config = transformers.LlamaConfig(
        vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True,
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(llama_config).eval()
    llama.save_pretrained(llama_dir)
    ours = load_hf(llama_dir).eval()
    assert ours.config.kv_heads == 2 and ours.config.tie_embeddings
    with torch.no_grad():
        assert (ours(idx)[0] - llama(idx).logits).abs().max().item() < 1e-5


def test_configs_without_a_transformers_twin_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sinusoidal"):
        save_hf(GPT(dataclasses.replace(BASE, pos_encoding="sinusoidal")), tmp_path)
    with pytest.raises(ValueError, match="GPT-2 layout"):
        save_hf(GPT(dataclasses.replace(LAYOUTS["gpt2"], n_kv_head=2)), tmp_path)
    for change, word in (({"qk_norm": True}, "qk_norm"), ({"mlp": "relu2"}, "relu2")):
        with pytest.raises(ValueError, match=word):  # a Llama export would silently compute another function
            save_hf(GPT(dataclasses.replace(LAYOUTS["llama"], **change)), tmp_path)
