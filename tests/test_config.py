"""Code tier: params are strict, typed and hashed consistently; params.yaml holds every default."""

import dataclasses

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



def test_params_yaml_holds_the_only_defaults(root):
    """Every default is the shipped params.yaml's value: no dataclass carries a literal default of its own."""
    from lmcore.config import SHIPPED_PARAMS, shipped_params

    assert SHIPPED_PARAMS.resolve().read_bytes() == (root / "params.yaml").read_bytes()
    defaults = Params()
    assert defaults == load_params(root / "params.yaml") == shipped_params()
    for section in dataclasses.fields(Params):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            assert f.default is dataclasses.MISSING, f"{section.name}.{f.name} has a default in the code"


def test_left_out_keys_take_the_shipped_values(tmp_path, root):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lr: 0.001\n")
    p, shipped = load_params(f), load_params(root / "params.yaml")
    assert p.train == dataclasses.replace(shipped.train, lr=0.001)
    assert p.model == shipped.model and p.optimize.search_space == shipped.optimize.search_space


def test_shipped_file_must_give_every_key():
    from lmcore.config import TrainParams, from_dict

    with pytest.raises(LmopsError, match="params key 'train.batch_size' is missing"):
        from_dict(TrainParams, {"device": "cpu"}, "train", complete=True)


def test_override_into_an_empty_section(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n")
    assert load_params(f, {"train.lr": 0.002}).train.lr == 0.002
