"""Shared helpers for the tracking/registry tests: a migrated MLflow DB template, tiny data and models.

Creating a fresh MLflow sqlite store runs ~40 migrations (5-10 s on a busy 2-core box), so the
first call migrates one template database and every test home gets a copy of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/data/tinyshakespeare.txt"
_TEMPLATE: dict[str, Path] = {}


def template_db(base: Path) -> Path:
    if "db" not in _TEMPLATE:
        from mlflow import MlflowClient

        path = base / "template-mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
        _TEMPLATE["db"] = path
    return _TEMPLATE["db"]


def make_home(home: Path, template_base: Path) -> Path:
    """An lmops home with an already-migrated MLflow store; sets LMOPS_HOME."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db(template_base), home / "mlflow.db")
    os.environ["LMOPS_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


def corpus_text(n_chars: int = 24_000) -> str:
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8")[:n_chars]
    return ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 400)[:n_chars]


def prepared_data(out: Path) -> Path:
    """A byte-tokenized prepared folder: ~20k chars train, ~4k chars val."""
    from lmcore.config import TokenizerParams
    from lmcore.data.prepare import prepare_split_texts

    text = corpus_text()
    cut = int(len(text) * 0.83)
    prepare_split_texts([text[:cut]], [text[cut:]], out, TokenizerParams(kind="byte"), dataset_version="testdata")
    return out


def tiny_model_dir(out: Path, seed: int = 0, nan: bool = False) -> Path:
    """An untrained 1-layer, d_model 32 model folder with the byte tokenizer."""
    import torch

    from lmcore.data.tokenizer import Tokenizer
    from lmcore.model.checkpoint import save_model
    from lmcore.model.transformer import ModelConfig, Transformer

    tok = Tokenizer.train([], kind="byte")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=32,
                                    block_size=64))
    if nan:
        with torch.no_grad():
            model.embed.weight.fill_(float("nan"))
    return save_model(out, model, tok, {"dataset_version": "testdata"})


def tiny_params(**train_overrides):
    """Params for tiny, fast runs (1 layer, d_model 32, a few steps on CPU)."""
    from lmcore.config import EvalParams, ModelParams, Params, TrainParams

    train = dict(device="cpu", batch_size=8, max_steps=40, max_minutes=0, warmup_steps=5, eval_interval=20,
                 eval_iters=2, checkpoint_interval=1000, lr=1e-2, min_lr=1e-3)
    train.update(train_overrides)
    return Params(
        model=ModelParams(n_layer=1, n_head=2, n_kv_head=2, d_model=32, block_size=64),
        train=TrainParams(**train),
        eval=EvalParams(batch_size=8, max_batches=4, n_samples=2, sample_max_new_tokens=16,
                        prompts=("ROMEO:", "First Citizen:\n")),
    )


def trained_model(data_dir: Path, out: Path, on_metrics=None, **train_overrides):
    from lmcore.training.loop import train

    p = tiny_params(**train_overrides)
    return train(data_dir, out, p.model, p.train, progress=False, on_metrics=on_metrics, dataset_version="testdata")
