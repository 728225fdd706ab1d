"""LoRA on llmpipe's GPT through peft, saved in the adapter format transformers + peft users load.

    settings = LoraSettings(r=8, alpha=16, targets=("q_proj", "v_proj"))
    add_lora(model, settings)  # only A, B train
    ...train...
    save_adapter(model, settings, "models/lora", base_model="models/base/hf")
    # elsewhere, with no llmpipe code:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base/hf"), "models/lora")

- peft's `inject_adapter_in_model` wraps each targeted nn.Linear W as  W·x + (alpha / r)·B·A·x  with A
  random and B zero, so a fresh adapter leaves the model's outputs unchanged. Everything else is frozen.
- peft silently skips a target name that matches nothing when others match; `add_lora` refuses it.
- The saved tensors are named after the modules of the base model's transformers export (models/base/hf):
  Llama/Mistral use llmpipe's projection names, so it is a rename. GPT-2 fuses q/k/v into one Conv1D
  `c_attn`: the q/k/v adapters are stacked into one adapter of rank r × (how many of q, k, v are
  targeted), with B block-diagonal and alpha scaled alike, which computes the same update exactly.
  A model with no transformers twin saves llmpipe's own names (`PeftModel` on a GPT loads it).
- peft is imported on first use: it brings transformers, seconds of import time every stage would pay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import GPTConfig
from model.gpt import GPT
from model.hf import hf_layout, rename_layer_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # peft's adapter name inside the model
#: The linear layers of a block that LoRA can target (gate_proj exists with mlp: swiglu only).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")
_GPT2_NAMES = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


@dataclass(frozen=True)
class LoraSettings:
    """An adapter's shape: each setting's default and check, once (the finetune stage's params derive
    from it). The numbers are checked when built, the targets against the model by `validate_for`."""

    r: int = 8  # rank of the update B·A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    targets: tuple[str, ...] | None = None  # None: every linear layer the model has (`available`)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r ≥ 1, alpha > 0 and 0 ≤ dropout < 1; got {self}")

    def for_model(self, config: GPTConfig) -> ResolvedLora:
        """These settings for one model: `targets` spelled out (None: all it has) and checked against it."""
        resolved = ResolvedLora(
            self.r,
            self.alpha,
            self.dropout,
            available(config) if self.targets is None else tuple(self.targets),
        )
        resolved.validate_for(config)
        return resolved


@dataclass(frozen=True)
class ResolvedLora(LoraSettings):
    """LoraSettings whose targets are spelled out and known to exist in the model (`for_model`)."""

    targets: tuple[str, ...] = ()

    def validate_for(self, config: GPTConfig) -> None:
        """The targets, against the model they adapt: each one a layer it has, named once."""
        if not self.targets:
            raise ValueError("LoRA targets is empty: name at least one of " + ", ".join(available(config)))
        unknown = [name for name in self.targets if name not in available(config)]
        if unknown:
            raise ValueError(
                f"LoRA target(s) {unknown} match no layer of this model; valid targets: "
                f"{', '.join(available(config))}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets {list(self.targets)} name a layer twice")


def module_name(target: str) -> str:
    """A target's module inside a block: `attn.q_proj`, `mlp.up_proj`."""
    return f"{'attn' if target in (*QKV, 'o_proj') else 'mlp'}.{target}"


def available(config: GPTConfig) -> tuple[str, ...]:
    return tuple(name for name in TARGETS if name != "gate_proj" or config.mlp == "swiglu")


def _shape(config: GPTConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of one targeted matrix."""
    d, hd = config.n_embd, config.head_dim
    return {
        "q_proj": (d, config.n_head * hd),
        "k_proj": (d, config.kv_heads * hd),
        "v_proj": (d, config.kv_heads * hd),
        "o_proj": (config.n_head * hd, d),
        "gate_proj": (d, config.hidden),
        "up_proj": (d, config.hidden),
        "down_proj": (config.hidden, d),
    }[target]


def lora_param_count(config: GPTConfig, settings: LoraSettings) -> int:
    """Trainable parameters in closed form: n_layer · Σ over targets of r · (d_in + d_out)."""
    lora = settings.for_model(config)
    return config.n_layer * sum(lora.r * sum(_shape(config, t)) for t in lora.targets)


def add_lora(model: GPT, settings: LoraSettings) -> GPT:
    """Wrap the targeted linear layers of every block with a LoRA adapter (in place); freeze the rest."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = settings.for_model(model.config)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; any scale works
        lora_dropout=lora.dropout,
        target_modules=[module_name(t) for t in lora.targets],
    )
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)  # in place: returns `model`
    return model


def lora_layers(model: torch.nn.Module) -> list[Any]:
    """peft's LoRA-wrapped layers in `model`."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def merge(model: torch.nn.Module) -> None:
    """Fold B·A·alpha/r into each base weight (inference without the adapter's extra matmuls)."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge(model: torch.nn.Module) -> None:
    """Subtract the update again: the base weights come back (to float rounding)."""
    for layer in lora_layers(model):
        layer.unmerge()


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{"blocks.0.attn.q_proj.lora_A.weight": ...}: every adapter matrix, peft's names minus the adapter."""
    return {
        name.replace(f".{ADAPTER}.", "."): tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if ".lora_A." in name or ".lora_B." in name
    }


# --------------------------------------------------------------------------------------------------
# The adapter on disk
# --------------------------------------------------------------------------------------------------


def _export_layout(config: GPTConfig) -> str:
    try:
        return hf_layout(config)
    except ValueError:
        return "llmpipe"


def _gpt2_pairs(settings: ResolvedLora, layer: int) -> list[tuple[str, str]]:
    """(llmpipe name, export name) of the unfused GPT-2 adapter matrices of one layer."""
    ours, theirs = f"blocks.{layer}", f"base_model.model.transformer.h.{layer}"
    return [
        (f"{ours}.{module_name(target)}.{part}.weight", f"{theirs}.{name}.{part}.weight")
        for target, name in _GPT2_NAMES.items()
        if target in settings.targets
        for part in ("lora_A", "lora_B")
    ]


def _to_export(
    tensors: dict[str, torch.Tensor], settings: ResolvedLora, layout: str
) -> dict[str, torch.Tensor]:
    """llmpipe adapter names → the names peft expects on the exported model (with PeftModel's prefix)."""
    if layout == "llmpipe":
        return {f"base_model.model.{name}": tensor for name, tensor in tensors.items()}
    if layout in ("llama", "mistral"):
        return {
            "base_model.model.model.layers."
            + rename_layer_key(name.removeprefix("blocks."), to_llama=True): t
            for name, t in tensors.items()
        }
    out: dict[str, torch.Tensor] = {}
    qkv = [t for t in QKV if t in settings.targets]
    for i in sorted({int(name.split(".")[1]) for name in tensors}):
        out |= {theirs: tensors[ours] for ours, theirs in _gpt2_pairs(settings, i)}
        if qkv:  # stack: A = [A_q; A_v], B = [[B_q, 0], [0, 0], [0, B_v]] for targets q, v
            ours, theirs = f"blocks.{i}.attn", f"base_model.model.transformer.h.{i}.attn.c_attn"
            a = [tensors[f"{ours}.{t}.lora_A.weight"] for t in qkv]
            width = a[0].shape[1]
            b = torch.zeros(3 * width, settings.r * len(qkv), dtype=a[0].dtype)
            for j, target in enumerate(qkv):
                row = QKV.index(target) * width
                b[row : row + width, j * settings.r : (j + 1) * settings.r] = tensors[
                    f"{ours}.{target}.lora_B.weight"
                ]
            out[f"{theirs}.lora_A.weight"] = torch.cat(a)
            out[f"{theirs}.lora_B.weight"] = b
    return out


def _from_export(
    tensors: dict[str, torch.Tensor], settings: ResolvedLora, layout: str
) -> dict[str, torch.Tensor]:
    """The inverse of `_to_export`."""
    if layout == "llmpipe":
        return {name.removeprefix("base_model.model."): tensor for name, tensor in tensors.items()}
    if layout in ("llama", "mistral"):
        prefix = "base_model.model.model.layers."
        return {
            "blocks." + rename_layer_key(name.removeprefix(prefix), to_llama=False): t
            for name, t in tensors.items()
        }
    out: dict[str, torch.Tensor] = {}
    qkv = [t for t in QKV if t in settings.targets]
    for i in sorted({int(name.split(".")[4]) for name in tensors}):
        out |= {ours: tensors[theirs] for ours, theirs in _gpt2_pairs(settings, i)}
        if qkv:
            ours, theirs = f"blocks.{i}.attn", f"base_model.model.transformer.h.{i}.attn.c_attn"
            a, b = tensors[f"{theirs}.lora_A.weight"], tensors[f"{theirs}.lora_B.weight"]
            width = b.shape[0] // 3
            for j, target in enumerate(qkv):
                row = QKV.index(target) * width
                cols = slice(j * settings.r, (j + 1) * settings.r)
                out[f"{ours}.{target}.lora_A.weight"] = a[cols].contiguous()
                out[f"{ours}.{target}.lora_B.weight"] = b[row : row + width, cols].contiguous()
    return out


def _peft_config(settings: ResolvedLora, layout: str, base_model: str | None) -> dict[str, object]:
    """adapter_config.json as `LoraConfig.save_pretrained` writes it, for the exported model's names."""
    from peft import LoraConfig

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if layout == "gpt2":
        targets = [_GPT2_NAMES[t] for t in settings.targets if t in _GPT2_NAMES]
        stacked = sum(t in settings.targets for t in QKV)
        if stacked:
            targets.append("attn.c_attn")
            rank_pattern["c_attn"] = settings.r * stacked
            alpha_pattern["c_attn"] = settings.alpha * stacked
    elif layout == "llmpipe":
        targets = [module_name(t) for t in settings.targets]
    else:
        targets = list(settings.targets)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; any scale works
        lora_dropout=settings.dropout,
        target_modules=sorted(targets),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=layout == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
        base_model_name_or_path=base_model,
        task_type="CAUSAL_LM" if layout != "llmpipe" else None,
        bias="none",
        inference_mode=True,  # as PeftModel.save_pretrained writes it
    )
    return config.to_dict()


def save_adapter(model: GPT, settings: LoraSettings, directory: Path, base_model: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (the adapter alone: kilobytes, not the model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = _export_layout(model.config)
    settings = settings.for_model(model.config)
    config = _peft_config(settings, layout, base_model)
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    (directory / ADAPTER_CONFIG).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    metadata = {"format": "pt", "llmpipe_layout": layout, "llmpipe_targets": ",".join(settings.targets)}
    save_file(
        _to_export(adapter_tensors(model), settings, layout), str(directory / ADAPTER_WEIGHTS), metadata
    )


def _llmpipe_metadata(directory: Path) -> dict[str, str]:
    """What save_adapter stores beside the tensors: the targets and the layout they are named for."""
    with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), "pt") as handle:
        metadata = handle.metadata() or {}
    if "llmpipe_targets" not in metadata:
        raise ValueError(f"{directory}: not an adapter written by llmpipe (no llmpipe_targets metadata)")
    return metadata


def read_settings(directory: Path) -> ResolvedLora:
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return ResolvedLora(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config["lora_dropout"],
        targets=tuple(_llmpipe_metadata(directory)["llmpipe_targets"].split(",")),
    )


def load_adapter(model: GPT, directory: Path) -> GPT:
    """Add the adapter saved in `directory` to `model` (the base it was trained on), in place."""
    directory = Path(directory)
    settings = read_settings(directory)
    layout = _export_layout(model.config)
    saved_layout = _llmpipe_metadata(directory)["llmpipe_layout"]
    if saved_layout != layout:
        raise ValueError(f"{directory}: adapter was saved for a {saved_layout} model, this base is {layout}")
    add_lora(model, settings)
    device = next(model.parameters()).device
    state = {
        name.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): tensor.to(
            device
        )
        for name, tensor in _from_export(
            load_file(str(directory / ADAPTER_WEIGHTS)), settings, layout
        ).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if ".lora_" in name]
    if missing or unexpected:
        raise ValueError(
            f"{directory}: adapter does not fit this model: missing {missing}, unexpected {unexpected}"
        )
    return model
