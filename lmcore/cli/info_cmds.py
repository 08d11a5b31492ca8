"""`lmops info`: where everything lives and which versions of the stack are installed."""

from __future__ import annotations

import importlib.metadata as md
import platform

import typer

from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, emit_json, load_params_cli, print_table
from lmcore.settings import get_settings

STACK = ("torch", "prefect", "mlflow", "dvc", "great-expectations", "tokenizers", "fastapi", "pandas")


def collect_info() -> dict:
    s = get_settings()
    versions = {}
    for pkg in ("lmops", *STACK):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        import torch  # lazy: keeps `lmops --help` fast

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        device = "unknown"
    return {
        "workspace": str(s.workspace),
        "lmops_home": str(s.home),
        "params": str(s.params_path),
        "mlflow_tracking_uri": s.mlflow_tracking_uri,
        "prefect_api": s.prefect_api_url or "ephemeral (started per process)",
        "prefect_home": str(s.prefect_home),
        "dvc_remote": str(s.dvc_remote),
        "feedback_db": s.feedback_db,
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_info(measure: bool = False, params: str | None = None) -> dict:
    """The CPU profile and every model probe this home holds (``lmcore.probe``); with ``measure``,
    the model of ``params`` (default: the workspace's) is probed now if it was not yet."""
    from lmcore.machine import cpu_profile  # lazy: keeps `lmops --help` fast
    from lmcore.model.decode import cached_int8_matvec_speedup, int8_matvec_speedup  # lazy: as above
    from lmcore.probe import cached_compiled_steps, cached_decode_probes, cached_probes, probe  # lazy: as above

    if measure:
        from lmcore.model.transformer import ModelConfig  # lazy: keeps `lmops --help` fast
        from lmcore.probe import Shape  # lazy: keeps `lmops --help` fast

        p = load_params_cli(params, None)
        vocab = p.tokenizer.vocab_size if p.tokenizer.kind == "bpe" else 257
        probe(Shape.of(ModelConfig.from_params(p.model, vocab), p.train.batch_size))
        int8_matvec_speedup()
    probes = [{"shape": pr.shape.__dict__, "decisions": pr.decisions.__dict__,
               "measurements": pr.measurements.__dict__, "measured_at": pr.measured_at} for pr in cached_probes()]
    return {"cpu": cpu_profile(), "probes": probes, "decode_probes": cached_decode_probes(),
            "compiled_steps": cached_compiled_steps(), "int8_decode": cached_int8_matvec_speedup()}


def _probe_rows(machine: dict) -> list[list]:
    from lmcore.machine import describe_cpu  # lazy: keeps `lmops --help` fast

    rows: list[list] = [["cpu", describe_cpu(machine["cpu"])]]
    if not machine["probes"]:
        rows.append(["probe", "no model probed yet: the first `lmops train` does it (or `lmops info --probe`)"])
    for pr in machine["probes"]:
        s, d, m = pr["shape"], pr["decisions"], pr["measurements"]
        name = f"probe {s['n_layer']}L x {s['d_model']} (batch {s['batch_size']}x{s['block_size']})"
        bf16 = f"{m['step_ms_fp32'] / m['step_ms_bf16']:.2f}x" if m["step_ms_bf16"] else "not timed, its matmul is slow"
        rows.append([name, f"dtype {d['train_dtype']} (bf16 step: {bf16}); optimizer {d['optimizer']} "
                           f"(Muon iteration {d['muon_ns_dtype']}, {d['muon_overhead']:.0%} of a step)"])
    for pr in machine["decode_probes"]:
        s, d = pr["shape"], pr["decode"]
        rows.append([f"decode {s['n_layer']}L x {s['d_model']}",
                     f"threads {d['decode_threads'] or 'all'} (1: {d['decode_ms_1']} ms/token, {d['threads']}: "
                     f"{d['decode_ms_n']} ms); int8 linear {d['int8_speedup']:.2f}x fp32 ({d['int8_engine']})"])
    for c in machine.get("compiled_steps", []):
        s, ms = c["shape"], c["ms"]
        timed = ", ".join(f"{'1' if k == '1' else 'all'}: {v} ms" for k, v in sorted(ms.items()))
        rows.append([f"compiled{' int8' if c.get('int8') else ''} decode {s['n_layer']}L x {s['d_model']}",
                     f"threads {'all' if c['threads'] == 0 else 1} (step times as generated: {timed})"])
    if q := machine.get("int8_decode"):
        reads = "int8 weights" if q["speedup"] >= 1.0 else "their float values (the int8 kernel is slower here)"
        on = " x ".join(map(str, q["shape"]))
        rows.append(["compiled int8 decode", f"int8 kernel {q['speedup']:.2f}x fp32 ({q['int8_us']} vs "
                                             f"{q['fp32_us']} us on {on} weights): int8 models decode from {reads}"])
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        as_json: bool = JSON_OPTION,
        measure: bool = typer.Option(False, "--probe", help="Probe this machine at the params' model shape now, "
                                     "and its compiled int8 decode kernel (once; otherwise the first `lmops train` "
                                     "and the first compiled int8 decode do it)."),
        params: str = PARAMS_OPTION,
    ) -> None:
        """Show where lmops keeps everything, stack versions, and what this machine's probe chose.

        The probe (lmcore.probe) times fp32 vs bf16 training steps, Muon's iteration, decode
        threads and int8 kernels at the model's shapes, once per machine; `train.dtype: auto` and
        `train.optimizer: auto` follow it.
        """
        data = collect_info()
        data["machine"] = machine_info(measure, params)
        if as_json:
            emit_json(data)
            return
        rows = [[k, v] for k, v in data.items() if k not in ("versions", "machine")]
        rows += [[f"version: {k}", v or "not installed"] for k, v in data["versions"].items()]
        rows += _probe_rows(data["machine"])
        print_table("lmops info", ["what", "where / value"], rows)
