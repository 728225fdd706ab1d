"""model/train.py: schedules, accumulation, exact resume, fresh starts, divergence, DDP on gloo."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from model.checkpoint import latest_checkpoint
from model.config import GPTConfig
from model.data import TokenShards
from model.flops import accelerator_for
from model.gpt import GPT
from model.optim import Muon, MuonAdamW, orthogonalize
from model.rnn import GRULM, GRUConfig, load_gru, save_gru
from model.train import (
    Callbacks,
    TrainConfig,
    TrainingDiverged,
    loop_optimizer,
    lr_at,
    train,
)

CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)


def write_tokens(directory: Path, tokens: int = 20_000, seed: int = 0) -> Path:
    """A tokens directory like the tokenize stage writes: a repetitive pattern plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    pattern = np.arange(tokens) % 7 * 3 % 63
    noise = rng.integers(0, 63, tokens)
    ids = np.where(rng.random(tokens) < 0.1, noise, pattern).astype(np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, part in (("train", ids[: tokens * 9 // 10]), ("val", ids[tokens * 9 // 10 :])):
        np.save(directory / f"{split}-00000.npy", part)
        splits[split] = {"tokens": len(part), "docs": 1, "bytes": len(part), "shards": [f"{split}-00000.npy"]}
    meta = {"format": 1, "dtype": "uint16", "vocab_size": 64, "eos_id": 63, "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "tokens")


def fresh_model(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    return GPT(config)


def run(tokens: Path, checkpoints: Path, cfg: TrainConfig, **kwargs: object) -> tuple[GPT, object]:
    model = fresh_model(kwargs.pop("config", CONFIG))  # type: ignore[arg-type]
    train_data, val_data = TokenShards(tokens, "train"), TokenShards(tokens, "val")
    result = train(model, train_data, val_data, cfg, checkpoints, "fp", progress=False, **kwargs)  # type: ignore[arg-type]
    return model, result


def test_schedule_boundaries_are_exact() -> None:
    cosine = TrainConfig(steps=101, batch_size=1, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, cosine) == pytest.approx(0.1)
    assert lr_at(9, cosine) == 1.0  # the last warmup step reaches the peak
    assert lr_at(10, cosine) == 1.0
    assert lr_at(55, cosine) == pytest.approx(0.55)  # halfway through the cosine: the midpoint
    assert lr_at(100, cosine) == pytest.approx(0.1)
    wsd = dataclasses.replace(cosine, schedule="wsd", decay_fraction=0.2)
    assert lr_at(80, wsd) == 1.0 and lr_at(100, wsd) == pytest.approx(0.1)
    assert lr_at(90, wsd) == pytest.approx(0.55)
    assert all(lr_at(s, dataclasses.replace(cosine, schedule="constant")) == 1.0 for s in range(10, 101))


def test_accumulated_micro_batches_match_one_full_batch(tokens: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        steps=3, batch_size=8, warmup_steps=0, eval_every=3, eval_batches=1, checkpoint_every=3, seed=1
    )
    no_dropout = dataclasses.replace(CONFIG, dropout=0.0)
    full, _ = run(tokens, tmp_path / "a", cfg, config=no_dropout)
    accumulated, _ = run(
        tokens, tmp_path / "b", dataclasses.replace(cfg, micro_batch_size=2), config=no_dropout
    )
    for (name, a), (_, b) in zip(full.state_dict().items(), accumulated.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


class KillAt(Callbacks):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            raise KeyboardInterrupt  # the process dies between two checkpoints


def test_a_killed_run_resumes_to_bitwise_identical_weights(tokens: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=7, batch_size=4, checkpoint_every=2, eval_every=3, eval_batches=2, warmup_steps=2)
    reference, finished = run(tokens, tmp_path / "straight", cfg)
    with pytest.raises(KeyboardInterrupt):
        run(tokens, tmp_path / "killed", cfg, callbacks=KillAt(5))
    assert latest_checkpoint(tmp_path / "killed").name == "step-0000004"
    resumed, result = run(tokens, tmp_path / "killed", cfg)
    assert result.resumed_from == 4 and finished.resumed_from == 0  # type: ignore[attr-defined]
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert result.val_loss == finished.val_loss  # type: ignore[attr-defined]


def test_finished_or_foreign_checkpoints_start_fresh(tokens: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=0, checkpoint_every=1, eval_every=3, eval_batches=1)
    run(tokens, tmp_path / "ck", cfg)
    _, again = run(tokens, tmp_path / "ck", cfg)  # finished: a rerun is a deliberate fresh start
    assert again.resumed_from == 0  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        run(tokens, tmp_path / "ck", cfg, callbacks=KillAt(2))
    model = fresh_model()
    result = train(
        model, TokenShards(tokens, "train"), None, cfg, tmp_path / "ck", "other data", progress=False
    )  # a different fingerprint (other params or data) never resumes
    assert result.resumed_from == 0


def test_training_learns_and_reports(tokens: Path, tmp_path: Path) -> None:
    seen: dict[str, list[object]] = {"eval": [], "sample": []}

    class Record(Callbacks):
        def on_eval(self, step: int, metrics: dict[str, float]) -> None:
            seen["eval"].append((step, metrics["val_loss"]))

        def on_sample(self, step: int, samples: list[list[int]]) -> None:
            seen["sample"].append(samples)

    cfg = TrainConfig(
        steps=60, batch_size=16, warmup_steps=0, lr=1e-2, eval_every=20, eval_batches=4, checkpoint_every=60
    )
    _, result = run(
        tokens, tmp_path / "ck", cfg, callbacks=Record(), peak_flops=1e11, sample_prompts=[[0, 3]]
    )
    losses = [v for _, v in seen["eval"]]  # type: ignore[misc]
    assert [s for s, _ in seen["eval"]] == [20, 40, 60]  # type: ignore[misc]
    assert losses[-1] < 0.6 * np.log(64)
    assert result.mfu is not None and 0 < result.mfu < 1  # type: ignore[attr-defined]
    assert len(seen["sample"]) == 1 and 0 < len(seen["sample"][0][0]) <= cfg.sample_tokens  # type: ignore[index]


def test_divergence_stops_with_a_clear_error(tokens: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        steps=20, batch_size=4, warmup_steps=0, lr=1e9, grad_clip=0.0, eval_every=20, checkpoint_every=20
    )
    with pytest.raises(TrainingDiverged, match=r"Lower pretrain\.lr"):
        run(tokens, tmp_path / "ck", cfg, config=dataclasses.replace(CONFIG, norm="layernorm"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Two ranks × two micro-batches of 2: the global batch of 8 split four ways.
DDP_CFG = TrainConfig(
    steps=4,
    batch_size=8,
    warmup_steps=0,
    micro_batch_size=2,
    eval_every=4,
    eval_batches=1,
    checkpoint_every=4,
)


def _ddp_worker(rank: int, world: int, port: int, tokens: str, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    model = fresh_model(dataclasses.replace(CONFIG, dropout=0.0))
    result = train(model, TokenShards(tokens, "train"), None, DDP_CFG, Path(out) / "ck", "fp", progress=False)
    if rank == 0:
        torch.save(
            {"losses": [h["loss"] for h in result.history], "state": model.state_dict()}, Path(out) / "r.pt"
        )
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_process_gloo_ddp_matches_one_process(tokens: Path, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tokens), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "r.pt", weights_only=True)
    single, result = run(tokens, tmp_path / "one", DDP_CFG, config=dataclasses.replace(CONFIG, dropout=0.0))
    np.testing.assert_allclose(ddp["losses"], [h["loss"] for h in result.history], rtol=1e-5)  # type: ignore[attr-defined]
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla T4", None),
    ],
)
def test_gpu_names_map_to_their_peak(name: str, key: str | None) -> None:
    assert accelerator_for(name) == key


def test_cuda_code_paths_run_on_cpu(tokens: Path, tmp_path: Path) -> None:
    """What a GPU run does differently, exercised here: bf16 autocast and fused AdamW."""
    model = fresh_model(dataclasses.replace(CONFIG, dropout=0.0))
    optimizer = loop_optimizer(model, TrainConfig(steps=1, batch_size=1), torch.device("cuda"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    cfg = TrainConfig(
        steps=3,
        batch_size=4,
        warmup_steps=0,
        precision="bf16",
        eval_every=3,
        eval_batches=1,
        checkpoint_every=3,
    )
    trained, result = run(tokens, tmp_path / "ck", cfg)
    assert math.isfinite(result.train_loss)  # type: ignore[attr-defined]
    assert all(p.dtype == torch.float32 for p in trained.parameters())  # master weights stay fp32


def test_muon_is_torchs_muon_in_fp32_on_cpu() -> None:
    """model/optim.Muon is torch.optim.Muon's algorithm; only the Newton-Schulz dtype differs (bf16 on
    CUDA, fp32 on CPU where bf16 matmuls are ~35× slower)."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(48, 16))
    theirs.data.copy_(ours.data)
    muon = Muon([{"params": [ours]}], lr=0.02)
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    muon.param_groups[0]["ns_dtype"] = torch.bfloat16  # as on CUDA: bitwise torch's
    for _ in range(3):
        gradient = torch.randn(48, 16)
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        muon.step()
        reference.step()
    assert torch.equal(ours, theirs)
    fp32 = orthogonalize(torch.randn(32, 64), steps=5, dtype=torch.float32)
    singular = torch.linalg.svdvals(fp32)
    assert fp32.dtype == torch.float32 and singular.min() > 0.5 and singular.max() < 1.5  # ~orthogonal


def test_muon_runs_the_hidden_matrices_and_adamw_the_rest(tokens: Path, tmp_path: Path) -> None:
    model = fresh_model(dataclasses.replace(CONFIG, dropout=0.0))
    optimizer = loop_optimizer(
        model, TrainConfig(steps=1, batch_size=1, optimizer="muon"), torch.device("cpu")
    )
    assert isinstance(optimizer, MuonAdamW)
    muon = optimizer.optimizers[0]
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in in_muon) == (name.startswith("blocks.") and parameter.dim() == 2), name
    cfg = TrainConfig(
        steps=6,
        batch_size=4,
        optimizer="muon",
        checkpoint_every=2,
        eval_every=6,
        eval_batches=1,
        warmup_steps=1,
    )
    reference, finished = run(tokens, tmp_path / "straight", cfg)
    with pytest.raises(KeyboardInterrupt):
        run(tokens, tmp_path / "killed", cfg, callbacks=KillAt(3))
    resumed, result = run(tokens, tmp_path / "killed", cfg)  # both optimizers' states come back
    assert result.resumed_from == 2  # type: ignore[attr-defined]
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert finished.val_loss < math.log(64)  # type: ignore[attr-defined]  # it learned


def test_the_gru_baseline_trains_in_the_same_loop(tokens: Path, tmp_path: Path) -> None:
    config = GRUConfig(vocab_size=64, n_embd=32, n_layer=2, block_size=16)
    torch.manual_seed(0)
    model = GRULM(config)
    cfg = TrainConfig(
        steps=30, batch_size=8, warmup_steps=2, eval_every=30, eval_batches=2, checkpoint_every=30
    )
    data = TokenShards(tokens, "train")
    result = train(model, data, TokenShards(tokens, "val"), cfg, tmp_path / "ck", "gru", progress=False)
    assert result.val_loss is not None and result.val_loss < 0.8 * math.log(64)  # learned the pattern
    assert result.mfu is None  # no peak given
    save_gru(model, tmp_path / "gru")
    again = load_gru(tmp_path / "gru")
    x = torch.from_numpy(data.tokens(0, 16).astype(np.int64))[None]
    torch.testing.assert_close(again(x)[0], model.eval()(x)[0], rtol=0, atol=0)


def test_the_progress_bar_does_not_write_a_line_per_step_to_a_log(
    tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a terminal (a log file, Prefect's log): the bar redraws every 30 s, not at every step (each
    line a Prefect log record: 5 per second slowed a 2-core pretraining by a third)."""
    cfg = TrainConfig(
        steps=40, batch_size=2, warmup_steps=1, eval_every=40, eval_batches=1, checkpoint_every=40
    )
    train(fresh_model(), TokenShards(tokens, "train"), None, cfg, tmp_path / "ck", "fp", progress=True)
    frames = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert 1 <= len(frames) <= 3  # the first frame, maybe one at 30 s, the last
