import pytest

from matta.config import ModelConfig
from tests.helpers import tiny_config


def test_widths_resolve_by_name_int_and_per_layer(config):
    assert config.resolve_width("s") == (32, 32, 32)
    assert config.resolve_width(100) == (100, 100, 100)
    assert config.resolve_width("100") == (100, 100, 100)
    assert config.resolve_width(["s", 48, "ta"]) == (32, 48, 256)
    assert config.resolve_width(None) == (256, 256, 256)
    assert config.width_label(["s", "s", "s"]) == "s"
    assert config.width_label(["s", "m", "ta"]) == "32-64-256"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("xl", "unknown width 'xl'"),
        (0, "width 0 is out of range 1..256"),
        (257, "width 257 is out of range"),
        (["s", "m"], "has 2 entries; the model has 3 layers"),
        (1.5, "must be a name, an int"),
        (True, "must be a name, an int"),
    ],
)
def test_bad_widths_are_refused_quoting_the_value(config, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config.resolve_width(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"widths": {"s": 64, "ta": 32}}, "strictly ascending"),
        ({"widths": {"s": 64, "m": 64}}, "strictly ascending"),
        ({"widths": {}}, "non-empty"),
        ({"widths": {"1x": 8}}, "width name '1x' is invalid"),
        ({"widths": {"s": -4}}, "must be a positive int, got -4"),
        ({"d_model": 63}, "not divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive int, got 0"),
        ({"eos_token_id": 999}, "eos_token_id 999 is outside"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_dict_and_rejects_unknown_keys(config):
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys \\['dropout'\\]"):
        ModelConfig.from_dict({**config.to_dict(), "dropout": 0.1})


def test_flops_and_params_grow_with_width(config):
    flops = [config.flops_per_token(n) for n in config.width_names]
    params = [config.param_count(n) for n in config.width_names]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert params == sorted(params)
    # FFN difference between two widths is exactly 2*d*(m2-m1) matmul weights per layer, x2 FLOPs.
    d, L = config.d_model, config.n_layer
    assert config.flops_per_token("m") - config.flops_per_token("s") == 2 * L * 2 * d * (64 - 32)


def test_default_config_keeps_head_dim_64_and_a_real_cost_range():
    config = ModelConfig()
    assert config.head_dim == 64
    assert config.flops_per_token(config.student_width) <= 0.5 * config.flops_per_token(config.full_width)
