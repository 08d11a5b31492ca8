"""What this machine is fast at, measured once and kept: the machine-dependent defaults follow it.

Why measure instead of reading CPU flags: machines of one kind differ by 30-100x exactly where
lmops makes choices. An AMX Xeon runs bf16 matrix products several times faster than fp32; an
AVX2-only EPYC runs them 30-100x *slower* (1-3 GFLOP/s against ~80), and its int8 kernels lose
to fp32. A flag in ``/proc/cpuinfo`` says neither what oneDNN will do under a capped ISA
(``ONEDNN_MAX_CPU_ISA``) or in a VM, nor whether a tile pays at a model's small shapes. So the
probe times the operations themselves, at the model's own shapes, once per machine (CPU, torch
build, threads, ISA caps) and shape, and keeps the result as JSON under ``<home>/cache/probe``.

The decisions, each made here and nowhere else (:func:`decide` is pure, so tests feed it numbers):

- ``train_dtype``: bf16 autocast only where a real bf16 training step beat fp32 (``train.dtype: auto``);
- ``muon_ns_dtype``: Muon's Newton-Schulz runs in bf16 only where bf16 matrix products are faster;
- ``optimizer``: Muon unless its orthogonalisation costs more per step than it saves in steps
  (``train.optimizer: auto``);
- ``decode_threads`` (:func:`decode_probe`, per model shape without a batch): one thread or torch's
  default for batch-1 decoding, whichever decoded clearly faster;
- ``int8_engine``: the quantized engine whose int8 linear ran fastest at the model's shapes;
- int8 compiled decoding (:func:`lmcore.model.decode.int8_matvec_speedup`, per machine): int8 weights in the kernel only
  where that kernel beat float32's.

CUDA needs no probe: bf16 autocast and Muon's bf16 iteration are right on every GPU lmops supports.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from lmcore.machine import (
    PROBE_VERSION,
    best_seconds,
    cache_dir,
    cache_key,
    interleaved_ms,
    machine_busy,
    machine_identity,
    matmul_gflops,
    read_cached,
    read_memo,
    write_cached,
)
from lmcore.model.transformer import ModelConfig, Transformer
from lmcore.training.optimizers import newton_schulz

# Thresholds of the decisions, each with the reason it has this value.
BF16_MIN_GAIN = 1.10  # bf16 autocast casts every weight each step: below a 10% faster step it is noise
MUON_STEP_GAIN = 1.5  # Muon saves steps: on a 2-core EPYC 860 Muon steps beat 1,176 AdamW ones (2.41 vs 2.64 bits/char)
PROBE_BUDGET_S = 15.0  # a probe never takes longer than this, whatever the model (issue: 1B in <= 15 s)
STEP_CALL_S = 1.2  # one timed training step should take about this long: rows are cut down (never below
# MIN_TIMED_TOKENS) so that warm-up + 2 rounds of fp32 and bf16 steps fit PROBE_BUDGET_S with room to spare
MIN_TIMED_TOKENS = 16  # fewer tokens per timed step time dispatch, not matrix work: the probe falls back instead
STEP_EFFICIENCY = 0.35  # share of the matmul peak a whole training step reaches (measured 0.3-0.6 on CPUs)
DECODE_THREADS_MIN_GAIN = 1.15  # more threads must clearly win: they collapse when another process shares the cores
# a compiled step shorter than this (on one thread) is not worth trying on more: it is one kernel with ~25
# parallel regions per layer, each a few us of thread wake-up (4L x 128: 0.12 ms on 1 thread, 0.22 ms on 2)
COMPILED_STEP_SPLIT_MS = 1.0


# ----------------------------------------------------------------------------- the model-shaped probe


@dataclass(frozen=True)
class Shape:
    """What the probe times at: one model configuration and its training batch."""

    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    hidden: int
    vocab_size: int
    block_size: int  # the training window (tokens per row), never a base's whole context
    batch_size: int
    lora_r: int = 0  # > 0: a LoRA step (frozen base, adapters of this rank) is what training runs

    @classmethod
    def of(cls, cfg, batch_size: int, window: int | None = None, lora_r: int = 0) -> Shape:
        """From a ``lmcore.model.transformer.ModelConfig``, the training batch size and window (default
        the model's context: a model trained from scratch trains in its whole context)."""
        return cls(cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.hidden, cfg.vocab_size,
                   min(window or cfg.block_size, cfg.block_size), batch_size, lora_r)

    def config(self):
        return ModelConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                           n_kv_head=self.n_kv_head, d_model=self.d_model, block_size=self.block_size,
                           ffn_hidden=self.hidden)


@dataclass(frozen=True)
class Measurements:
    """Times at one shape (milliseconds; ``None`` = not worth timing, e.g. bf16 steps without bf16 units)."""

    fp32_gflops: float  # the MLP's (B*T, C) @ (C, hidden) product
    bf16_gflops: float
    step_ms_fp32: float  # one forward + backward of the model
    step_ms_bf16: float | None
    ns_ms_fp32: float  # Muon's Newton-Schulz over every hidden matrix, one optimizer step
    ns_ms_bf16: float | None


@dataclass(frozen=True)
class Decisions:
    train_dtype: str  # "bfloat16" | "float32": what train.dtype auto means here
    muon_ns_dtype: str
    optimizer: str  # what train.optimizer auto means here
    muon_overhead: float  # Newton-Schulz time / step time


def decide(m: Measurements) -> Decisions:
    """The machine-dependent defaults from the measured times (pure); an untimed step (0) keeps fp32."""
    bf16_step = bool(m.step_ms_bf16) and m.step_ms_fp32 / m.step_ms_bf16 >= BF16_MIN_GAIN
    ns_bf16 = m.ns_ms_bf16 is not None and m.ns_ms_bf16 < m.ns_ms_fp32
    ns_ms = m.ns_ms_bf16 if ns_bf16 else m.ns_ms_fp32
    step_ms = m.step_ms_bf16 if bf16_step else m.step_ms_fp32
    overhead = ns_ms / max(step_ms, 1e-9)
    # Muon loses per wall-clock second once a step costs more than the steps it saves: 1 + overhead > gain;
    # an iteration not timed (0: a fine-tune, which uses AdamW) or a step not timed cannot pick Muon
    timed = m.ns_ms_fp32 > 0 and m.step_ms_fp32 > 0
    optimizer = "muon" if timed and 1.0 + overhead <= MUON_STEP_GAIN else "adamw"
    return Decisions(train_dtype="bfloat16" if bf16_step else "float32",
                     muon_ns_dtype="bfloat16" if ns_bf16 else "float32", optimizer=optimizer,
                     muon_overhead=round(overhead, 3))


StepFactory = Callable[[torch.Tensor, "torch.dtype | None"], Callable[[], None]]


def model_step(model: nn.Module) -> StepFactory:
    """The training step of ``model`` as the probe times it: forward + backward on ``x`` under autocast
    ``dtype`` (None: fp32); gradients dropped after each call, so the probe holds no more than a step."""

    def factory(x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                _, loss = model(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    return factory


def step_flops(shape: Shape, tokens: int) -> float:
    """FLOPs of one training step over ``tokens``: 6 per weight per token for full training, 4 under LoRA
    (no weight gradients for the frozen base), plus attention over the window."""
    c, h, layers = shape.d_model, shape.hidden, shape.n_layer
    kv = shape.n_kv_head * (c // shape.n_head)
    weights = layers * (c * (c + 2 * kv) + c * c + 3 * c * h) + shape.vocab_size * c  # + the head
    attention = layers * 2 * shape.block_size * c  # q.k and p.v per token, on average half the window
    return (4.0 if shape.lora_r else 6.0) * tokens * (weights + attention)


def timed_rows(shape: Shape, fp32_gflops: float, seconds_per_token: float = 0.0, overhead_s: float = 0.0
               ) -> tuple[int, int]:
    """(rows, tokens per row) of a timed step: the training batch, cut until one step is about
    ``STEP_CALL_S``: ``overhead_s`` (per-op cost, measured) plus tokens at the measured fp32 speed, or at
    ``seconds_per_token`` where short steps measured slower than that (a busy machine). Rows go first,
    then the window; (0, 0): too large to time."""
    seconds_per_token = max(seconds_per_token,
                            step_flops(shape, 1) / (max(fp32_gflops, 1e-3) * 1e9 * STEP_EFFICIENCY))
    batch_tokens = shape.batch_size * shape.block_size
    tokens = min(batch_tokens, int(max(STEP_CALL_S - overhead_s, 0.0) / seconds_per_token))
    if tokens < min(MIN_TIMED_TOKENS, batch_tokens):
        return 0, 0
    rows = max(1, min(shape.batch_size, tokens // shape.block_size))
    return rows, min(shape.block_size, tokens // rows)


def _short_step_s(factory: StepFactory, shape: Shape, tokens: int) -> float:
    """Seconds of one fp32 step on one row of ``tokens`` (the second of two: the first allocates)."""
    step = factory(torch.randint(0, shape.vocab_size, (1, min(tokens, shape.block_size))), None)
    step()
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def _random_model_step(shape: Shape) -> StepFactory:
    """A freshly initialised model of ``shape`` (``lmops info --probe``, tests): the same arithmetic as
    the model that will train, without its weights."""
    torch.manual_seed(0)
    return model_step(Transformer(shape.config()).train())


def _hidden_matrix_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of the matrices Muon orthogonalises (training/optimizers.py): qkv, proj, gate_up, down per layer."""
    D = cfg.head_dim
    return [((cfg.n_head + 2 * cfg.n_kv_head) * D, cfg.d_model), (cfg.d_model, cfg.n_head * D),
            (2 * cfg.hidden, cfg.d_model), (cfg.d_model, cfg.hidden)]


def _newton_schulz(cfg, dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """One Newton-Schulz iteration over every layer's matrices (stacked by shape, as lmcore.training.optimizers.Muon
    does), and the factor to Muon's 5."""
    grads = [torch.randn(cfg.n_layer, *shape) if cfg.n_layer > 1 else torch.randn(shape)
             for shape in _hidden_matrix_shapes(cfg)]
    coeffs = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults

    def iteration() -> None:
        for g in grads:
            newton_schulz(g, 1, coeffs, 1e-7, dtype)

    return iteration, 5.0


@torch.inference_mode()
def _decode_ms(cfg, threads: int, steps: int = 24) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tok = torch.zeros(1, 1, dtype=torch.long)

        def run() -> None:
            cache = model.new_cache(1, steps)
            for _ in range(steps):
                model(tok, cache=cache, last_only=True)

        return best_seconds(run, 0.15) / steps * 1e3
    finally:
        torch.set_num_threads(saved)


@torch.inference_mode()
def _int8_over_fp32(cfg, budget_s: float = 0.1) -> dict[str, float]:
    """Per quantized engine: batch-1 speed of torch's int8 dynamic linear over fp32, on the MLP's matrices."""
    shapes = [(2 * cfg.hidden, cfg.d_model), (cfg.d_model, cfg.hidden)]
    x = {s: torch.randn(1, s[1]) for s in shapes}
    fp32 = {s: nn.Linear(s[1], s[0], bias=False) for s in shapes}
    fp32_s = best_seconds(lambda: [fp32[s](x[s]) for s in shapes], budget_s)
    saved, out = torch.backends.quantized.engine, {}
    try:
        for engine in torch.backends.quantized.supported_engines:
            if engine in ("none", "qnnpack"):  # qnnpack is for ARM phones
                continue
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = {s: DynamicLinear(s[1], s[0], bias_=False, dtype=torch.qint8) for s in shapes}
                for s in shapes:
                    w = fp32[s].weight.detach()
                    scale = (w.abs().amax(1) / 127).double().clamp(min=1e-12)
                    q[s].set_weight_bias(torch.quantize_per_channel(w, scale, torch.zeros(s[0], dtype=torch.long),
                                                                    0, torch.qint8), None)
                try:
                    out[engine] = round(fp32_s / best_seconds(lambda q=q: [q[s](x[s]) for s in shapes], budget_s), 3)
                except RuntimeError:  # an engine listed but unusable on this CPU
                    continue
    finally:
        torch.backends.quantized.engine = saved
    return out


def measure(shape: Shape, budget_s: float = 0.1, step: StepFactory | None = None, muon: bool = True,
            say: Callable[[str], None] | None = None) -> Measurements:
    """Time everything :func:`decide` needs at ``shape`` (~1-3 s for lmops's default model on 2 cores).

    ``step`` builds the step to time from a batch and an autocast dtype (:func:`model_step` of the model
    that will train, LoRA adapters included); default: a random model of ``shape``. The step is timed on
    as many of the batch's rows as fit ``STEP_CALL_S`` at the measured fp32 speed and scaled to the
    batch, so the whole probe stays within ``PROBE_BUDGET_S`` for any model up to ~1B parameters; a
    model too large for even one short row is not timed (``step_ms_fp32`` 0: :func:`decide` keeps fp32).
    ``muon``: time Newton-Schulz too (only a run whose optimizer may be Muon needs it).
    """
    say = say or (lambda _: None)
    t0 = time.perf_counter()
    cfg = shape.config()
    tokens = max(shape.batch_size * shape.block_size, 1024)  # fewer rows time dispatch, not arithmetic
    fp32 = matmul_gflops(tokens, shape.d_model, shape.hidden, torch.float32, budget_s / 3)
    bf16 = matmul_gflops(tokens, shape.d_model, shape.hidden, torch.bfloat16, budget_s / 3, screen_below=fp32 / 4)
    untimed = Measurements(fp32_gflops=round(fp32, 1), bf16_gflops=round(bf16, 1), step_ms_fp32=0.0,
                           step_ms_bf16=None, ns_ms_fp32=0.0, ns_ms_bf16=None)  # decide() keeps fp32
    if timed_rows(shape, fp32) == (0, 0):
        say(f"probe: one {shape.block_size}-token step of this model would take over {STEP_CALL_S:g} s at "
            f"{fp32:.0f} GFLOP/s: not timed, training runs in float32 (the safe choice)")
        return untimed
    factory = step or _random_model_step(shape)
    # two short fp32 steps first (after a warm-up): what a step costs here and now, per op and per token
    # (other load included), which a matmul's speed does not say; the timed step is sized by both
    short = _short_step_s(factory, shape, MIN_TIMED_TOKENS)
    longer = _short_step_s(factory, shape, 4 * MIN_TIMED_TOKENS) if 4 * short < STEP_CALL_S else 0.0
    per_token = max(longer - short, 0.0) / (3 * MIN_TIMED_TOKENS) if longer else short / MIN_TIMED_TOKENS
    rows, window = timed_rows(shape, fp32, per_token, max(short - per_token * MIN_TIMED_TOKENS, 0.0))
    if rows == 0 or short > STEP_CALL_S:
        say(f"probe: a {MIN_TIMED_TOKENS}-token step took {short:.1f} s: not timed, training runs in float32 "
            "(the safe choice)")
        return untimed
    x = torch.randint(0, shape.vocab_size, (rows, window))
    scale = shape.batch_size * shape.block_size / (rows * window)
    precisions = [None, torch.bfloat16] if bf16 > fp32 else [None]  # bf16 slower at matmul: minutes to learn that
    say(f"probe: timing {'LoRA ' if shape.lora_r else ''}training steps of {rows} x {window} tokens in "
        + " and ".join("bf16" if p else "fp32" for p in precisions) + f" (fp32 matmul {fp32:.0f} GFLOP/s, "
        f"bf16 {bf16:.0f})")
    jobs = {f"step_ms_{'bf16' if p else 'fp32'}": (factory(x, p), scale) for p in precisions}
    if muon:
        jobs["ns_ms_fp32"] = _newton_schulz(cfg, torch.float32)
        if bf16 > fp32:
            jobs["ns_ms_bf16"] = _newton_schulz(cfg, torch.bfloat16)
    # a call under way cannot be cut short: stop early enough that the last one still ends within the budget
    times = interleaved_ms(jobs, rounds=2, deadline=t0 + PROBE_BUDGET_S - 2 * STEP_CALL_S)
    if times is None:
        say(f"probe: stopped at its {PROBE_BUDGET_S:g} s budget (the machine is slower or busier than its matmul "
            f"speed said): training runs in float32 (the safe choice)")
        return untimed
    return Measurements(fp32_gflops=round(fp32, 1), bf16_gflops=round(bf16, 1), step_ms_fp32=times["step_ms_fp32"],
                        step_ms_bf16=times.get("step_ms_bf16"), ns_ms_fp32=times.get("ns_ms_fp32", 0.0),
                        ns_ms_bf16=times.get("ns_ms_bf16"))


@dataclass(frozen=True)
class DecodeProbe:
    """Batch-1 decoding at one model shape: thread count and int8 kernels (no training batch involved)."""

    decode_ms_1: float  # one cached decode step on one thread
    decode_ms_n: float  # ... on torch's thread count
    threads: int  # torch's thread count when measured
    int8_over_fp32: dict[str, float]  # quantized engine -> int8 dynamic linear speed / fp32, batch 1

    @property
    def decode_threads(self) -> int:
        """1, or 0 = leave torch's setting: more threads only where they clearly won."""
        many = self.threads > 1 and self.decode_ms_1 / max(self.decode_ms_n, 1e-9) >= DECODE_THREADS_MIN_GAIN
        return 0 if many else 1

    @property
    def int8_engine(self) -> str | None:
        return max(self.int8_over_fp32, key=self.int8_over_fp32.__getitem__, default=None)

    @property
    def int8_speedup(self) -> float:
        return self.int8_over_fp32.get(self.int8_engine, 0.0) if self.int8_engine else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_threads": self.decode_threads, "int8_engine": self.int8_engine,
                "int8_speedup": self.int8_speedup}


def _decode_shape(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_kv_head", "d_model", "hidden", "vocab_size")}


def decode_probe(cfg, refresh: bool = False, home: Path | None = None) -> DecodeProbe:
    """Decode threads and int8 kernels for a model ``cfg`` (``ModelConfig``): cached, else measured (~0.5 s)."""
    ident = machine_identity()
    path = cache_dir(home) / f"decode-{cache_key(ident, _decode_shape(cfg))}.json"
    if not refresh and (hit := read_memo(path)):
        d = hit["decode"]
        return DecodeProbe(d["decode_ms_1"], d["decode_ms_n"], d["threads"], d["int8_over_fp32"])
    threads = ident["threads"]
    one = _decode_ms(cfg, 1)
    result = DecodeProbe(round(one, 3), round(_decode_ms(cfg, threads), 3) if threads > 1 else round(one, 3),
                         threads, _int8_over_fp32(cfg))
    write_cached(path, {"version": PROBE_VERSION, "machine": ident, "shape": _decode_shape(cfg),
                  "decode": result.to_dict()})
    return result


@dataclass(frozen=True)
class Probe:
    machine: dict
    shape: Shape
    measurements: Measurements
    decisions: Decisions
    measured_at: str
    seconds: float  # what measuring cost, once
    cached: bool = False
    busy: bool = False  # other processes kept the cores busy while it measured: provisional, see probe()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, cached: bool = False) -> Probe:
        return cls(machine=d["machine"], shape=Shape(**d["shape"]), measurements=Measurements(**d["measurements"]),
                   decisions=Decisions(**d["decisions"]), measured_at=d["measured_at"], seconds=d["seconds"],
                   cached=cached, busy=d.get("busy", False))


def _shape_key(shape: Shape) -> dict:
    """The cache key's shape: without ``lora_r`` when 0, so full-training probes keep their older keys."""
    d = asdict(shape)
    if not d["lora_r"]:
        d.pop("lora_r")
    return d


def probe(shape: Shape, refresh: bool = False, home: Path | None = None, step: StepFactory | None = None,
          muon: bool = True, say: Callable[[str], None] | None = None) -> Probe:
    """The training measurements and decisions for ``shape`` on this machine: cached, else measured now
    (``step``, ``muon``, ``say``: see :func:`measure`).

    A probe taken while the machine was busy is kept but measured again by the next caller, until
    one is taken on a quiet machine: with threads fighting over two cores, times swing 10x and a
    ratio taken then could pin a wrong default for good. Torch's random state is left as it was, so a
    run's batches and dropout do not depend on whether its probe was cached.
    """
    ident = machine_identity()
    path = cache_dir(home) / f"probe-{cache_key(ident, _shape_key(shape), *([] if muon else ['no-muon']))}.json"
    if not refresh and (hit := read_cached(path)) and not hit["probe"].get("busy"):
        return Probe.from_dict(hit["probe"], cached=True)
    t0 = time.perf_counter()
    busy = machine_busy()
    rng = torch.get_rng_state()
    try:
        m = measure(shape, step=step, muon=muon, say=say)
    finally:
        torch.set_rng_state(rng)
    result = Probe(machine=ident, shape=shape, measurements=m, decisions=decide(m),
                   measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   seconds=round(time.perf_counter() - t0, 2), busy=busy or machine_busy())
    write_cached(path, {"version": PROBE_VERSION, "probe": result.to_dict()})
    return result


def cached_probes(home: Path | None = None) -> list[Probe]:
    """Every training probe this home has for this machine, newest first (for ``lmops info``)."""
    ident = machine_identity()
    out = []
    for path in cache_dir(home).glob("probe-*.json"):
        hit = read_cached(path)
        if hit and hit["probe"]["machine"] == ident:
            out.append(Probe.from_dict(hit["probe"], cached=True))
    return sorted(out, key=lambda p: p.measured_at, reverse=True)


def _compiled_step_ident(many: int) -> dict:
    return {**machine_identity(), "threads": many}  # the process's count, not the one decoding runs on


def _compiled_step_path(ident: dict, cfg, int8: bool, home: Path | None) -> Path:
    """One record per shape and weights: an int8 step reads a quarter of the bytes, so the thread
    count that wins for the float step of a shape need not win for its int8 one."""
    key = cache_key(ident, _decode_shape(cfg), *(["int8"] if int8 else []))
    return cache_dir(home) / f"compiled-step-{key}.json"


def compiled_step_threads(cfg, many: int, home: Path | None = None, int8: bool = False) -> int:
    """Threads for the compiled batch-1 decode step of a model ``cfg``: 1, or 0 = torch's count.

    Decided from the step's own times, which generation records (:func:`record_compiled_step`), since
    neither the eager probe nor a small compiled stand-in predicts it: eagerly a product is MKL's
    sgemv, which keeps to one core, while compiled it is an Inductor loop over the rows that a second
    core speeds up once the step is long enough (6L x 384: 3.4 -> 1.5-2.0 ms; 4L x 128: 0.12 -> 0.22).
    So: 1 thread until a step has been timed; all threads once, if one thread took over
    ``COMPILED_STEP_SPLIT_MS``; then whichever was faster (more threads only by ``DECODE_THREADS_MIN_GAIN``).
    Each thread count is its own compiled library, so trying all threads compiles once more.
    ``int8``: the step reads int8 weights (``lmcore.model.decode.use_int8_kernels``), timed apart.
    """
    hit = read_memo(_compiled_step_path(_compiled_step_ident(many), cfg, int8, home))
    return _threads_from((hit or {}).get("ms", {}), many)


def _threads_from(ms: dict[str, float], many: int) -> int:
    one, all_ = ms.get("1"), ms.get("n")
    if many <= 1 or one is None or one < COMPILED_STEP_SPLIT_MS:
        return 1
    return 0 if all_ is None or one / all_ >= DECODE_THREADS_MIN_GAIN else 1


def record_compiled_step(cfg, threads: int, many: int, ms: float, home: Path | None = None,
                         int8: bool = False) -> None:
    """Keep the fastest time seen for the compiled step of ``cfg`` on ``threads`` (1, or the process's
    ``many``); not while other work keeps the cores busy, whose times would decide for the wrong reason."""
    if machine_busy() or threads not in (1, many):
        return
    ident = _compiled_step_ident(many)
    path = _compiled_step_path(ident, cfg, int8, home)
    times = dict((read_memo(path) or {}).get("ms", {}))
    key = "1" if threads == 1 else "n"
    times[key] = round(min(ms, times.get(key, math.inf)), 4)
    write_cached(path, {"version": PROBE_VERSION, "machine": ident, "shape": _decode_shape(cfg), "int8": int8,
                        "ms": times})


def cached_compiled_steps(home: Path | None = None, many: int | None = None) -> list[dict]:
    """The compiled step times this home recorded on this machine (``many`` threads: torch's count),
    with the thread count they choose."""
    many = many or torch.get_num_threads()
    ident = _compiled_step_ident(many)
    hits = (read_cached(path) for path in sorted(cache_dir(home).glob("compiled-step-*.json")))
    mine = [h for h in hits if h and h.get("machine") == ident]
    return [{"shape": h["shape"], "int8": h.get("int8", False), "ms": h["ms"], "threads": _threads_from(h["ms"], many)}
            for h in mine]


def cached_decode_probes(home: Path | None = None) -> list[dict]:
    """Every decode probe this home has for this machine: ``{"shape": ..., "decode": ...}`` (for ``lmops info``)."""
    ident = machine_identity()
    hits = (read_cached(path) for path in sorted(cache_dir(home).glob("decode-*.json")))
    return [{"shape": h["shape"], "decode": h["decode"]} for h in hits if h and h.get("machine") == ident]
