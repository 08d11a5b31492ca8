"""Code tier: params are strict, typed and hashed consistently."""

import pytest

from lmcore.config import Params, load_params, parse_override
from lmcore.errors import LmopsError

pytestmark = pytest.mark.code


def test_workspace_params_load(root):
    p = load_params(root / "params.yaml")
    assert isinstance(p, Params)
    assert p.model.d_model % p.model.n_head == 0
    assert p.flat()["train.lr"] == p.train.lr


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lr: 0.001\n  lrr: 2\n")
    with pytest.raises(LmopsError, match="unknown params key 'train.lrr'"):
        load_params(f)


def test_negative_lr_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lr: -0.1\n")
    with pytest.raises(LmopsError, match="train.lr must be > 0"):
        load_params(f)


def test_wrong_type_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  n_layer: two\n")
    with pytest.raises(LmopsError, match="model.n_layer must be an integer"):
        load_params(f)


def test_overrides_and_hash(root):
    a = load_params(root / "params.yaml")
    b = load_params(root / "params.yaml", dict([parse_override("train.lr=0.01")]))
    assert b.train.lr == 0.01
    assert a.slice_hash("model") == b.slice_hash("model")
    assert a.slice_hash("train") != b.slice_hash("train")
