"""Where tensors live and in which precision: one rule for train, evaluate and serve.

``auto`` means the first CUDA device when there is one, else the CPU. What ``train.dtype: auto``
and ``train.optimizer: auto`` mean is decided by :func:`training_choices`: on CUDA, bf16 autocast
(where supported) and Muon with its bf16 iteration; on a CPU, whatever :mod:`lmcore.probe`
measured to be faster on this machine at this model's shapes. That matters in both directions:
on a 2-core AMX Xeon bf16 training steps were 1.3-2x faster than fp32 from 128 wide, on a 2-core
AVX2-only EPYC bf16 matrix products run at 1-3 GFLOP/s against ~80 for fp32. CPU bf16 training
needs ``lmcore.model.transformer``'s plain-matmul attention: with SDPA's fused CPU kernel the bf16 backward
alone took half the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lmcore.errors import LmopsError
from lmcore.probe import Shape, StepFactory, probe


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable ``torch.device``; one-line error otherwise."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LmopsError(f"device '{name}' requested but CUDA is not available (use 'auto' or 'cpu')")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmopsError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
        return dev
    raise LmopsError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TrainingChoices:
    """What ``lmops train`` runs with on this device: resolved ``auto`` params and why."""

    autocast: torch.dtype | None  # None = plain float32
    optimizer: str  # "adamw" | "muon"
    muon_ns_dtype: torch.dtype
    source: str  # "params", "cuda" or "probe": where the answers came from
    probe: dict | None = None  # the probe's measurements and decisions, when one was used
    threads: int = 0  # CPU threads training ended on (0 = not tuned: torch's own setting)
    thread_switches: int = 0  # how often the ThreadTuner changed its mind

    @property
    def dtype_name(self) -> str:
        return str(self.autocast).removeprefix("torch.") if self.autocast else "float32"

    def to_dict(self) -> dict:
        """Flat and JSON-friendly: the train summary, the MLflow run and ``lmops info`` show these."""
        out = {"dtype": self.dtype_name, "optimizer": self.optimizer,
               "muon_ns_dtype": str(self.muon_ns_dtype).removeprefix("torch."), "source": self.source}
        if self.threads:
            out.update(threads=self.threads, thread_switches=self.thread_switches)
        if self.probe:
            d, m = self.probe["decisions"], self.probe["measurements"]
            out.update(cpu=self.probe["machine"]["cpu"], cpu_class=self.probe["machine"]["cpu_class"],
                       fp32_gflops=m["fp32_gflops"], bf16_gflops=m["bf16_gflops"],
                       muon_overhead=d["muon_overhead"])
        return out


def autocast_for(dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype that trains in ``dtype``: None for plain float32 (no autocast at all)."""
    return None if dtype is torch.float32 else dtype


def _check_dtype(dtype_param: str) -> None:
    if dtype_param not in ("auto", *DTYPES):
        raise LmopsError(f"unknown dtype '{dtype_param}' (use auto, float32 or bfloat16)")


def training_choices(device: torch.device, train, cfg=None, probe_result=None, *, window: int | None = None,
                     lora_r: int = 0, step: StepFactory | None = None, say=None) -> TrainingChoices:
    """Resolve ``train.dtype`` and ``train.optimizer`` (``TrainParams``) for a model ``cfg`` (``ModelConfig``).

    Explicit values are kept as given. On a CPU, any ``auto`` (and Muon's iteration precision)
    follows the machine's probe at the shape that will run: ``cfg``, the batch, the training ``window``
    (not a base's whole context) and the LoRA rank (0: full training), timing ``step`` (the real model's step, see
    :func:`lmcore.probe.model_step`) when given; ``probe_result`` passes one in (tests, DDP ranks).
    """
    _check_dtype(train.dtype)
    nothing_to_measure = train.dtype != "auto" and train.optimizer == "adamw"  # Muon needs its precision
    if device.type == "cuda" or nothing_to_measure:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = DTYPES.get(train.dtype, torch.bfloat16 if bf16 else None)
        optimizer = "muon" if train.optimizer == "auto" else train.optimizer
        return TrainingChoices(autocast_for(dtype), optimizer,
                               torch.bfloat16 if bf16 else torch.float32, "cuda" if device.type == "cuda" else "params")
    if probe_result is None:
        shape = Shape.of(cfg, train.batch_size, window, lora_r)
        probe_result = probe(shape, step=step, muon=train.optimizer != "adamw", say=say)
    d = probe_result.decisions
    dtype = DTYPES[d.train_dtype if train.dtype == "auto" else train.dtype]
    optimizer = d.optimizer if train.optimizer == "auto" else train.optimizer
    return TrainingChoices(autocast_for(dtype), optimizer, DTYPES[d.muon_ns_dtype],
                           "probe", probe_result.to_dict())


class ThreadTuner:
    """CPU training threads: torch's count, or one while other work holds the cores, as measured.

    Why: threads that wait for each other at every op collapse when another process holds a core.
    On a 2-core EPYC beside one busy process a training step took 3.3 s on 2 threads and 0.4 s on
    1 (quiet: 0.21 s on 2, 0.37 s on 1). So every ``every_s`` seconds one step runs on the other
    count, and the faster count is kept: a step on one thread must be ``gain`` x faster to win,
    torch's count only faster. A trial costs one slower step now and then; results then depend on
    the thread count (as they already do on the wall-clock budget), so ``train.threads: N`` pins it.
    """

    def __init__(self, many: int, every_s: float = 20.0, gain: float = 1.2):
        self.many, self.every_s, self.gain = many, every_s, gain
        self.current, self.trial, self.switches = many, 0, 0
        self.recent: list[float] = []  # seconds of the latest steps on the current count (3 before a trial)
        self.next_trial = time.perf_counter() + every_s / 4
        self._t0 = 0.0

    def before_step(self) -> None:
        if not self.trial and time.perf_counter() >= self.next_trial and len(self.recent) == 3:
            self.trial = 1 if self.current == self.many else self.many
            torch.set_num_threads(self.trial)
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        took = time.perf_counter() - self._t0
        if not self.trial:
            self.recent = [*self.recent[-2:], took]
            return
        usual = sorted(self.recent)[len(self.recent) // 2]  # the median: one lucky or unlucky step decides nothing
        wins = took * self.gain < usual if self.trial == 1 else took < usual
        if wins:
            self.current, self.switches, self.recent = self.trial, self.switches + 1, [took]
        else:  # the next trial is judged against steps measured after this one, never stale ones
            self.recent = []
        torch.set_num_threads(self.current)
        self.trial, self.next_trial = 0, time.perf_counter() + self.every_s

    def restore(self) -> None:
        torch.set_num_threads(self.many)
