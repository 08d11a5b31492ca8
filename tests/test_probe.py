"""The machine probe: decisions from measured times, the cache, ISA caps, and what training does with it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lmcore.config import TrainParams
from lmcore.device import training_choices
from lmcore.machine import cpu_class, effective_isa
from lmcore.model.transformer import ModelConfig
from lmcore.probe import (
    MUON_STEP_GAIN,
    Decisions,
    DecodeProbe,
    Measurements,
    Probe,
    Shape,
    decide,
    decode_probe,
    probe,
)
from lmcore.training.optimizers import Muon, newton_schulz

pytestmark = pytest.mark.code

# Times of the shape lmops trains by default, in the two CPU classes users have (rounded from real runs).
AMX = Measurements(fp32_gflops=90, bf16_gflops=700, step_ms_fp32=120, step_ms_bf16=80, ns_ms_fp32=30, ns_ms_bf16=8)
AVX2 = Measurements(fp32_gflops=80, bf16_gflops=1.5, step_ms_fp32=150, step_ms_bf16=None, ns_ms_fp32=20,
                    ns_ms_bf16=None)


def test_amx_numbers_pick_bf16_and_muon_with_a_bf16_iteration():
    d = decide(AMX)
    assert (d.train_dtype, d.muon_ns_dtype, d.optimizer) == ("bfloat16", "bfloat16", "muon")
    assert d.muon_overhead == pytest.approx(8 / 80, abs=1e-3)


def test_avx2_numbers_never_pick_bf16():
    d = decide(AVX2)
    assert (d.train_dtype, d.muon_ns_dtype) == ("float32", "float32")
    assert d.optimizer == "muon" and d.muon_overhead == pytest.approx(20 / 150, abs=1e-3)


def test_muon_loses_once_its_iteration_costs_more_than_its_steps_save():
    limit = (MUON_STEP_GAIN - 1) * AVX2.step_ms_fp32
    assert decide(replace(AVX2, ns_ms_fp32=limit * 0.95)).optimizer == "muon"
    assert decide(replace(AVX2, ns_ms_fp32=limit * 1.05)).optimizer == "adamw"


def test_bf16_needs_a_clearly_faster_step():
    assert decide(replace(AMX, step_ms_bf16=AMX.step_ms_fp32 / 1.05)).train_dtype == "float32"
    assert decide(replace(AMX, step_ms_bf16=AMX.step_ms_fp32 / 1.2)).train_dtype == "bfloat16"


def test_more_decode_threads_only_where_they_clearly_won():
    assert DecodeProbe(1.0, 0.5, 2, {}).decode_threads == 0  # 2x faster on all threads: leave torch's count
    assert DecodeProbe(1.0, 0.95, 2, {}).decode_threads == 1
    assert DecodeProbe(1.0, 0.5, 1, {}).decode_threads == 1
    d = DecodeProbe(1.0, 1.0, 2, {"x86": 0.4, "fbgemm": 0.6})
    assert (d.int8_engine, d.int8_speedup) == ("fbgemm", 0.6)
    assert DecodeProbe(1.0, 1.0, 2, {}).int8_engine is None


def test_decode_probe_is_measured_once_per_model_shape(tmp_path):
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, block_size=16)
    first = decode_probe(cfg, home=tmp_path)
    assert first.decode_ms_1 > 0 and first.threads == torch.get_num_threads()
    assert set(first.int8_over_fp32) <= set(torch.backends.quantized.supported_engines)
    assert decode_probe(cfg, home=tmp_path) == first  # from the cache (times would differ if re-measured)
    assert decode_probe(replace(cfg, block_size=64), home=tmp_path) == first  # context length: same matrices


def test_isa_caps_hide_what_the_cpu_has():
    flags = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert cpu_class(effective_isa(flags, {})) == "amx"
    capped = effective_isa(flags, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert capped == ["avx2", "fma"] and cpu_class(capped) == "avx2"
    assert cpu_class(effective_isa({"avx2", "avx512f"}, {})) == "avx512"


def test_code_compiled_under_an_isa_cap_is_cached_apart(monkeypatch, tmp_path):
    """Inductor's graph cache does not key on ATen's vector ISA: AVX2 code read back natively on an
    AVX-512 CPU was rebuilt with 16-wide stores into 8-wide loops and corrupted the heap."""
    from lmcore.settings import Settings

    settings = Settings(workspace=tmp_path, home=tmp_path)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native = settings.inductor_cache
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    capped = settings.inductor_cache
    assert native != capped and native.parent == capped.parent == tmp_path / "cache" / "inductor"


def test_the_compiled_step_tries_more_threads_only_after_a_long_step_and_keeps_the_faster(tmp_path, monkeypatch):
    from lmcore.probe import COMPILED_STEP_SPLIT_MS, cached_compiled_steps, compiled_step_threads, record_compiled_step

    monkeypatch.setattr("lmcore.probe.machine_busy", lambda: False)
    short, long = ModelConfig(n_layer=1, d_model=32, n_head=2), ModelConfig(n_layer=2, d_model=32, n_head=2)
    assert compiled_step_threads(short, 2, home=tmp_path) == 1  # nothing timed yet: one thread
    record_compiled_step(short, 1, 2, COMPILED_STEP_SPLIT_MS / 4, home=tmp_path)
    assert compiled_step_threads(short, 2, home=tmp_path) == 1  # too short a step to split
    record_compiled_step(long, 1, 2, COMPILED_STEP_SPLIT_MS * 3, home=tmp_path)
    assert compiled_step_threads(long, 2, home=tmp_path) == 0  # long: try all threads once
    assert compiled_step_threads(long, 1, home=tmp_path) == 1  # ...where there is more than one
    record_compiled_step(long, 2, 2, COMPILED_STEP_SPLIT_MS * 2.9, home=tmp_path)
    assert compiled_step_threads(long, 2, home=tmp_path) == 1  # all threads barely won: back to one
    record_compiled_step(long, 2, 2, COMPILED_STEP_SPLIT_MS * 1.5, home=tmp_path)  # the fastest time is kept
    assert compiled_step_threads(long, 2, home=tmp_path) == 0
    record_compiled_step(long, 3, 2, COMPILED_STEP_SPLIT_MS / 10, home=tmp_path)  # neither one nor all: ignored
    assert compiled_step_threads(long, 2, home=tmp_path) == 0
    shown = {c["shape"]["n_layer"]: c for c in cached_compiled_steps(tmp_path, many=2)}  # what `lmops info` shows
    assert shown[2]["threads"] == 0 and shown[2]["ms"] == {"1": 3.0, "n": 1.5} and shown[1]["threads"] == 1
    # the int8 step of the same shape is timed apart: a short one stays on one thread, the float choice stands
    assert compiled_step_threads(long, 2, home=tmp_path, int8=True) == 1
    record_compiled_step(long, 1, 2, COMPILED_STEP_SPLIT_MS / 4, home=tmp_path, int8=True)
    assert compiled_step_threads(long, 2, home=tmp_path, int8=True) == 1
    assert compiled_step_threads(long, 2, home=tmp_path) == 0
    assert {(c["shape"]["n_layer"], c["int8"]): c["ms"] for c in cached_compiled_steps(tmp_path, many=2)}[2, True] \
        == {"1": COMPILED_STEP_SPLIT_MS / 4}
    monkeypatch.setattr("lmcore.probe.machine_busy", lambda: True)  # times under another's load: not kept
    record_compiled_step(long, 1, 2, COMPILED_STEP_SPLIT_MS / 10, home=tmp_path)
    assert compiled_step_threads(long, 2, home=tmp_path) == 0


def _fake_probe(m: Measurements) -> Probe:
    shape = Shape.of(ModelConfig(), 16)
    return Probe(machine={"cpu": "test", "cpu_class": "x"}, shape=shape, measurements=m,
                 decisions=decide(m), measured_at="now", seconds=0.0)


def test_training_choices_follow_the_probe_only_where_params_say_auto():
    cpu = torch.device("cpu")
    auto = TrainParams(optimizer="auto", dtype="auto")
    amx, avx2 = _fake_probe(AMX), _fake_probe(AVX2)
    c = training_choices(cpu, auto, probe_result=amx)
    assert (c.autocast, c.optimizer, c.muon_ns_dtype, c.source) == (torch.bfloat16, "muon", torch.bfloat16, "probe")
    c = training_choices(cpu, auto, probe_result=avx2)
    assert (c.autocast, c.muon_ns_dtype) == (None, torch.float32)
    assert c.to_dict()["dtype"] == "float32" and c.to_dict()["muon_overhead"] == avx2.decisions.muon_overhead
    c = training_choices(cpu, replace(auto, dtype="bfloat16", optimizer="adamw"), probe_result=avx2)
    assert (c.autocast, c.optimizer) == (torch.bfloat16, "adamw")  # asked for explicitly: kept
    c = training_choices(cpu, replace(auto, optimizer="muon", dtype="float32"), probe_result=avx2)
    assert c.muon_ns_dtype is torch.float32  # explicit Muon still gets the machine's iteration precision
    with pytest.raises(Exception, match="unknown dtype"):
        training_choices(cpu, replace(auto, dtype="fp8"), probe_result=avx2)


def test_probe_measures_once_then_reads_its_cache(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))  # a quiet machine (busy: the test below)
    shape = Shape.of(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, block_size=16), 2)
    first = probe(shape, home=tmp_path)
    assert not first.cached and first.seconds < 30
    m = first.measurements
    assert m.fp32_gflops > 0 and m.step_ms_fp32 > 0 and m.ns_ms_fp32 > 0
    files = list((tmp_path / "cache" / "probe").glob("probe-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["probe"]["shape"]["d_model"] == 32
    again = probe(shape, home=tmp_path)
    assert again.cached and again.measurements == m and again.decisions == first.decisions
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # another ISA cap is another machine
    capped = probe(shape, home=tmp_path)
    assert not capped.cached and capped.machine["isa_caps"]["ATEN_CPU_CAPABILITY"] == "default"
    assert len(list((tmp_path / "cache" / "probe").glob("probe-*.json"))) == 2


def test_muon_in_bf16_is_torchs_muon_and_fp32_orthogonalises_closer():
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 40)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ours, theirs, fp32 = ([torch.nn.Parameter(torch.ones(s)) for s in shapes] for _ in range(3))
    opts = [Muon(ours, lr=0.02, weight_decay=0.01, ns_dtype=torch.bfloat16),
            torch.optim.Muon(theirs, lr=0.02, weight_decay=0.01),
            Muon(fp32, lr=0.02, weight_decay=0.01, ns_dtype=torch.float32)]
    for g in grads:
        for params, opt in zip((ours, theirs, fp32), opts, strict=True):
            for p, gi in zip(params, g, strict=True):
                p.grad = gi.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ours, fp32, strict=True))
    opts[0].load_state_dict(opts[1].state_dict())  # interchangeable state
    g = torch.randn(64, 16)
    coeffs = (3.4445, -4.775, 2.0315)
    o32, o16 = newton_schulz(g, 5, coeffs, 1e-7, torch.float32), newton_schulz(g, 5, coeffs, 1e-7, torch.bfloat16)
    assert o32.dtype is torch.float32 and o16.dtype is torch.bfloat16 and o32.shape == g.shape
    # singular values land in Muon's band around 1 either way
    assert torch.linalg.svdvals(o32).min() > 0.5 and torch.linalg.svdvals(o32).max() < 1.5
    assert (o32 - o16.float()).abs().max() < 0.05


def test_decisions_round_trip_through_json():
    p = _fake_probe(AVX2)
    back = Probe.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back.decisions == p.decisions and isinstance(back.decisions, Decisions) and back.shape == p.shape


def test_lmops_info_shows_the_cpu_and_what_the_probe_chose(lmops_home, tmp_path, capsys, monkeypatch):
    from _optimize_helpers import run_cli

    params = tmp_path / "params.yaml"
    params.write_text("model: {n_layer: 1, n_head: 2, n_kv_head: 2, d_model: 32, block_size: 16}\n"
                      "train: {batch_size: 2}\ntokenizer: {kind: byte}\n")
    code, out, _ = run_cli("info", "--json", capsys=capsys)
    machine = json.loads(out)["machine"]
    assert code == 0 and machine["cpu"]["fp32_gflops"] > 0 and machine["cpu"]["cpu_class"]
    assert machine["probes"] == [] and machine["int8_decode"] is None  # nothing measured in this home yet
    monkeypatch.setenv("LMOPS_WORKSPACE", str(tmp_path))  # --probe reads the workspace's params.yaml
    code, out, _ = run_cli("info", "--probe", "--json", capsys=capsys)
    (probed,) = json.loads(out)["machine"]["probes"]
    assert code == 0 and probed["shape"]["d_model"] == 32 and probed["shape"]["vocab_size"] == 257
    assert probed["decisions"]["optimizer"] in ("adamw", "muon")
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli("info", capsys=capsys)
    assert code == 0 and "probe 1L x 32" in out and f"optimizer {probed['decisions']['optimizer']}" in out
    int8 = json.loads(run_cli("info", "--json", capsys=capsys)[1])["machine"]["int8_decode"]
    assert int8["speedup"] > 0 and f"int8 kernel {int8['speedup']:.2f}x fp32" in out  # --probe timed it too


def test_float32_newton_schulz_on_the_gram_matrix_is_closer_to_exact_than_torchs_bf16():
    """The (m, m) Gram route is the same polynomial: on gradient-like (nearly low-rank) matrices it
    lands nearer the float64 iteration than torch's bf16 Muon does, stacked or not."""
    torch.manual_seed(0)
    coeffs = (3.4445, -4.775, 2.0315)
    g = torch.randn(3, 96, 4) @ torch.randn(4, 32) + 1e-3 * torch.randn(3, 96, 32)  # tall: (k, m, n), m > n
    exact = torch.stack([newton_schulz(m.double(), 5, coeffs, 1e-7, torch.float64) for m in g])
    ours = newton_schulz(g, 5, coeffs, 1e-7, torch.float32)
    bf16 = torch.stack([newton_schulz(m, 5, coeffs, 1e-7, torch.bfloat16) for m in g]).double()
    err, err_bf16 = (ours.double() - exact).abs().max(), (bf16 - exact).abs().max()
    assert ours.shape == g.shape and ours.dtype is torch.float32
    assert err < err_bf16 / 3  # measured 0.039 vs 0.166 (outputs up to 0.22): noise directions are amplified
    assert torch.allclose(ours[1], newton_schulz(g[1], 5, coeffs, 1e-7, torch.float32), atol=1e-5)


def test_a_probe_taken_on_a_busy_machine_is_measured_again(tmp_path, monkeypatch):
    import os

    shape = Shape.of(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, block_size=16), 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1) + 1.0, 0.0, 0.0))
    busy = probe(shape, home=tmp_path)
    assert busy.busy and not probe(shape, home=tmp_path).cached  # provisional: measured again
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    quiet = probe(shape, home=tmp_path)
    assert not quiet.busy and not quiet.cached
    again = probe(shape, home=tmp_path)
    assert again.cached and again.measurements == quiet.measurements  # a quiet probe is kept
