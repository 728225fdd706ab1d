"""model/lora.py and the fine-tuning data: LoRA's algebra, peft-format adapters that transformers + peft
load with the same logits, the chat template, loss masking, batch mixing and resuming a LoRA run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHAT_MESSAGES
from test_hf import LAYOUTS, random_model
from test_train import KillAt, write_tokens

from model import chat
from model.checkpoint import latest_checkpoint
from model.config import GPTConfig
from model.data import BatchCursor, ExampleBatches, MixedBatches, TokenShards
from model.gpt import GPT
from model.hf import save_hf
from model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    add_lora,
    load_adapter,
    lora_layers,
    lora_param_count,
    merge,
    unmerge,
)
from model.lora import save_adapter as save
from model.train import TrainConfig, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """As if trained: B is no longer zero, so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def test_a_fresh_adapter_changes_nothing_and_merging_is_exact() -> None:
    model = random_model(LAYOUTS["llama"])
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        base_logits = model(idx)[0]
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, targets=ALL)).eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], base_logits)  # B = 0: exactly the base model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)

    randomise_adapters(model)
    with torch.no_grad():
        unmerged = model(idx)[0]
        assert (unmerged - base_logits).abs().max() > 1e-3
        merge(model)
        assert all(layer.merged for layer in lora_layers(model))
        assert (model(idx)[0] - unmerged).abs().max().item() < 1e-5
        unmerge(model)
    for layer in lora_layers(model):
        name = next(n for n, m in model.named_modules() if m is layer)
        torch.testing.assert_close(
            layer.get_base_layer().weight, base_weights[f"{name}.weight"], atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(
    "config, targets",
    [
        (LAYOUTS["llama"], ("q_proj", "v_proj")),
        (LAYOUTS["llama-gqa-untied"], ALL),  # k/v are narrower than q under grouped-query attention
        (LAYOUTS["gpt2"], ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    ],
)
def test_trainable_parameters_match_the_closed_form(config: GPTConfig, targets: tuple[str, ...]) -> None:
    settings = LoraSettings(r=3, dropout=0.0, targets=targets)
    model = add_lora(random_model(config), settings)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, hd = config.n_embd, config.head_dim
    q, kv, hidden = config.n_head * hd, config.kv_heads * hd, config.hidden
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, hidden), "up_proj": (d, hidden), "down_proj": (hidden, d)}  # fmt: skip
    closed_form = config.n_layer * sum(3 * (shapes[t][0] + shapes[t][1]) for t in targets)
    assert counted == lora_param_count(config, settings) == closed_form


def test_a_target_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no layer.*valid targets: q_proj"):
        add_lora(random_model(LAYOUTS["llama"]), LoraSettings(targets=("q_proj", "qkv_proj")))
    with pytest.raises(ValueError, match="gate_proj"):  # GPT-2's MLP has no gate
        add_lora(random_model(LAYOUTS["gpt2"]), LoraSettings(targets=("gate_proj",)))
    with pytest.raises(ValueError, match="r ≥ 1"):
        add_lora(random_model(LAYOUTS["llama"]), LoraSettings(r=0))


@pytest.mark.parametrize("layout", ["llama", "llama-gqa-untied", "gpt2-bias-untied", "mistral-window"])
def test_the_saved_adapter_loads_in_peft_on_the_hf_export_with_the_same_logits(
    layout: str, tmp_path: Path
) -> None:
    config = LAYOUTS[layout]
    model = random_model(config)
    save_hf(model, tmp_path / "base")
    targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # a subset: GPT-2's fused c_attn
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets=targets)
    add_lora(model, settings).eval()
    randomise_adapters(model)
    save(model, settings, tmp_path / "lora", base_model=str(tmp_path / "base"))

    # Only the adapter: two files, about 4 bytes per adapter parameter plus a header.
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    size = (tmp_path / "lora" / ADAPTER_WEIGHTS).stat().st_size
    adapter_bytes = 4 * lora_param_count(config, settings)
    assert (
        adapter_bytes <= size < adapter_bytes + 16_384 < (tmp_path / "base/model.safetensors").stat().st_size
    )

    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        ours = model(idx)[0]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        assert (theirs(idx).logits - ours).abs().max().item() < 1e-5

    reloaded = load_adapter(random_model(config), tmp_path / "lora").eval()  # and back into llmpipe
    with torch.no_grad():
        assert torch.equal(reloaded(idx)[0], ours)


def test_an_architecture_without_a_transformers_twin_saves_llmpipe_names(tmp_path: Path) -> None:
    config = dataclasses.replace(LAYOUTS["llama"], pos_encoding="sinusoidal")
    model = add_lora(random_model(config), LoraSettings(r=2, dropout=0.0, targets=("q_proj",))).eval()
    randomise_adapters(model)
    save(model, LoraSettings(r=2, dropout=0.0, targets=("q_proj",)), tmp_path)
    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert saved["target_modules"] == ["attn.q_proj"] and saved["peft_type"] == "LORA"
    idx = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_adapter(random_model(config), tmp_path).eval()(idx)[0], model(idx)[0])


# --------------------------------------------------------------------------------------------------
# Chat template, masking, batch sources
# --------------------------------------------------------------------------------------------------


def test_prompt_tokens_contribute_no_loss(chat_tokenizer) -> None:
    _, tokenizer = chat_tokenizer
    template = chat.LLMPIPE_TEMPLATE
    examples = [template.encode(tokenizer, CHAT_MESSAGES), template.encode(tokenizer, CHAT_MESSAGES[1:])]
    batches = ExampleBatches(examples, pad_id=tokenizer.token_to_id("<|pad|>"))
    x, y = batches.sample_batch(4, 64, BatchCursor(0, 0))
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_embd=16, block_size=64)
    torch.manual_seed(0)
    model = GPT(config).eval()
    logits, loss, _ = model(torch.from_numpy(x), torch.from_numpy(y))
    learn = torch.from_numpy(y) != -100
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.from_numpy(y).flatten(), reduction="none", ignore_index=-100
    )
    assert loss.item() == pytest.approx(per_token[learn.flatten()].mean().item())
    assert 0 < learn.sum() < (x != batches.pad_id).sum()  # prompts and padding are excluded
    for row in range(len(x)):  # every target is a response token (or the closing eos) of that example
        targets = y[row][y[row] != -100]
        assert tokenizer.decode(targets.tolist(), skip_special_tokens=False) == "Excess junk.<|eos|>"


def test_mixed_batches_draw_each_row_from_one_source(tmp_path: Path) -> None:
    primary = TokenShards(write_tokens(tmp_path / "a", seed=0), "train")
    secondary = TokenShards(write_tokens(tmp_path / "b", seed=1), "train")
    cursor = BatchCursor(3, 5)
    assert np.array_equal(MixedBatches(primary, secondary, 0.0).sample_batch(8, 16, cursor)[0],
                          primary.sample_batch(8, 16, cursor)[0])  # fmt: skip
    assert np.array_equal(MixedBatches(primary, secondary, 1.0).sample_batch(8, 16, cursor)[0],
                          secondary.sample_batch(8, 16, cursor.fork(2))[0])  # fmt: skip
    half = MixedBatches(primary, secondary, 0.5)
    shares = [len(half.sample_batch(64, 16, BatchCursor(0, step))[0]) for step in range(3)]
    assert shares == [64, 64, 64]
    x1, _ = half.sample_batch(64, 16, cursor)
    assert np.array_equal(x1, half.sample_batch(64, 16, cursor)[0])  # deterministic in the cursor
    with pytest.raises(ValueError, match="mixing weight"):
        MixedBatches(primary, secondary, 1.5)


def test_a_killed_lora_run_resumes_from_a_checkpoint_of_the_adapter_only(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens")
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)
    settings = LoraSettings(r=2, dropout=0.1, targets=("q_proj", "v_proj", "up_proj"))
    cfg = TrainConfig(
        steps=6, batch_size=4, warmup_steps=0, lr=1e-2, checkpoint_every=2, eval_every=6, eval_batches=1
    )

    def run(checkpoints: Path, **kwargs: object):
        torch.manual_seed(0)
        model = add_lora(GPT(config), settings)
        data = TokenShards(tokens, "train")
        return model, train(
            model, data, TokenShards(tokens, "val"), cfg, checkpoints, "fp", progress=False, **kwargs
        )  # type: ignore[arg-type]

    straight, _ = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", callbacks=KillAt(5))
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert checkpoint is not None and checkpoint.name == "step-0000004"
    saved = (checkpoint / "model.safetensors").stat().st_size
    assert saved < 4 * lora_param_count(config, settings) + 4096  # the adapter, not the frozen base
    resumed, result = run(tmp_path / "killed")
    assert result.resumed_from == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
