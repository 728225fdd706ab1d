"""Hugging Face interop: write llmpipe's GPT as a transformers checkpoint, and read GPT-2 / Llama ones.

Two layouts cover the configs that have an exact transformers twin:
- GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU (tanh, "gelu_new"), multi-head attention.
  GPT-2 stores q/k/v as one `c_attn` and every matrix as Conv1D (in × out): transposed here. GPT-2 always
  has biases; a bias-free llmpipe model exports zeros, which changes nothing.
- Llama (`LlamaForCausalLM`): rope, RMSNorm, SwiGLU, optional grouped-query attention; llmpipe's module
  names are Llama's, so the mapping is a rename. With a sliding window it is Mistral (`MistralForCausalLM`).
Other combinations (sinusoidal positions, rope with LayerNorm, ...) have no transformers class that
computes the same function; exporting them is an error that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import GPTConfig
from model.gpt import GPT

WEIGHTS_FILE = "model.safetensors"


def hf_layout(config: GPTConfig) -> str:
    """ "gpt2", "llama" or "mistral"; ValueError naming the mismatch for anything else."""
    if config.qk_norm:
        raise ValueError("qk_norm: neither the GPT-2 nor the Llama layout normalises queries and keys")
    if (config.pos_encoding, config.norm, config.mlp) == ("learned", "layernorm", "gelu"):
        if config.kv_heads != config.n_head or config.sliding_window is not None:
            raise ValueError(
                "GPT-2 layout: grouped-query attention and sliding windows have no GPT-2 equivalent"
            )
        return "gpt2"
    if (config.pos_encoding, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "mistral" if config.sliding_window is not None else "llama"
    raise ValueError(
        f"no transformers layout computes pos_encoding={config.pos_encoding}, norm={config.norm}, "
        f"mlp={config.mlp}: export needs learned+layernorm+gelu (GPT-2) or rope+rmsnorm+swiglu (Llama)"
    )


def _hf_config(config: GPTConfig, layout: str, special_ids: dict[str, int | None]) -> dict[str, Any]:
    common = {
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }
    common |= {key: value for key, value in special_ids.items() if value is not None}
    if layout == "gpt2":
        return common | {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
        }
    hf = common | {
        "architectures": ["MistralForCausalLM" if layout == "mistral" else "LlamaForCausalLM"],
        "model_type": layout,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_dropout": config.dropout,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
    }
    if layout == "mistral":
        hf["sliding_window"] = config.sliding_window
    return hf


def to_hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names (GPT-2 or Llama/Mistral layout)."""
    config, layout = model.config, hf_layout(model.config)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if layout == "gpt2":
        out["transformer.wte.weight"] = state["tok_emb.weight"]
        out["transformer.wpe.weight"] = state["pos_emb.weight"]
        out |= _gpt2_norm(state, "norm", "transformer.ln_f")
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
            out |= _gpt2_norm(state, f"{ours}.attn_norm", f"{theirs}.ln_1")
            out |= _gpt2_norm(state, f"{ours}.mlp_norm", f"{theirs}.ln_2")
            qkv = [f"{ours}.attn.{p}_proj" for p in "qkv"]
            out[f"{theirs}.attn.c_attn.weight"] = torch.cat(
                [state[f"{p}.weight"] for p in qkv]
            ).T.contiguous()
            out[f"{theirs}.attn.c_attn.bias"] = torch.cat([_bias(state, p) for p in qkv])
            for src, dst in (
                ("attn.o_proj", "attn.c_proj"),
                ("mlp.up_proj", "mlp.c_fc"),
                ("mlp.down_proj", "mlp.c_proj"),
            ):
                out[f"{theirs}.{dst}.weight"] = state[f"{ours}.{src}.weight"].T.contiguous()
                out[f"{theirs}.{dst}.bias"] = _bias(state, f"{ours}.{src}")
    else:
        out["model.embed_tokens.weight"] = state["tok_emb.weight"]
        out["model.norm.weight"] = state["norm.weight"]
        for name, tensor in state.items():
            if name.startswith("blocks."):
                out["model.layers." + rename_layer_key(name.removeprefix("blocks."), to_llama=True)] = tensor
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _bias(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    weight = state[f"{prefix}.weight"]
    return state.get(f"{prefix}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))


def _gpt2_norm(state: dict[str, torch.Tensor], ours: str, theirs: str) -> dict[str, torch.Tensor]:
    weight = state[f"{ours}.weight"]
    return {f"{theirs}.weight": weight, f"{theirs}.bias": state.get(f"{ours}.bias", torch.zeros_like(weight))}


#: Per-layer name pairs between llmpipe (`attn.q_proj`) and Llama (`self_attn.q_proj`).
_LLAMA_PAIRS = (
    ("attn_norm.", "input_layernorm."),
    ("mlp_norm.", "post_attention_layernorm."),
    ("attn.", "self_attn."),
)


def rename_layer_key(name: str, to_llama: bool) -> str:
    """`0.attn.q_proj.weight` ↔ `0.self_attn.q_proj.weight` (layer index first, prefixes stripped)."""
    layer, rest = name.split(".", 1)
    for ours, theirs in _LLAMA_PAIRS:
        source, target = (ours, theirs) if to_llama else (theirs, ours)
        if rest.startswith(source):
            return f"{layer}.{target}{rest.removeprefix(source)}"
    return name


def save_hf(model: GPT, directory: Path, special_ids: dict[str, int | None] | None = None) -> None:
    """Write config.json + model.safetensors (fp32) into `directory`: `from_pretrained` loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = hf_layout(model.config)
    config = _hf_config(model.config, layout, special_ids or {})
    (directory / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    save_file(to_hf_tensors(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (weights only)."""
    if (directory / WEIGHTS_FILE).is_file():
        return load_file(str(directory / WEIGHTS_FILE))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(directory / shard)).items()}
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no model.safetensors, sharded index or pytorch_model.bin")


def load_hf(directory: Path) -> GPT:
    """A GPT holding the weights of a local transformers GPT-2 or Llama-family checkpoint directory."""
    directory = Path(directory)
    try:
        return _load_hf(directory)
    except KeyError as err:
        raise ValueError(f"{directory}: config.json or the weights lack {err.args[0]!r}") from None


def _load_hf(directory: Path) -> GPT:
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    weights = {k.removeprefix("transformer."): v.float() for k, v in _read_weights(directory).items()}
    kind = hf.get("model_type")
    if kind == "gpt2":
        config = GPTConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            block_size=hf["n_positions"], mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
            pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )  # fmt: skip
        state = _from_gpt2(weights, config)
    elif kind in ("llama", "mistral"):
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError(f"{directory}: rope scaling {rope or hf.get('rope_scaling')} is not supported")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ValueError(f"{directory}: attention_bias and mlp_bias differ; llmpipe has one bias switch")
        config = GPTConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"], block_size=hf["max_position_embeddings"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            mlp_hidden=hf["intermediate_size"], bias=hf.get("attention_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            sliding_window=hf.get("sliding_window") if kind == "mistral" else None,
        )  # fmt: skip
        if hf.get("head_dim", config.head_dim) != config.head_dim:
            raise ValueError(f"{directory}: head_dim {hf['head_dim']} ≠ hidden_size / heads; not supported")
        state = {
            "tok_emb.weight": weights["model.embed_tokens.weight"],
            "norm.weight": weights["model.norm.weight"],
        }
        for name, tensor in weights.items():
            if name.startswith("model.layers."):
                state["blocks." + rename_layer_key(name.removeprefix("model.layers."), to_llama=False)] = (
                    tensor
                )
    else:
        raise ValueError(f"{directory}: model_type {kind!r} is not supported (gpt2, llama, mistral)")
    if not config.tie_embeddings:
        state["lm_head.weight"] = weights["lm_head.weight"]
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    return model


def _from_gpt2(weights: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    d = config.n_embd
    state = {"tok_emb.weight": weights["wte.weight"], "pos_emb.weight": weights["wpe.weight"]}
    state |= {"norm.weight": weights["ln_f.weight"], "norm.bias": weights["ln_f.bias"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}", f"h.{i}"
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            state[f"{ours}.{dst}.weight"] = weights[f"{theirs}.{src}.weight"]
            state[f"{ours}.{dst}.bias"] = weights[f"{theirs}.{src}.bias"]
        qkv_weight = weights[f"{theirs}.attn.c_attn.weight"].T
        qkv_bias = weights[f"{theirs}.attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            state[f"{ours}.attn.{name}_proj.weight"] = qkv_weight[j * d : (j + 1) * d]
            state[f"{ours}.attn.{name}_proj.bias"] = qkv_bias[j * d : (j + 1) * d]
        for src, dst in (
            ("attn.c_proj", "attn.o_proj"),
            ("mlp.c_fc", "mlp.up_proj"),
            ("mlp.c_proj", "mlp.down_proj"),
        ):
            state[f"{ours}.{dst}.weight"] = weights[f"{theirs}.{src}.weight"].T
            state[f"{ours}.{dst}.bias"] = weights[f"{theirs}.{src}.bias"]
    return state
