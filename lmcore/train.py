"""The training loop: prepared token files in, a model folder plus a resumable checkpoint out.

One loop serves a laptop and a GPU node: seeded random windows, AdamW (or Muon for the
hidden matrices), warmup + decay, clipping, gradient accumulation, bf16 autocast on CUDA,
optional ``torch.compile``, periodic evaluation, a step budget *and* a wall-clock budget,
atomic checkpoints every ``checkpoint_interval`` steps, ``resume`` after a crash, and DDP
when launched under ``torchrun`` (gloo on CPU, NCCL on GPU; rank 0 writes and prints).

Batches are a pure function of (seed, rank, step, micro-step), so a resumed run draws
exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmcore.errors import LmopsError

if TYPE_CHECKING:
    from lmcore.config import ModelParams, TrainParams
    from lmcore.device import TrainingChoices

STATE = "trainer_state.pt"
HISTORY_FIELDS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s")


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    tokens: int
    seconds: float
    final_train_loss: float
    final_val_loss: float | None
    history_csv: Path
    stopped_by: str  # "max_steps" | "max_minutes"
    choices: dict  # resolved dtype / optimizer / Muon precision and where they came from (lmcore.device)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: torch.device) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return _Dist(), device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local, owned), device


def _rank0_choices(resolve: Callable[[], TrainingChoices], d: _Dist, device: torch.device) -> TrainingChoices:
    """Rank 0 resolves the training choices and every rank takes them: ranks probing at once on
    shared cores would slow each other's timings and could disagree on a close call."""
    if d.world == 1:
        return resolve()
    import torch.distributed as dist

    box = [resolve() if d.main else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def _sync_scalar(value: float, d: _Dist, device: torch.device) -> float:
    """Rank 0's value on every rank: keeps time-based decisions identical across ranks."""
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


# ----------------------------------------------------------------------------- data


class Batches:
    """Random (x, y) windows of ``block`` tokens from a memmapped split; seeded per (rank, step)."""

    def __init__(self, ids: np.ndarray, block: int, batch: int, seed: int, device: torch.device):
        self.ids, self.block, self.batch, self.seed, self.device = ids, block, batch, seed, device
        self.offsets = np.arange(block + 1)

    def get(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = np.random.default_rng([self.seed, rank, step, micro])
        starts = g.integers(0, len(self.ids) - self.block, size=self.batch)  # (B,)
        win = torch.from_numpy(self.ids[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            win = win.pin_memory().to(self.device, non_blocking=True)
        return win[:, :-1], win[:, 1:]  # (B, T), (B, T)


@torch.no_grad()
def estimate_val_loss(model: torch.nn.Module, val: np.ndarray, block: int, batch: int, iters: int, seed: int,
                      device: torch.device, amp: torch.dtype | None) -> float:
    """Mean loss over ``iters`` fixed random val windows (the same windows at every evaluation)."""
    T = min(block, len(val) - 1)
    if T < 1:
        return float("nan")
    b = Batches(val, T, batch, seed, device)
    was_training = model.training
    model.eval()
    losses = []
    for i in range(max(iters, 1)):
        x, y = b.get(10**6 + i)
        with _autocast(device, amp):
            _, loss = model(x, y)
        losses.append(float(loss.item()))
    model.train(was_training)
    return sum(losses) / len(losses)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, model: torch.nn.Module, tokenizer, meta: dict, state: dict) -> Path:
    """Weights (safetensors), config, tokenizer and trainer state, renamed into place only when complete."""
    from lmcore.checkpoint import atomic_dir, commit_dir, write_model_files

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(folder)
    try:
        write_model_files(tmp, model, tokenizer, meta)
        torch.save(state, tmp / STATE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, folder)


def find_checkpoint(out_dir: Path) -> Path | None:
    """``out_dir/checkpoint``, or the previous one if a crash hit between the two renames of a commit."""
    ckpt = out_dir / "checkpoint"
    if (ckpt / STATE).is_file():
        return ckpt
    olds = sorted(out_dir.glob(".checkpoint.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in olds if (p / STATE).is_file()), None)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, trainer state) of a checkpoint; no pickle (``weights_only=True``); one-line errors."""
    from safetensors.torch import load_file

    from lmcore.checkpoint import WEIGHTS

    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:
        raise LmopsError(f"checkpoint {folder} is corrupt: cannot read {WEIGHTS} ({str(e).splitlines()[0]})") from None
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LmopsError(f"checkpoint {folder} is corrupt: cannot read {STATE} ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise LmopsError(f"checkpoint {folder} is corrupt: {STATE} lacks step/model")
    return weights, state


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in HISTORY_FIELDS})
    tmp.replace(path)


# ----------------------------------------------------------------------------- the loop


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True, file=sys.stderr)


def train(
    data_dir: Path,
    out_dir: Path,
    model: ModelParams,
    train: TrainParams,
    *,
    resume: bool = False,
    progress: bool = True,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    dataset_version: str | None = None,
    on_model: Callable[[torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train from ``data_dir`` (a prepared folder) into ``out_dir`` (model/, checkpoint/, history.csv).

    ``on_metrics(step, metrics)`` runs on rank 0 at every log/eval point (MLflow hooks in here);
    ``on_model(model)`` runs on every rank with the trained, unwrapped model just before returning
    (in-memory evaluation for sweeps; DDP tests compare ranks with it).
    """
    from lmcore.checkpoint import save_model
    from lmcore.config import to_dict
    from lmcore.device import ThreadTuner, pick_device, training_choices
    from lmcore.model import ModelConfig, Transformer
    from lmcore.optim import build_optimizers, lr_multiplier, set_lr
    from lmcore.prepare import load_prepared
    from lmcore.tokenizer import Tokenizer

    mp, tp = model, train
    out_dir = Path(out_dir)
    data = load_prepared(Path(data_dir))
    dataset_version = dataset_version or data.dataset_version
    train_ids, val_ids = data.tokens("train"), data.tokens("val")
    if len(train_ids) < mp.block_size + 1:
        raise LmopsError(f"corpus too small: the train split has {len(train_ids)} tokens, fewer than one block "
                         f"(model.block_size={mp.block_size}) + 1; add text or lower model.block_size")
    tokenizer = Tokenizer.load(data.dir / "tokenizer.json")

    d, device = _dist_setup(pick_device(tp.device))
    threads = torch.get_num_threads()
    try:
        cfg = ModelConfig.from_params(mp, data.vocab_size)
        choices = _rank0_choices(lambda: training_choices(device, tp, cfg), d, device)
        amp = choices.autocast
        torch.manual_seed(tp.seed)
        net = Transformer(cfg)
        if tp.zero_init_residual:
            for name, p in net.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                    torch.nn.init.zeros_(p)

        step, tokens, elapsed_before, history = 0, 0, 0.0, []
        ckpt = find_checkpoint(out_dir) if resume else None
        opt_states = None
        if resume and ckpt is None and d.main:
            print(f"no checkpoint in {out_dir}: starting from step 0", file=sys.stderr)
        if ckpt is not None:
            weights, state = load_checkpoint(ckpt)
            if state["model"] != cfg.to_dict():
                diff = sorted(k for k in cfg.to_dict() if state["model"].get(k) != cfg.to_dict()[k])
                raise LmopsError(f"checkpoint {ckpt} does not match the model params ({', '.join(diff)} differ); "
                                 f"train into a fresh --out or restore those params")
            if cfg.tie_embeddings:
                weights.setdefault("lm_head.weight", weights.get("embed.weight"))
            try:
                net.load_state_dict(weights, strict=True)
            except RuntimeError as e:
                raise LmopsError(f"checkpoint {ckpt} weights do not match its config: "
                                 f"{str(e).splitlines()[0]}") from None
            step, tokens = int(state["step"]), int(state.get("tokens", 0))
            elapsed_before = float(state.get("elapsed", 0.0))
            history = [r for r in state.get("history", []) if r["step"] <= step]
            opt_states = state.get("optimizers")
            if tp.optimizer == "auto" and state.get("choices", {}).get("optimizer"):  # keep what auto meant
                choices = dataclasses.replace(choices, optimizer=state["choices"]["optimizer"])
            if "rng_cpu" in state:
                torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"], device)

        net.to(device)
        optimizers = build_optimizers(net, tp, choices.optimizer, choices.muon_ns_dtype)
        if opt_states is not None:
            if len(opt_states) != len(optimizers):
                raise LmopsError(f"checkpoint {ckpt} was written with another optimizer than "
                                 f"{choices.optimizer}; resume with that train.optimizer")
            for opt, st in zip(optimizers, opt_states, strict=True):
                try:
                    opt.load_state_dict(st)
                except (ValueError, KeyError) as e:
                    raise LmopsError(f"checkpoint {ckpt} optimizer state does not fit: {e}") from None

        fwd: torch.nn.Module = net
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        if tp.compile:
            fwd = torch.compile(fwd)

        meta = {
            "dataset_version": dataset_version,
            "tokenizer_hash": data.meta.get("tokenizer_hash"),
            "data_dir": str(data.dir.resolve()),
            "train": to_dict(tp),
        }
        budget_s = tp.max_minutes * 60.0
        batches = Batches(train_ids, mp.block_size, tp.batch_size, tp.seed, device)
        per_step_tokens = tp.batch_size * mp.block_size * tp.grad_accum * d.world
        show = progress and d.main
        bar = _progress_bar(show and sys.stderr.isatty(), tp.max_steps, step)
        last_val: float | None = history[-1]["val_loss"] if history and history[-1].get("val_loss") else None

        def state_dict() -> dict:
            st = {"step": step, "tokens": tokens, "elapsed": elapsed, "model": cfg.to_dict(),
                  "optimizers": [o.state_dict() for o in optimizers], "rng_cpu": torch.get_rng_state(),
                  "dataset_version": dataset_version, "train": to_dict(tp), "history": history,
                  "world_size": d.world, "choices": choices.to_dict()}
            if device.type == "cuda":
                st["rng_cuda"] = torch.cuda.get_rng_state(device)
            return st

        def checkpoint() -> None:
            if d.main:
                save_checkpoint(out_dir / "checkpoint", net, tokenizer, {**meta, "step": step}, state_dict())
                _write_history(out_dir / "history.csv", history)
            if d.world > 1:
                torch.distributed.barrier()

        def evaluate_now() -> float:
            return estimate_val_loss(net, val_ids, mp.block_size, tp.batch_size, tp.eval_iters, tp.seed + 7,
                                     device, amp)

        fwd.train()
        if tp.threads:
            torch.set_num_threads(tp.threads)
        tuner = ThreadTuner(threads) if (device.type == "cpu" and d.world == 1 and not tp.threads
                                         and threads > 1) else None
        t0 = time.perf_counter()
        elapsed = elapsed_before
        window_loss = torch.zeros((), device=device)
        window_steps, window_t0, window_tokens = 0, t0, 0
        last_train_loss = float("nan")
        stopped_by = "max_steps"
        while step < tp.max_steps:
            frac = step / tp.max_steps
            if budget_s > 0:
                frac = max(frac, elapsed / budget_s)
            set_lr(optimizers, lr_multiplier(step, frac, tp))
            if tuner:
                tuner.before_step()
            for micro in range(tp.grad_accum):
                x, y = batches.get(step, micro, d.rank)
                sync = nullcontext() if (d.world == 1 or micro == tp.grad_accum - 1) else fwd.no_sync()
                with sync:
                    with _autocast(device, amp):
                        _, loss = fwd(x, y)
                    (loss / tp.grad_accum).backward()
                window_loss += loss.detach() / tp.grad_accum
            if tp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tp.grad_clip)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if tuner:
                tuner.after_step()
            step += 1
            tokens += per_step_tokens
            window_steps += 1
            window_tokens += per_step_tokens
            elapsed = _sync_scalar(elapsed_before + time.perf_counter() - t0, d, device)
            out_of_time = budget_s > 0 and elapsed >= budget_s
            last = step >= tp.max_steps or out_of_time

            if step % tp.log_interval == 0 or last:
                now = time.perf_counter()
                last_train_loss = float(window_loss.item()) / window_steps
                tps = window_tokens / max(now - window_t0, 1e-9)
                lr = optimizers[-1].param_groups[0]["lr"]
                history.append({"step": step, "train_loss": round(last_train_loss, 6), "val_loss": None,
                                "lr": lr, "tokens_per_s": round(tps, 1)})
                if on_metrics and d.main:
                    on_metrics(step, {"train_loss": last_train_loss, "lr": lr, "tokens_per_s": tps})
                if bar is not None:
                    bar.set_postfix(loss=f"{last_train_loss:.3f}", tok_s=f"{tps:,.0f}")
                window_loss.zero_()
                window_steps, window_t0, window_tokens = 0, now, 0
            if (tp.eval_interval and step % tp.eval_interval == 0) or last:
                last_val = evaluate_now()
                if history and history[-1]["step"] == step:
                    history[-1]["val_loss"] = round(last_val, 6)
                else:
                    history.append({"step": step, "train_loss": None, "val_loss": round(last_val, 6),
                                    "lr": None, "tokens_per_s": None})
                if on_metrics and d.main:
                    on_metrics(step, {"val_loss": last_val})
                if show and bar is None:
                    print(f"step {step}/{tp.max_steps} train_loss {last_train_loss:.4f} val_loss {last_val:.4f} "
                          f"({elapsed:.0f}s)", file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(1)
            if (tp.checkpoint_interval and step % tp.checkpoint_interval == 0) or last:
                checkpoint()
            if out_of_time:
                stopped_by = "max_minutes"
                break
        if bar is not None:
            bar.close()
        if tuner:
            choices = dataclasses.replace(choices, threads=tuner.current, thread_switches=tuner.switches)
        elif tp.threads:
            choices = dataclasses.replace(choices, threads=tp.threads)
        if step == 0 or not history or history[-1]["step"] != step:  # resumed at/after the budget
            last_val = evaluate_now()
            if not history or history[-1]["step"] != step:
                history.append({"step": step, "train_loss": None, "val_loss": round(last_val, 6),
                                "lr": None, "tokens_per_s": None})
            checkpoint()
        if math.isnan(last_train_loss):
            last_train_loss = next((r["train_loss"] for r in reversed(history) if r.get("train_loss") is not None),
                                   float("nan"))

        model_dir = out_dir / "model"
        result = TrainResult(out_dir=out_dir, model_dir=model_dir, steps=step, tokens=tokens, seconds=round(elapsed, 3),
                             final_train_loss=last_train_loss, final_val_loss=last_val,
                             history_csv=out_dir / "history.csv", stopped_by=stopped_by,
                             choices=choices.to_dict())
        if d.main:
            save_model(model_dir, net, tokenizer, {**meta, "step": step, "final_val_loss": last_val})
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
            summary.update(model=cfg.to_dict(), params=to_dict(tp), dataset_version=dataset_version,
                           world_size=d.world, device=str(device), num_params=net.num_params(),
                           autocast=choices.dtype_name)
            tmp = out_dir / ".train_summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(out_dir / "train_summary.json")
        if on_model is not None:
            on_model(net)
        if d.world > 1:
            torch.distributed.barrier()
        return result
    finally:
        torch.set_num_threads(threads)  # the process's own setting again (ThreadTuner, train.threads)
        if d.owned:
            torch.distributed.destroy_process_group()
