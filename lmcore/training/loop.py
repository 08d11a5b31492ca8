"""The training loop: prepared token files in, a model folder plus a resumable checkpoint out.

One loop serves a laptop and a GPU node: seeded random windows, AdamW (or Muon for the
hidden matrices), warmup + decay, clipping, gradient accumulation, bf16 autocast on CUDA,
optional ``torch.compile``, periodic evaluation, a step budget *and* a wall-clock budget,
atomic checkpoints every ``checkpoint_interval`` steps, ``resume`` after a crash, and DDP
when launched under ``torchrun`` (gloo on CPU, NCCL on GPU; rank 0 writes and prints).

Batches are a pure function of (seed, rank, step, micro-step), so a resumed run draws
exactly the batches the uninterrupted run would have drawn.

``train`` reads the prepared data, joins the process group and hands over to a ``_Trainer``:
``setup`` (model, probe choices, resume from a checkpoint, optimizers, DDP/compile), ``run``
(the step loop: log, eval and checkpoint points), ``finish`` (final eval, model/, summary).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
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
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from lmcore.config import to_dict
from lmcore.data.prepare import load_prepared, tokenizer_hash
from lmcore.data.tokenizer import Tokenizer
from lmcore.device import DTYPES, ThreadTuner, TrainingChoices, autocast_for, pick_device, training_choices
from lmcore.errors import LmopsError
from lmcore.machine import keep_freed_memory, release_freed_memory
from lmcore.model.base import check_fits_memory, load_base
from lmcore.model.checkpoint import WEIGHTS, atomic_dir, commit_dir, save_model, write_model_files
from lmcore.model.transformer import ModelConfig, Transformer
from lmcore.model.weights import tie_head
from lmcore.probe import model_step
from lmcore.training.lora import add_lora, has_lora, merge_lora, save_adapter
from lmcore.training.optimizers import build_optimizers, lr_multiplier, set_lr

if TYPE_CHECKING:
    from lmcore.config import ModelParams, TrainParams
    from lmcore.data.prepare import PreparedData
    from lmcore.data.tokenizer import Tokenizer
    from lmcore.model.transformer import ModelConfig

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

    box = [resolve() if d.main else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def _sync_scalar(value: float, d: _Dist, device: torch.device) -> float:
    """Rank 0's value on every rank: keeps time-based decisions identical across ranks."""
    if d.world == 1:
        return value

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


# ----------------------------------------------------------------------------- data


class Batches:
    """Random (x, y) windows of ``block`` tokens from a memmapped split; seeded per (rank, step).

    With a loss ``mask`` (chat data: 1 = a token the loss counts), targets outside it are -1 (the
    loss ignores them) and windows start only where at least one target counts, so no batch row
    is all prompt.
    """

    def __init__(self, ids: np.ndarray, block: int, batch: int, seed: int, device: torch.device,
                 mask: np.ndarray | None = None):
        self.ids, self.block, self.batch, self.seed, self.device, self.mask = ids, block, batch, seed, device, mask
        self.offsets = np.arange(block + 1)
        self.starts: np.ndarray | None = None
        if mask is not None:
            counted = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # counted[i] = targets before i
            s = np.arange(len(ids) - block)
            self.starts = s[counted[s + block + 1] - counted[s + 1] > 0]
            if len(self.starts) == 0:
                raise LmopsError("no training window holds a completion token: every token is masked prompt")

    def get(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = np.random.default_rng([self.seed, rank, step, micro])
        if self.starts is None:
            starts = g.integers(0, len(self.ids) - self.block, size=self.batch)  # (B,)
        else:
            starts = self.starts[g.integers(0, len(self.starts), size=self.batch)]
        rows = starts[:, None] + self.offsets
        win = torch.from_numpy(self.ids[rows].astype(np.int64))  # (B, T+1)
        y = win[:, 1:]
        if self.mask is not None:
            y = y.masked_fill(torch.from_numpy(self.mask[rows[:, 1:]] == 0), -1)
        x = win[:, :-1]
        if self.device.type == "cuda":
            x, y = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        return x, y  # (B, T), (B, T)


@torch.no_grad()
def estimate_val_loss(model: torch.nn.Module, val: np.ndarray, block: int, batch: int, iters: int, seed: int,
                      device: torch.device, amp: torch.dtype | None, mask: np.ndarray | None = None) -> float:
    """Mean loss over ``iters`` fixed random val batches (the same windows at every evaluation); no more
    batches than it takes to cover the val split once (a fine-tune's few hundred held-out chat tokens
    need one batch, not ten: each costs a forward pass over batch x block tokens)."""
    T = min(block, len(val) - 1)
    if T < 1:
        return float("nan")
    iters = min(iters, math.ceil(len(val) / (batch * T)))
    try:
        b = Batches(val, T, batch, seed, device, mask)
    except LmopsError:  # a val split of prompts only: nothing to score
        return float("nan")
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


def _say(line: str) -> None:
    """A line for the terminal (not ``print``: Prefect's ``log_prints`` would take it into the run log only)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None

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
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train from ``data_dir`` (a prepared folder) into ``out_dir`` (model/, checkpoint/, history.csv).

    ``on_metrics(step, metrics)`` runs on rank 0 at every log/eval point (MLflow hooks in here);
    ``on_model(model)`` runs on every rank with the trained, unwrapped model just before returning
    (in-memory evaluation for sweeps; DDP tests compare ranks with it); ``say(line)`` gets what rank 0
    tells people before the steps start (the probe, the fine-tuning budget; default: the terminal).
    """
    data = load_prepared(Path(data_dir))
    if data.train_tokens < model.block_size + 1:
        raise LmopsError(f"corpus too small: the train split has {data.train_tokens} tokens, fewer than one block "
                         f"(model.block_size={model.block_size}) + 1; add text or lower model.block_size")
    tokenizer = Tokenizer.load(data.dir / "tokenizer.json")
    d, device = _dist_setup(pick_device(train.device))
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on every step's activations
    threads = torch.get_num_threads()
    try:
        trainer = _Trainer.setup(data, tokenizer, Path(out_dir), model, train, d, device, resume=resume,
                                 dataset_version=dataset_version or data.dataset_version, on_metrics=on_metrics,
                                 say=(say or _say) if d.main and progress else None)
        stopped_by = trainer.run(progress=progress, threads=threads)
        return trainer.finish(stopped_by, on_model)
    finally:
        torch.set_num_threads(threads)  # the process's own setting again (ThreadTuner, train.threads)
        if d.owned:
            torch.distributed.destroy_process_group()
        trainer = None  # the model, optimizer states and batches go now, not when the caller's frame ends
        gc.collect()
        release_freed_memory()  # what keep_freed_memory kept for the next step goes back to the kernel


def _history_row(step: int, train_loss: float | None = None, val_loss: float | None = None,
                 lr: float | None = None, tokens_per_s: float | None = None) -> dict:
    return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr, "tokens_per_s": tokens_per_s}


@dataclass
class _Window:
    """Train loss and throughput since the last log point."""

    loss: torch.Tensor
    t0: float
    steps: int = 0
    tokens: int = 0


@dataclass
class _Trainer:
    """One training run: what setup builds (model, optimizers, batches; fixed) and what a step moves
    (step, tokens, elapsed, history: exactly what a checkpoint holds and ``resume`` restores)."""

    mp: ModelParams
    tp: TrainParams
    cfg: ModelConfig
    choices: TrainingChoices
    d: _Dist
    device: torch.device
    net: torch.nn.Module  # the model itself: weights, checkpoints, evaluation
    fwd: torch.nn.Module  # what the step calls: net, DDP-wrapped and/or compiled
    optimizers: list[torch.optim.Optimizer]
    tokenizer: Tokenizer
    batches: Batches
    val_ids: np.ndarray
    val_mask: np.ndarray | None
    out_dir: Path
    meta: dict  # written with every checkpoint and the final model
    on_metrics: Callable[[int, dict[str, float]], None] | None
    say: Callable[[str], None] | None = None  # rank 0: progress lines where no terminal bar shows (logs, Prefect)
    micro_rows: int = 0  # rows per forward/backward (micro_batch_rows); 0 = the whole batch
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training, across resumes
    history: list[dict] = dataclasses.field(default_factory=list)
    last_val: float | None = None
    last_train_loss: float = float("nan")

    # ------------------------------------------------------------------------- setup and resume

    @classmethod
    def setup(cls, data: PreparedData, tokenizer: Tokenizer, out_dir: Path, mp: ModelParams, tp: TrainParams,
              d: _Dist, device: torch.device, *, resume: bool, dataset_version: str | None,
              on_metrics: Callable[[int, dict[str, float]], None] | None,
              say: Callable[[str], None] | None = None) -> _Trainer:
        """The model (seeded, or a pretrained base with LoRA adapters if asked), the training choices
        (rank 0's), a checkpoint's state when resuming, the optimizers, the DDP/compile wrapping and the
        batch source."""
        if mp.base and tp.optimizer == "auto":  # Muon is for training from scratch; fine-tuning uses AdamW
            tp = dataclasses.replace(tp, optimizer="adamw")
        net, base = _initial_model(mp, tp, data)
        cfg = net.cfg
        seq = min(mp.block_size, cfg.block_size)  # the training window: a base's whole context is never trained
        if base is not None:
            tp = _finetune_budget(tp, data.train_tokens, seq, d.world, say=say)
        ckpt = find_checkpoint(out_dir) if resume else None  # a checkpoint that does not fit fails before the probe
        if resume and ckpt is None and d.main:
            print(f"no checkpoint in {out_dir}: starting from step 0", file=sys.stderr)
        state = _resume_model(ckpt, net, cfg, device) if ckpt is not None else {}
        choices = _rank0_choices(lambda: training_choices(
            device, tp, cfg, window=seq, lora_r=tp.lora_r if has_lora(net) else 0, step=model_step(net),
            say=say), d, device)
        if state:
            choices = _resumed_choices(choices, state.get("choices", {}), tp)
        net.to(device)
        optimizers = _optimizers(net, tp, choices, state.get("optimizers"), ckpt)
        meta = {
            "dataset_version": dataset_version,
            "tokenizer_hash": data.meta.get("tokenizer_hash"),
            "data_dir": str(data.dir.resolve()),
            "train": to_dict(tp),
        }
        if base is not None:
            meta.update(base=base, finetune="lora" if tp.lora_r else "full")
        meta["window"] = seq  # evaluation and the gate score in the window the model was trained in
        t = cls(mp=mp, tp=tp, cfg=cfg, choices=choices, d=d, device=device, net=net, fwd=_wrap(net, tp, d, device),
                optimizers=optimizers, tokenizer=tokenizer,
                batches=Batches(data.tokens("train"), seq, tp.batch_size, tp.seed, device, data.loss_mask("train")),
                val_ids=data.tokens("val"), val_mask=data.loss_mask("val"), out_dir=out_dir, meta=meta,
                on_metrics=on_metrics, say=say, micro_rows=micro_batch_rows(cfg, tp, seq))
        if state:
            t.step, t.tokens = int(state["step"]), int(state.get("tokens", 0))
            t.elapsed = float(state.get("elapsed", 0.0))
            t.history = [r for r in state.get("history", []) if r["step"] <= t.step]
        if t.history and t.history[-1].get("val_loss"):
            t.last_val = t.history[-1]["val_loss"]
        return t

    @property
    def dataset_version(self) -> str | None:
        return self.meta["dataset_version"]

    def state_dict(self) -> dict:
        """What a checkpoint holds beside the weights: enough to continue as if never stopped."""
        st = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "model": self.cfg.to_dict(),
              "optimizers": [o.state_dict() for o in self.optimizers], "rng_cpu": torch.get_rng_state(),
              "dataset_version": self.dataset_version, "train": to_dict(self.tp), "history": self.history,
              "world_size": self.d.world, "choices": self.choices.to_dict()}
        if self.device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def checkpoint(self) -> None:
        """Rank 0 writes checkpoint/ and history.csv; every rank waits for it."""
        if self.d.main:
            save_checkpoint(self.out_dir / "checkpoint", self.net, self.tokenizer, {**self.meta, "step": self.step},
                            self.state_dict())
            _write_history(self.out_dir / "history.csv", self.history)
        if self.d.world > 1:
            torch.distributed.barrier()

    def evaluate(self) -> float:
        return estimate_val_loss(self.net, self.val_ids, self.batches.block, self.tp.batch_size, self.tp.eval_iters,
                                 self.tp.seed + 7, self.device, self.choices.autocast, self.val_mask)

    # ------------------------------------------------------------------------- the loop

    def run(self, *, progress: bool, threads: int) -> str:
        """Step until ``train.max_steps`` or the wall-clock budget; returns what stopped it."""
        tp, d = self.tp, self.d
        budget_s = tp.max_minutes * 60.0
        per_step_tokens = tp.batch_size * self.batches.block * tp.grad_accum * d.world
        show = progress and d.main
        bar = _progress_bar(show and sys.stderr.isatty(), tp.max_steps, self.step)
        self.fwd.train()
        if tp.threads:
            torch.set_num_threads(tp.threads)
        tuner = ThreadTuner(threads) if (self.device.type == "cpu" and d.world == 1 and not tp.threads
                                         and threads > 1) else None
        t0 = time.perf_counter()
        elapsed_before = self.elapsed
        window = _Window(torch.zeros((), device=self.device), t0)
        stopped_by = "max_steps"
        while self.step < tp.max_steps:
            frac = self.step / tp.max_steps
            if budget_s > 0:
                frac = max(frac, self.elapsed / budget_s)
            set_lr(self.optimizers, lr_multiplier(self.step, frac, tp))
            if tuner:
                tuner.before_step()
            self.optimizer_step(window)
            if tuner:
                tuner.after_step()
            self.step += 1
            self.tokens += per_step_tokens
            window.steps += 1
            window.tokens += per_step_tokens
            self.elapsed = _sync_scalar(elapsed_before + time.perf_counter() - t0, d, self.device)
            out_of_time = budget_s > 0 and self.elapsed >= budget_s
            last = self.step >= tp.max_steps or out_of_time
            if self.step % tp.log_interval == 0 or last:
                self.log(window, bar)
            if (tp.eval_interval and self.step % tp.eval_interval == 0) or last:
                self.eval_point(say=show and bar is None)
            if bar is not None:
                bar.update(1)
            if (tp.checkpoint_interval and self.step % tp.checkpoint_interval == 0) or last:
                self.checkpoint()
            if out_of_time:
                stopped_by = "max_minutes"
                break
        if bar is not None:
            bar.close()
        if tuner:
            self.choices = dataclasses.replace(self.choices, threads=tuner.current, thread_switches=tuner.switches)
        elif tp.threads:
            self.choices = dataclasses.replace(self.choices, threads=tp.threads)
        return stopped_by

    def optimizer_step(self, window: _Window) -> None:
        """One optimizer step over ``train.grad_accum`` batches, each run ``micro_rows`` rows at a time with
        every chunk's loss weighted by its share of the batch's counted targets: the batch's own gradient,
        with a chunk's activations alive at a time (DDP syncs gradients on the last chunk)."""
        tp, d, fwd = self.tp, self.d, self.fwd
        for micro in range(tp.grad_accum):
            x, y = self.batches.get(self.step, micro, d.rank)
            counted = max(int((y != -1).sum()), 1)
            chunks = list(zip(x.split(self.micro_rows), y.split(self.micro_rows), strict=True))
            for i, (xc, yc) in enumerate(chunks):
                last = micro == tp.grad_accum - 1 and i == len(chunks) - 1
                share = int((yc != -1).sum()) / counted
                if share == 0:  # every target of these rows is masked prompt: no loss, no gradient
                    continue
                with nullcontext() if (d.world == 1 or last) else fwd.no_sync():
                    with _autocast(self.device, self.choices.autocast):
                        _, loss = fwd(xc, yc)
                    (loss * share / tp.grad_accum).backward()
                window.loss += loss.detach() * share / tp.grad_accum
        if tp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), tp.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def log(self, window: _Window, bar) -> None:
        """A log point: the window's mean train loss and tokens/s into the history, MLflow and the bar."""
        now = time.perf_counter()
        self.last_train_loss = float(window.loss.item()) / window.steps
        tps = window.tokens / max(now - window.t0, 1e-9)
        lr = self.optimizers[-1].param_groups[0]["lr"]
        self.history.append(_history_row(self.step, round(self.last_train_loss, 6), None, lr, round(tps, 1)))
        if self.on_metrics and self.d.main:
            self.on_metrics(self.step, {"train_loss": self.last_train_loss, "lr": lr, "tokens_per_s": tps})
        if bar is not None:
            bar.set_postfix(loss=f"{self.last_train_loss:.3f}", tok_s=f"{tps:,.0f}")
        elif self.say:
            self.say(f"train {self.step}/{self.tp.max_steps} steps: loss {self.last_train_loss:.4f}, {tps:,.0f} "
                     f"tok/s ({self.elapsed:.0f} s, ETA {self._eta():.0f} s)")
        window.loss.zero_()
        window.steps, window.t0, window.tokens = 0, now, 0

    def _eta(self) -> float:
        """Seconds left: the steps still to go at the pace so far, or the wall-clock budget left if sooner."""
        left = (self.tp.max_steps - self.step) * self.elapsed / max(self.step, 1)
        if self.tp.max_minutes > 0:
            left = min(left, max(self.tp.max_minutes * 60.0 - self.elapsed, 0.0))
        return left

    def eval_point(self, *, say: bool) -> None:
        """An evaluation point: val loss into this step's history row (or a row of its own) and MLflow."""
        self.last_val = self.evaluate()
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1]["val_loss"] = round(self.last_val, 6)
        else:
            self.history.append(_history_row(self.step, val_loss=round(self.last_val, 6)))
        if self.on_metrics and self.d.main:
            self.on_metrics(self.step, {"val_loss": self.last_val})
        if say:
            (self.say or _say)(f"step {self.step}/{self.tp.max_steps} train_loss {self.last_train_loss:.4f} "
                               f"val_loss {self.last_val:.4f} ({self.elapsed:.0f}s)")

    # ------------------------------------------------------------------------- finish

    def finish(self, stopped_by: str, on_model: Callable[[torch.nn.Module], None] | None) -> TrainResult:
        """The final evaluation (when the loop ran no step), model/, train_summary.json, the result."""
        history = self.history
        if self.step == 0 or not history or history[-1]["step"] != self.step:  # resumed at/after the budget
            self.last_val = self.evaluate()
            if not history or history[-1]["step"] != self.step:
                history.append(_history_row(self.step, val_loss=round(self.last_val, 6)))
            self.checkpoint()
        if math.isnan(self.last_train_loss):
            self.last_train_loss = next((r["train_loss"] for r in reversed(history)
                                         if r.get("train_loss") is not None), float("nan"))
        out_dir, d = self.out_dir, self.d
        model_dir = out_dir / "model"
        result = TrainResult(out_dir=out_dir, model_dir=model_dir, steps=self.step, tokens=self.tokens,
                             seconds=round(self.elapsed, 3), final_train_loss=self.last_train_loss,
                             final_val_loss=self.last_val, history_csv=out_dir / "history.csv",
                             stopped_by=stopped_by, choices=self.choices.to_dict())
        if has_lora(self.net):  # the adapter alone, then merged into the weights every reader of model/ expects
            if d.main:
                save_adapter(self.net, out_dir / "adapter", self.meta.get("base"))
            merge_lora(self.net)
        if d.main:
            save_model(model_dir, self.net, self.tokenizer, {**self.meta, "step": self.step,
                                                             "final_val_loss": self.last_val})
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
            summary.update(model=self.cfg.to_dict(), params=to_dict(self.tp), dataset_version=self.dataset_version,
                           world_size=d.world, device=str(self.device), num_params=self.net.num_params(),
                           autocast=self.choices.dtype_name)
            tmp = out_dir / ".train_summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(out_dir / "train_summary.json")
        if on_model is not None:
            on_model(self.net)
        if d.world > 1:
            torch.distributed.barrier()
        return result


ACTIVATION_BUDGET_BYTES = 512 << 20  # train.micro_batch auto: one forward/backward's activations stay under this


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """What one token's forward keeps for the backward, roughly: per layer ~10 residual-width tensors
    (norms, q|k|v, attention out, projections) and ~3 hidden-width ones (gate|up), in fp32."""
    return cfg.n_layer * (10 * cfg.d_model + 3 * cfg.hidden) * 4


def micro_batch_rows(cfg: ModelConfig, tp: TrainParams, window: int) -> int:
    """Rows per forward/backward: ``train.micro_batch``, else (auto) the whole batch unless its activations
    would pass ``ACTIVATION_BUDGET_BYTES``. Why: a 30-layer base at 16 x 128 keeps ~2.5 GB of activations
    (over half a LoRA fine-tune's peak memory); a third of the rows at a time does the same arithmetic in
    products still hundreds of rows tall. lmops' default model (4 x 128) keeps ~130 MB: one chunk."""
    if tp.micro_batch:
        return min(tp.micro_batch, tp.batch_size)
    per_row = activation_bytes_per_token(cfg) * window
    return max(1, min(tp.batch_size, ACTIVATION_BUDGET_BYTES // per_row))


def _finetune_budget(tp: TrainParams, train_tokens: int, window: int, world: int,
                     say: Callable[[str], None] | None = None) -> TrainParams:
    """A base run's budget: ``train.finetune_epochs`` passes over the fine-tuning tokens (``max_steps`` caps
    it), bounded by ``train.finetune_max_minutes`` instead of ``max_minutes``, with warmup at most a tenth.

    Why not the from-scratch budget: 600 steps or 2 minutes is ~60 epochs of a few hundred chats
    (overfitting them) on a fast machine and a fraction of one on a slow one; an epoch means the same
    on both.
    """
    steps = tp.max_steps
    if tp.finetune_epochs > 0:
        per_step = tp.batch_size * window * tp.grad_accum * world
        steps = max(1, min(tp.max_steps, math.ceil(tp.finetune_epochs * train_tokens / per_step)))
    warmup = min(tp.warmup_steps, steps // 10)
    log_interval = max(1, min(tp.log_interval, steps // 10))  # ~10 progress lines however short the run
    if say:
        limit = f"at most {tp.finetune_max_minutes:g} min" if tp.finetune_max_minutes else "no time limit"
        say(f"fine-tuning budget: {tp.finetune_epochs:g} epoch(s) of {train_tokens:,} tokens = {steps} steps of "
            f"{tp.batch_size} x {window} tokens (train.finetune_epochs; max_steps {tp.max_steps} caps it), {limit}, "
            f"warmup {warmup}")
    return dataclasses.replace(tp, max_steps=steps, max_minutes=tp.finetune_max_minutes, warmup_steps=warmup,
                               log_interval=log_interval)


def _initial_model(mp: ModelParams, tp: TrainParams, data: PreparedData) -> tuple[torch.nn.Module, dict | None]:
    """A fresh model from the params, or ``model.base`` (logits checked against transformers) with LoRA
    adapters when ``train.lora_r`` > 0; the base's lineage (None without one)."""
    if not mp.base:
        return _new_model(ModelConfig.from_params(mp, data.vocab_size), tp), None
    check_fits_memory(mp.base, tp.lora_r)  # before the minutes of loading and probing, not an OOM kill after
    net, tokenizer, info = load_base(mp.base)
    if tokenizer_hash(tokenizer) != data.meta.get("tokenizer_hash"):
        raise LmopsError(f"prepared data in {data.dir} was not tokenized with base {mp.base}'s tokenizer: "
                         "prepare it with model.base set (lmops run --base does)")
    net.train()
    return (add_lora(net, tp) if tp.lora_r else net), info.to_dict()


def _new_model(cfg: ModelConfig, tp: TrainParams) -> torch.nn.Module:
    """A freshly initialised model from ``train.seed`` (residual projections zeroed if asked)."""
    torch.manual_seed(tp.seed)
    net = Transformer(cfg)
    if tp.zero_init_residual:
        for name, p in net.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                torch.nn.init.zeros_(p)
    return net


def _resume_model(ckpt: Path, net: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> dict:
    """Load a checkpoint's weights into ``net`` and its RNG states into torch; return its trainer state."""
    weights, state = load_checkpoint(ckpt)
    if state["model"] != cfg.to_dict():
        diff = sorted(k for k in cfg.to_dict() if state["model"].get(k) != cfg.to_dict()[k])
        raise LmopsError(f"checkpoint {ckpt} does not match the model params ({', '.join(diff)} differ); "
                         f"train into a fresh --out or restore those params")
    tie_head(weights, cfg)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise LmopsError(f"checkpoint {ckpt} weights do not match its config: "
                         f"{str(e).splitlines()[0]}") from None
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state


def _resumed_choices(now: TrainingChoices, began: dict, tp: TrainParams) -> TrainingChoices:
    """What ``auto`` meant when the run began, kept on resume: a run continues as it started, not as the
    probe (re-measured on a busy machine, or after a cache clear) would decide today.

    The optimizer is always kept (its state must load). Precision is kept only on the same kind of
    device and CPU class: a checkpoint moved from an AMX Xeon to an AVX2-only host must not keep bf16.
    """
    if tp.optimizer == "auto" and began.get("optimizer"):
        now = dataclasses.replace(now, optimizer=began["optimizer"])
    same_machine = (began.get("source"), began.get("cpu_class")) == (now.source, now.to_dict().get("cpu_class"))
    if not same_machine:
        return now
    if tp.dtype == "auto" and began.get("dtype") in DTYPES:
        now = dataclasses.replace(now, autocast=autocast_for(DTYPES[began["dtype"]]))
    if began.get("muon_ns_dtype") in DTYPES:
        now = dataclasses.replace(now, muon_ns_dtype=DTYPES[began["muon_ns_dtype"]])
    return now


def _optimizers(net: torch.nn.Module, tp: TrainParams, choices: TrainingChoices, states: list | None,
                ckpt: Path | None) -> list[torch.optim.Optimizer]:
    """The optimizers the choices name, with a checkpoint's states loaded into them when resuming."""
    optimizers = build_optimizers(net, tp, choices.optimizer, choices.muon_ns_dtype)
    if states is not None:
        if len(states) != len(optimizers):
            raise LmopsError(f"checkpoint {ckpt} was written with another optimizer than "
                             f"{choices.optimizer}; resume with that train.optimizer")
        for opt, st in zip(optimizers, states, strict=True):
            try:
                opt.load_state_dict(st)
            except (ValueError, KeyError) as e:
                raise LmopsError(f"checkpoint {ckpt} optimizer state does not fit: {e}") from None
    return optimizers


def _wrap(net: torch.nn.Module, tp: TrainParams, d: _Dist, device: torch.device) -> torch.nn.Module:
    """What the training step calls: ``net`` in DDP under torchrun, compiled with ``train.compile``."""
    fwd: torch.nn.Module = net
    if d.world > 1:
        fwd = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    if tp.compile:
        fwd = torch.compile(fwd)
    return fwd
