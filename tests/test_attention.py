"""Every attention implementation equals `xla` (forward and gradients, causal and not, lengths that do and do not
tile), alone and sharded over the 8 fake devices; blockwise skips masked blocks and never holds an S x S matrix;
`auto` picks by the mesh's platform; a kernel that cannot take a call falls back and says why."""

from __future__ import annotations

import functools
import logging
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from igpt_jax import attention, model, sharding
from igpt_jax.attention import blockwise, cudnn

FORWARD_TOL, GRAD_TOL = 2e-5, 1e-4  # fp32, inputs ~N(0, 1)
IMPLEMENTATIONS_TO_SIZE = (attention.xla_attention, blockwise.blockwise_attention)


def _qkv(length: int, batch: int = 2, heads: int = 2, head_dim: int = 16, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (batch, length, heads, head_dim)) for k in keys]


def _check_equal(fn, length: int, causal: bool, **shape):
    q, k, v, weights = _qkv(length, **shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, causal=causal) * weights)

    want = attention.xla_attention(q, k, v, causal=causal)
    got = jax.jit(lambda q, k, v: fn(q, k, v, causal=causal))(q, k, v)
    np.testing.assert_allclose(got, want, atol=FORWARD_TOL, rtol=0)
    grads_want = jax.grad(loss(attention.xla_attention), (0, 1, 2))(q, k, v)
    grads_got = jax.jit(jax.grad(loss(fn), (0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", grads_got, grads_want, strict=True):
        np.testing.assert_allclose(g, w, atol=GRAD_TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [64, 300, 784, 257])  # one block; 3 x 100; 7 x 112; prime: padded to 3 x 128
def test_blockwise_equals_xla(length, causal):
    _check_equal(blockwise.blockwise_attention, length, causal)


@pytest.mark.parametrize(("length", "causal"), [(256, True), (256, False), (200, True)])  # 200: padded to 256
def test_splash_equals_xla_in_the_pallas_interpreter(length, causal):
    _check_equal(attention.KERNELS["splash"].fn, length, causal, batch=1, head_dim=32)


def test_block_sizes_divide_igpt_lengths():
    assert blockwise.block_size(784) == 112  # Fashion-MNIST 28x28: 7 blocks, no padding
    assert blockwise.block_size(1024) == 128
    assert blockwise.block_size(2304) == 128
    assert blockwise.block_size(100) == 100  # short: one block
    assert blockwise.block_size(257) == 128  # nothing divides: padded


def _mesh(**ici):
    config = tiny_config()
    config.mesh.ici.update({"data": 1, "fsdp": 1, "tensor": 1} | ici)
    return config, sharding.make_mesh(config, jax.devices())


@pytest.mark.parametrize("name", ["blockwise", "splash"])
def test_sharded_over_images_and_heads_equals_unsharded_xla(name):
    """fsdp=4 over the images, tensor=2 over the heads: splash runs per shard inside shard_map."""
    config, mesh = _mesh(fsdp=4, tensor=2)
    q, k, v, weights = _qkv(256, batch=4, heads=2, head_dim=32)
    fn = attention.KERNELS[name].fn
    spec = sharding.logical_to_spec(("act_batch", "act_len", "heads", None), config.logical_axis_rules, mesh.axis_names)
    placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v)]

    def loss(q, k, v):
        with sharding.axis_rules(config.logical_axis_rules):
            return jnp.sum(fn(q, k, v, causal=True) * weights)

    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(*placed)
    want, grads_want = jax.value_and_grad(
        lambda q, k, v: jnp.sum(attention.xla_attention(q, k, v, causal=True) * weights), (0, 1, 2)
    )(q, k, v)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for g, w in zip(grads, grads_want, strict=True):
        np.testing.assert_allclose(g, w, atol=GRAD_TOL, rtol=0)


def _compiled(fn, length: int, grad: bool):
    q, k, v, _ = _qkv(length, batch=1, heads=2, head_dim=32)
    f = (
        (lambda q, k, v: fn(q, k, v, causal=True))
        if not grad
        else jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, causal=True)), (0, 1, 2))
    )
    return jax.jit(f).lower(q, k, v).compile()


def test_blockwise_skips_masked_blocks():
    """Causal, 1,024 tokens in 8 blocks of 128: 9/16 of the full square's products. The gradient also recomputes
    the scores (7 products of the square where autodiff's saved probabilities need 6): 9/16 x 7/6 of xla's."""
    for grad, expected in ((False, 9 / 16), (True, 9 / 16 * 7 / 6)):
        full = _compiled(attention.xla_attention, 1024, grad).cost_analysis()["flops"]
        ours = _compiled(blockwise.blockwise_attention, 1024, grad).cost_analysis()["flops"]
        assert ours / full == pytest.approx(expected, abs=0.03), grad


def test_blockwise_keeps_no_probabilities_for_the_backward_pass():
    """What the forward pass hands the backward (the VJP's residuals) at 2,048 tokens: xla and autodiff keep the
    [heads, S, S] probabilities (32 MiB here); blockwise keeps q, k, v, the output and the log-sum-exp (2 MiB)."""
    length, heads = 2048, 2
    matrix = heads * length * length * 4
    q = jnp.ones((1, length, heads, 32))

    def residual_bytes(fn):
        _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal=True), q, q, q)
        return sum(x.nbytes for x in jax.tree.leaves(vjp))

    assert residual_bytes(attention.xla_attention) > matrix
    assert residual_bytes(blockwise.blockwise_attention) < 5 * q.nbytes
    # and the whole gradient's temporaries stay well under xla's (59 against 97 MiB measured)
    temp = {fn: _compiled(fn, length, True).memory_analysis().temp_size_in_bytes for fn in IMPLEMENTATIONS_TO_SIZE}
    assert temp[blockwise.blockwise_attention] < 0.75 * temp[attention.xla_attention]


def test_auto_picks_by_the_platform_of_the_mesh():
    assert attention.resolve("auto", "cpu", length=1024) == "blockwise"
    assert attention.resolve("auto", "tpu", length=1024) == "splash"
    assert attention.resolve("auto", "rocm", length=1024) == "xla"  # a platform the table does not list
    _, mesh = _mesh(fsdp=8)
    with jax.set_mesh(mesh):
        assert attention.resolve("auto") == "blockwise"  # this host's fake devices are CPUs
    with pytest.raises(ValueError, match="allowed"):
        attention.resolve("flash")


def test_auto_reads_the_crossover_of_its_table_on_both_sides():
    """The GPU row as measured (blockwise up to 1,024 tokens, cuDNN beyond, xla for float32), and a table changed to
    another crossover moves the choice with it: at trace time too, by the traced inputs' length and dtype."""
    gpu = functools.partial(attention.resolve, "auto", "gpu", 1)
    assert (gpu(1024, jnp.bfloat16), gpu(1025, jnp.bfloat16), gpu(2304, jnp.float16)) == ("blockwise", "cudnn", "cudnn")
    assert gpu(4096, jnp.float32) == "xla"
    ran = []
    spies = {name: attention.Kernel(_spy(ran, name), costed_by_xla=True) for name in ("xla", "blockwise")}
    rule = attention.AutoRule(((16, "xla"), (None, "blockwise")), "xla", "a test's")
    with (
        mock.patch.dict(attention.AUTO, {"cpu": rule}),
        mock.patch.dict(attention.KERNELS, spies),
        jax.set_mesh(_mesh(fsdp=8)[1]),
    ):
        for length in (16, 17):
            q = jnp.zeros((1, length, 2, 8), jnp.bfloat16)
            jax.jit(functools.partial(attention.get("auto"), causal=True)).lower(q, q, q)
        jax.jit(functools.partial(attention.get("auto"), causal=True)).lower(*[q.astype(jnp.float32)] * 3)
    assert ran == ["xla", "blockwise", "xla"]


def test_a_kernel_is_its_registry_entry_and_is_treated_by_its_traits():
    """A kernel added to attention.KERNELS alone, declared opaque to XLA's cost analysis and splitting the sequence
    (refusing image lengths that are not a multiple of 3 chunks a shard): the config checks accept its name and apply
    its refusal, `auto` takes it where the mesh splits the sequence, and the planner does not expect XLA to count its
    FLOPs."""
    from igpt_jax import config_checks
    from igpt_jax.planning import compiled

    def thirds(tokens: int, shards: int) -> str | None:
        return None if tokens % (3 * shards) == 0 else f"{tokens} tokens do not cut into {3 * shards} chunks"

    fake = attention.Kernel(attention.xla_attention, costed_by_xla=False, split_refusal=thirds)
    config = tiny_config()  # 4x4 images: 16 tokens
    config.mesh.ici.update({"data": 1, "fsdp": 4, "sequence": 2, "tensor": 1})
    config.model.attention = "fake"
    with pytest.raises(config_checks.ConfigError, match="fake") as unknown:
        config_checks.check(config)
    assert "is unknown" in str(unknown.value)
    with mock.patch.object(attention, "KERNELS", {"fake": fake, **attention.KERNELS}):
        with pytest.raises(config_checks.ConfigError, match="16 tokens do not cut into 6 chunks"):
            config_checks.check(config)
        config.model.attention = "auto"  # auto takes the first kernel that splits the sequence: the fake one
        assert attention.resolve("auto", "tpu", sequence=2) == "fake"
        with pytest.raises(config_checks.ConfigError, match="16 tokens do not cut into 6 chunks"):
            config_checks.check(config)
        config.model.attention = "fake"
        assert not compiled.xla_counts_attention(config)
    config.model.attention = "ring"  # ring cuts 16 tokens into 4 chunks of 4: accepted
    config_checks.check(config)
    assert compiled.xla_counts_attention(config)


def _spy(ran: list[str], name: str):
    def run(q, k, v, *, causal):
        ran.append(name)
        return q

    return run


def test_cudnn_says_what_it_cannot_take_and_falls_back(caplog):
    bf16 = jnp.zeros((1, 8, 2, 96), jnp.bfloat16)
    assert cudnn.refusal(bf16, "gpu") is None  # iGPT-L's head_dim 96 in bf16 on a GPU
    assert "float32" in cudnn.refusal(bf16.astype(jnp.float32), "gpu")
    assert "head_dim" in cudnn.refusal(jnp.zeros((1, 8, 2, 12), jnp.bfloat16), "gpu")
    assert "GPU" in cudnn.refusal(bf16, "cpu")
    with caplog.at_level(logging.WARNING, logger="igpt_jax.attention"):
        _check_equal(attention.KERNELS["cudnn"].fn, 64, True)  # on this CPU: xla, and the log says so
    assert any("'cudnn' cannot run here" in r.message and "'xla'" in r.message for r in caplog.records)
    assert attention.running("cudnn") == "xla (in place of cudnn)"  # the progress line names what ran
    assert attention.running("blockwise") == "blockwise"


def test_mlp_backward_equals_autodiff():
    """The hand-written quick-GELU MLP backward against autodiff of the plain formula."""
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (2, 7, 16))
    fc, proj = 0.3 * jax.random.normal(keys[1], (16, 64)), 0.3 * jax.random.normal(keys[2], (64, 16))
    weights = jax.random.normal(keys[3], (2, 7, 16))

    def plain(x, fc, proj):
        return jnp.sum(model.quick_gelu(x @ fc) @ proj * weights)

    def ours(x, fc, proj):
        return jnp.sum(model.quick_gelu_mlp(x, fc, proj) * weights)

    np.testing.assert_allclose(ours(x, fc, proj), plain(x, fc, proj), rtol=1e-6)
    for g, w in zip(jax.grad(ours, (0, 1, 2))(x, fc, proj), jax.grad(plain, (0, 1, 2))(x, fc, proj), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
