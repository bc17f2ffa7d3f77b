"""Preset sizes match the paper's parameter counts, computed from shapes alone (nothing allocated)."""

from __future__ import annotations

import pytest

from igpt_jax import config_checks, model
from igpt_jax.configs import fashion_mnist, igpt_l, igpt_m, igpt_s, igpt_xl

# Parameters by shape: wte V*d + wpe P*d + sos d + L * (q, k, v, out 4d^2 + MLP 8d^2 + two gains 2d) + ln_f d
# + head d*V, with V = 512 colours and P = 1024 positions at 32x32 (4096 for XL at 64x64). The paper's rounded
# figures: 76M, 455M, 1.4B, 6.8B.
EXACT = [
    (igpt_s, 512 * 512 + 1024 * 512 + 512 + 24 * (12 * 512**2 + 2 * 512) + 512 + 512 * 512, 76_571_648),
    (igpt_m, 512 * 1024 + 1024 * 1024 + 1024 + 36 * (12 * 1024**2 + 2 * 1024) + 1024 + 1024 * 512, 455_157_760),
    (igpt_l, 512 * 1536 + 1024 * 1536 + 1536 + 48 * (12 * 1536**2 + 2 * 1536) + 1536 + 1536 * 512, 1_362_250_752),
    (igpt_xl, 512 * 3072 + 4096 * 3072 + 3072 + 60 * (12 * 3072**2 + 2 * 3072) + 3072 + 3072 * 512, 6_810_875_904),
]


@pytest.mark.parametrize("preset, by_shape, count", EXACT)
def test_parameter_counts_are_exact(preset, by_shape, count):
    assert by_shape == count
    assert model.count_params(model.abstract(preset.get_config())) == count


def test_xl_at_64x64():
    config = igpt_xl.get_config()
    assert config.model.image_size == 64 and config.model.num_positions == 4096
    assert (
        config.model.embed_dim // config.model.num_heads == 128 and config.model.embed_dim % config.model.num_heads == 0
    )


@pytest.mark.parametrize("preset", [igpt_s, igpt_m, igpt_l, igpt_xl, fashion_mnist])
@pytest.mark.parametrize("arg", [None, "32", "image_size=48", "64"])
def test_image_size_argument_sets_context(preset, arg):
    config = preset.get_config(arg)
    if arg:
        side = int(arg.split("=")[-1])
        assert config.model.image_size == side and config.model.num_positions == side * side
    config_checks.check(config)


def test_unknown_config_argument_is_refused():
    with pytest.raises(ValueError, match=r"'foo' is unknown; allowed: \['image_size'\]"):
        igpt_s.get_config("foo=3")


@pytest.mark.parametrize("side", [96, 128, 192])
def test_long_image_presets_are_what_fits_one_image_per_chip(side):
    """`configs/igpt_l.py:192` is the README's 192x192 run: batch 64, bf16, full remat (the sequence split is the
    command line's, for more chips than images)."""
    config = igpt_l.get_config(str(side))
    assert config.model.num_positions == side * side and config.batch_size == 64
    assert (config.model.dtype, config.model.remat, config.mesh.ici.sequence) == ("bfloat16", "full", 1)
    config.mesh.ici.sequence = 4
    config_checks.check(config)
    assert igpt_l.get_config("64").batch_size == 128 and igpt_l.get_config("64").model.dtype == "float32"
