"""DDP under torchrun: two CPU processes (gloo) train one tiny model and stay in lockstep."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from _lm_helpers import ROOT, tiny_params, write_corpus
from safetensors.torch import load_file

from lmcore.data.prepare import prepare_dataset, read_text_source

pytestmark = [pytest.mark.model, pytest.mark.slow]

WORKER = """
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
from safetensors.torch import save_file
from _lm_helpers import tiny_params
from lmcore.training.loop import train

def dump(model):
    sd = {{k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}}
    save_file(sd, str(Path({out!r}) / f"rank{{os.environ['RANK']}}.safetensors"))

p = tiny_params(train__max_steps=30, train__eval_interval=15, train__checkpoint_interval=15)
r = train(Path({data!r}), Path({out!r}), p.model, p.train, progress=True, on_model=dump)
(Path({out!r}) / f"done{{os.environ['RANK']}}.txt").write_text(f"{{r.steps}} {{r.tokens}}")
"""


def test_torchrun_two_cpu_ranks(tmp_path):
    p = tiny_params(prepare__val_fraction=0.2)
    data = prepare_dataset(read_text_source(write_corpus(tmp_path / "corpus", n_files=8)), tmp_path / "data",
                           p.tokenizer, p.prepare).dir
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), data=str(data), out=str(out)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks finished; each step consumed 2 ranks x batch x block tokens
    for rank in (0, 1):
        assert (out / f"done{rank}.txt").read_text() == f"30 {30 * 2 * 8 * 32}"
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks diverged at {k}"
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert losses[-1] < losses[0] - 1.0
    assert (out / "model" / "model.safetensors").is_file()
    assert "step 15/30" in proc.stderr and proc.stderr.count("step 30/30") == 1  # only rank 0 prints
