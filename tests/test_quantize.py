"""Int8 dynamic quantization: safetensors round trip, load_model honours it, serving, registry variants."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from _optimize_helpers import _one_thread, module_home_fixture, register, run_cli, trained_model  # noqa: F401
from safetensors import safe_open

from lmcore.errors import LmopsError
from lmcore.model.checkpoint import load_model
from lmcore.model.generate import SamplingParams, generate_text
from lmcore.optimize.quantize import (
    QUANTIZATION,
    SCALE_SUFFIX,
    load_quantized,
    logit_error_bound,
    quantize_job,
    quantize_model,
    quantized_state,
    save_quantized,
)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return trained_model(tmp_path_factory.mktemp("q") / "fp32")


def _is_int8(mod) -> bool:
    return type(mod).__name__ == "Linear" and type(mod).__module__.startswith("torch.ao.nn.quantized.dynamic")


def test_quantized_folder_is_int8_safetensors_and_loads_back(fp32_dir, tmp_path):
    out = save_quantized(fp32_dir, tmp_path / "int8", {"quantized_from": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["quantization"] == QUANTIZATION and meta["quantized_from"] == "test"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.int8
        assert f.get_tensor("blocks.0.attn.qkv.weight_scale").dtype == torch.float32
        assert f.get_tensor("embed.weight").dtype == torch.float32
    assert (out / "model.safetensors").stat().st_size < 0.6 * (fp32_dir / "model.safetensors").stat().st_size

    int8, tok, meta = load_model(out, "cpu")
    assert _is_int8(int8.blocks[0].attn.qkv) and _is_int8(int8.blocks[1].mlp.down) and _is_int8(int8.lm_head)
    fp32, _, _ = load_model(fp32_dir)
    x = torch.tensor([tok.encode("def add(a, b):\n    return")])
    with torch.no_grad():
        a, b = fp32(x)[0], int8(x)[0]
        c = quantize_model(fp32)(x)[0]
    assert torch.equal(b, c), "the folder must load back exactly as the in-memory quantization"
    # Not a fixed tolerance: int8 kernels round activations to 7 bits (reduce_range: fbgemm and oneDNN on an
    # AVX2 EPYC, max prob diff 0.089) or 8 (qnnpack: 0.037); 6 sigma of this model's own rounding noise holds
    # for either, whatever CPU runs the test.
    bound = logit_error_bound(fp32, x)[0]  # (T, V), from the fp32 weights and activations only
    diff = (a - b).abs()
    assert diff.max() > 0, "int8 logits equal fp32: nothing was quantized"
    assert (diff <= bound).all(), f"int8 logit error {(diff / bound).max():.2f}x its 6-sigma bound"
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9

    def broken(edit) -> float:  # worst |logit error| / bound of a deliberately broken int8 copy
        state = quantized_state(fp32)
        edit(state)
        with torch.no_grad():
            return float(((load_quantized(fp32.cfg, state)(x)[0] - a).abs() / bound).max())

    def scales_doubled(layer: str = ""):
        def edit(state):
            for k in [k for k in state if k.endswith(SCALE_SUFFIX) and k.startswith(layer)]:
                state[k] = state[k] * 2
        return edit

    def transposed(state):  # a square layer, so a (in, out) layout bug still loads
        key = "blocks.1.attn.proj.weight"
        state[key] = state[key].T.contiguous()

    # negative controls: the bound is tight enough to fail these (measured 5.7x to 37x it on an AVX2 EPYC)
    for name, edit in [("all scales doubled", scales_doubled()), ("last MLP scales doubled",
                       scales_doubled("blocks.1.mlp.down.")), ("a transposed weight", transposed)]:
        assert broken(edit) > 1, f"{name}: within the bound, so the bound could not catch it"


def test_load_model_on_a_quantized_folder_generates_text(fp32_dir, tmp_path):
    out = save_quantized(fp32_dir, tmp_path / "int8")
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    fp32, tok, _ = load_model(fp32_dir)
    int8, _, _ = load_model(out)
    text = generate_text(int8, tok, "class Point:\n", sp)
    assert len(text) == 24 and text == generate_text(quantize_model(fp32), tok, "class Point:\n", sp)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, seed=3)
    assert generate_text(int8, tok, "def ", sampled) == generate_text(int8, tok, "def ", sampled)


def test_server_serves_the_quantized_folder(fp32_dir, tmp_path):
    from _serve_helpers import thread_server

    from lmcore.config import Params, ServeParams
    from lmcore.feedback.store import FeedbackStore
    from lmcore.serve.app import create_app

    out = save_quantized(fp32_dir, tmp_path / "int8")
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    params = Params(serve=ServeParams(max_new_tokens=16, poll_interval_s=0))
    try:
        with thread_server(create_app(str(out), params, store=store, api_token="")) as base:
            r = httpx.post(base + "/v1/generate", json={"prompt": "def ", "max_new_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        store.close()


def test_quantize_refuses_an_already_quantized_folder(fp32_dir, tmp_path):
    out = save_quantized(fp32_dir, tmp_path / "int8")
    with pytest.raises(LmopsError, match="already quantized"):
        save_quantized(out, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_quantize_registers_a_tagged_variant_the_registry_serves(fp32_dir, module_home):
    from lmcore.registry.models import fetch_model_dir, list_versions, resolve_alias
    from lmcore.registry.tracking import get_client

    src = register(fp32_dir, "qlm")
    val = module_home / "val.txt"
    val.write_text("def add(a, b):\n    return a + b\n" * 20)
    res = quantize_job(name="qlm", version=src, data=val, experiment="optimize-tests", new_tokens=8, repeats=1,
                       min_speedup=0)  # registered whatever this CPU's int8 kernels measure
    assert res["version"] == str(int(src) + 1) and resolve_alias("qlm", "challenger") == res["version"]
    assert res["registered"] is True and res["declined"] is None and res["cpu"]["cpu_class"]
    m = res["metrics"]
    assert m["speedup"] > 0 and abs(m["bpb_change"]) < 0.05 and m["int8_bytes"] < m["fp32_bytes"]
    assert m["compiled_decode"] == 1.0 and abs(m["bpb_change_wo"]) < 0.05  # timed with the compiled step
    v = next(d for d in list_versions("qlm") if d["version"] == res["version"])
    assert v["tags"]["lmops.quantized_from"] == src and v["tags"]["lmops.quantization"] == QUANTIZATION
    assert v["tags"]["lmops.dataset_version"] == "test-data"  # lineage carried over from the source
    assert float(v["tags"]["lmops.speedup"]) == pytest.approx(m["speedup"], abs=1e-3)
    assert v["tags"]["lmops.cpu"].endswith(f"({res['cpu']['cpu_class']})")  # where that speedup was measured
    run = get_client().get_run(res["run_id"])
    assert {"speedup", "bpb_change", "fp32_bpb", "int8_bpb", "bpb_change_wo"} <= set(run.data.metrics)
    folder, _ = fetch_model_dir(f"models:/qlm/{res['version']}")
    model, tok, meta = load_model(folder)
    assert meta["quantization"] == QUANTIZATION and _is_int8(model.blocks[0].attn.qkv)
    assert generate_text(model, tok, "def ", SamplingParams(max_new_tokens=8, temperature=0.0))


def test_quantize_unknown_version_is_one_line_and_writes_nothing(fp32_dir, module_home, capsys):
    register(fp32_dir, "lmops-lm")
    code, out, err = run_cli("optimize", "quantize", "--version", "99", capsys=capsys)
    assert code == 1 and err.startswith("error: ") and "99" in err and len(err.strip().splitlines()) == 1
    assert not (module_home / "models" / "lmops-lm" / "v99-int8").exists()
    with pytest.raises(LmopsError, match="not found"):
        quantize_job(name="lmops-lm", version="99")


def test_quantize_declines_to_register_an_int8_variant_below_min_speedup(fp32_dir, module_home):
    from lmcore.registry.models import list_versions

    src = register(fp32_dir, "slow")
    before = [d["version"] for d in list_versions("slow")]
    res = quantize_job(name="slow", version=src, experiment="optimize-tests", new_tokens=8, repeats=1,
                       compiled=False, min_speedup=1000)  # eager: no compile to wait for when run alone
    assert res["registered"] is False and res["version"] is None and "run_id" not in res
    assert [d["version"] for d in list_versions("slow")] == before  # nothing registered
    m, why = res["metrics"], res["declined"]
    assert f"{m['speedup']:.2f}x fp32" in why
    assert f"int8 {m['int8_tokens_per_s']:.0f} vs fp32 {m['fp32_tokens_per_s']:.0f} tok/s" in why
    assert res["cpu"]["cpu"] in why and "1000x" in why and "--min-speedup 0" in why and len(why.splitlines()) == 1
    assert res["out_dir"] in why and (Path(res["out_dir"]) / "model.safetensors").is_file()  # the folder stays


def test_quantize_cli_prints_the_decline_and_exits_zero(fp32_dir, module_home, capsys):
    from lmcore.registry.models import list_versions

    src = register(fp32_dir, "lmops-lm")
    before = [d["version"] for d in list_versions("lmops-lm")]
    code, out, err = run_cli("optimize", "quantize", "--version", src, "--min-speedup", "1000", "--json",
                             capsys=capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["registered"] is False and res["declined"].startswith("int8 decodes at ") and res["cpu"]["cpu"]
    code, out, err = run_cli("optimize", "quantize", "--version", src, "--min-speedup", "1000", capsys=capsys)
    assert code == 0 and "error" not in err
    assert out.strip().splitlines()[-1].startswith("int8 decodes at ")  # the reason, last, on stdout
    assert [d["version"] for d in list_versions("lmops-lm")] == before
