"""Int8 dynamic quantization: safetensors round trip, load_model honours it, serving, registry variants."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from _optimize_helpers import _one_thread, module_home_fixture, register, run_cli, trained_model  # noqa: F401
from safetensors import safe_open

from lmcore.checkpoint import load_model
from lmcore.errors import LmopsError
from lmcore.generate import SamplingParams, generate_text
from lmcore.optimize.quantize import QUANTIZATION, quantize_job, quantize_model, save_quantized

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
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    assert 0 < (pa - pb).abs().max() < 0.05  # quantized, yet close
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


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
    from lmcore.feedback import FeedbackStore
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
    from lmcore.registry import fetch_model_dir, list_versions, resolve_alias
    from lmcore.tracking import get_client

    src = register(fp32_dir, "qlm")
    val = module_home / "val.txt"
    val.write_text("def add(a, b):\n    return a + b\n" * 20)
    res = quantize_job(name="qlm", version=src, data=val, experiment="optimize-tests", new_tokens=8, repeats=1)
    assert res["version"] == str(int(src) + 1) and resolve_alias("qlm", "challenger") == res["version"]
    m = res["metrics"]
    assert m["speedup"] > 0 and abs(m["bpb_change"]) < 0.05 and m["int8_bytes"] < m["fp32_bytes"]
    assert m["compiled_decode"] == 1.0 and abs(m["bpb_change_wo"]) < 0.05  # timed with the compiled step
    v = next(d for d in list_versions("qlm") if d["version"] == res["version"])
    assert v["tags"]["lmops.quantized_from"] == src and v["tags"]["lmops.quantization"] == QUANTIZATION
    assert v["tags"]["lmops.dataset_version"] == "test-data"  # lineage carried over from the source
    assert float(v["tags"]["lmops.speedup"]) == pytest.approx(m["speedup"], abs=1e-3)
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
