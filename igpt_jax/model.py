"""Image GPT exactly as OpenAI built it (github.com/openai/image-gpt, src/model.py), in Flax NNX.

A GPT-2 pre-norm decoder with OpenAI's changes: a gain-only RMS norm (no mean, no bias, eps inside the sqrt), no
biases anywhere, quick-GELU x*sigmoid(1.702x), learned absolute positions, a learned start-of-sequence vector that
is not a vocabulary row, an untied output head, and OpenAI's initialisation (the output head starts at zero). No
dropout.

Tokens in, logits and named intermediates out (big_vision's `(x, out)`): `logits, out = model(tokens[B, N])` gives
fp32 logits [B, N, vocab] where position i predicts token i, and `out` holds what other modes read from the same
forward pass: 'probe_features' [L, B, d] (block l's ln_1 output averaged over positions: the paper's linear-probe
features), 'pre_logits' [B, d] (the ln_f output averaged over positions) and, with `model.num_classes` > 0,
'class_logits' [B, classes] from a zero-initialised linear head on pre_logits (OpenAI's `wclf`, for fine-tuning).
Whatever a caller leaves unused is dropped by the compiler. In AR mode the input is [SOS, x_0 .. x_{N-2}] (the last
token is never an input) under a causal mask; in BERT mode the input is x_0 .. x_{N-1} with masked positions'
embeddings zeroed, no causal mask and no SOS.

The blocks' parameters are stacked along a leading `layers` axis, whether the forward pass scans over them
(`scan_layers=True`: one compiled block, fast compiles for 48-60 layers) or unrolls a Python loop. The parameter tree
is therefore the same either way, and so are checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from igpt_jax import attention as attention_lib
from igpt_jax import objectives
from igpt_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Named rematerialisation policies (config.model.remat). `None` means no remat: every activation is kept.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep every matmul output, recompute the cheap elementwise work (norms, GELU, softmax).
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    # Keep only weight matmuls (no batch dims), recompute attention scores: MaxText's "minimal".
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACTIVATION_NAMES = ("act_batch", "act_len", "act_embed")
# A decoding cache [B, heads, positions, head_dim]: images over the batch axes, heads over `tensor` like the weights.
CACHE_NAMES = ("act_batch", "heads", "act_len", "kv")
# One layer's decoding cache: {'k': blocks, 'v': blocks}, consecutive blocks of positions (see IGPT.init_cache).
Cache = dict[str, list[jax.Array]]


def _param(init: Callable, rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter carrying its logical axis names; sharding is applied later by jit, never eagerly here."""
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's "gelu2": x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


@jax.custom_vjp
def quick_gelu_mlp(x: jax.Array, fc: jax.Array, proj: jax.Array) -> jax.Array:
    """quick_gelu(x @ fc) @ proj over the last axis of x, with a hand-written backward pass.

    Autodiff's backward of this MLP fuses the GELU derivative with a transpose into a [tokens, 4d] buffer laid out
    for the weight-gradient matmul, which on a CPU is written at about 1 GB/s and cost 15% of a training step.
    Here every product is an explicit 2-D matmul over (tokens, features) and the derivative of x sigmoid(1.702 x) is
    written out, so XLA sees plain GEMMs. Saves x and the pre-activation, as autodiff does."""
    return _mlp_forward(x, fc, proj)[0]


def _mlp_forward(x, fc, proj):
    x2 = x.reshape(-1, x.shape[-1])
    pre = x2 @ fc
    y = quick_gelu(pre) @ proj
    return y.reshape(*x.shape[:-1], proj.shape[-1]), (x2, pre, fc, proj)


def _mlp_backward(residuals, dy):
    x2, pre, fc, proj = residuals
    dy2 = dy.reshape(-1, dy.shape[-1])
    p32 = pre.astype(jnp.float32)
    sig = jax.nn.sigmoid(1.702 * p32)
    hidden = (p32 * sig).astype(pre.dtype)
    d_hidden = (dy2 @ proj.T).astype(jnp.float32)
    d_pre = (d_hidden * (sig + 1.702 * p32 * sig * (1.0 - sig))).astype(pre.dtype)
    dx = (d_pre @ fc.T).reshape(*dy.shape[:-1], fc.shape[0])
    return dx, x2.T @ d_pre, hidden.T @ dy2


quick_gelu_mlp.defvjp(_mlp_forward, _mlp_backward)


class RMSNorm(nnx.Module):
    """OpenAI's `norm`: x / sqrt(mean(x^2) + eps) * g. No mean subtraction, no bias; computed in fp32."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(nnx.initializers.ones, rngs, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with per-head projections and no biases."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        d, h = cfg.embed_dim, cfg.num_heads
        pd = DTYPES[cfg.param_dtype]
        qkv_init = nnx.initializers.normal(1.0 / math.sqrt(d))
        out_init = nnx.initializers.normal(1.0 / math.sqrt(d * cfg.num_layers))
        names = ("embed", "heads", "kv")
        self.query = _param(qkv_init, rngs, (d, h, d // h), names, pd)
        self.key = _param(qkv_init, rngs, (d, h, d // h), names, pd)
        self.value = _param(qkv_init, rngs, (d, h, d // h), names, pd)
        self.out = _param(out_init, rngs, (h, d // h, d), ("heads", "kv", "embed"), pd)
        self.dtype = DTYPES[cfg.dtype]
        self.attend = attention_lib.get(cfg.attention)

    def _project(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        return jnp.einsum("bsd,dhk->bshk", x, w[...].astype(self.dtype))

    def _output(self, o: jax.Array) -> jax.Array:
        return jnp.einsum("bshk,hkd->bsd", o, self.out[...].astype(self.dtype))

    def __call__(self, x: jax.Array, *, causal: bool) -> jax.Array:
        q, k, v = (self._project(x, w) for w in (self.query, self.key, self.value))
        return self._output(self.attend(q, k, v, causal=causal))

    def decode(self, x: jax.Array, cache: Cache, index: jax.Array, block: int) -> tuple[jax.Array, Cache]:
        """One position: x [B, 1, d] at sequence position `index`, inside cache block `block` (static): its key and
        value are written there, then it attends over blocks 0 .. block (the ones filled so far)."""
        size = cache["k"][0].shape[2]

        def write(blocks: list[jax.Array], w: nnx.Param) -> list[jax.Array]:
            # projected as [B, 1, heads, head_dim] and moved to heads-major by a bitcast (one position): an
            # einsum straight to "bhsk" makes XLA transpose the weight matrix at every position
            new = jnp.swapaxes(self._project(x, w), 1, 2).astype(blocks[block].dtype)
            updated = jax.lax.dynamic_update_slice(blocks[block], new, (0, 0, index - block * size, 0))
            return [*blocks[:block], constrain(updated, CACHE_NAMES), *blocks[block + 1 :]]

        cache = {"k": write(cache["k"], self.key), "v": write(cache["v"], self.value)}
        q = self._project(x, self.query)
        o = attention_lib.cached_attention(q, cache["k"][: block + 1], cache["v"][: block + 1], index + 1)
        return self._output(o), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        d, m = cfg.embed_dim, cfg.embed_dim * cfg.mlp_ratio
        pd = DTYPES[cfg.param_dtype]
        init = nnx.initializers.normal(0.02)
        self.fc = _param(init, rngs, (d, m), ("embed", "mlp"), pd)
        self.proj = _param(init, rngs, (m, d), ("mlp", "embed"), pd)
        self.dtype = DTYPES[cfg.dtype]

    def __call__(self, x: jax.Array) -> jax.Array:
        return quick_gelu_mlp(x, self.fc[...].astype(self.dtype), self.proj[...].astype(self.dtype))


class Block(nnx.Module):
    """Pre-norm block: a = h + attn(norm(h)); out = a + mlp(norm(a))."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.norm_eps, param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        self.ln_1 = RMSNorm(cfg.embed_dim, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = RMSNorm(cfg.embed_dim, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, h: jax.Array, *, causal: bool) -> tuple[jax.Array, jax.Array]:
        """Returns the new residual stream and norm(h): the paper's linear-probe features for this layer."""
        n = self.ln_1(h)
        h = h + self.attn(n, causal=causal)
        h = h + self.mlp(self.ln_2(h))
        return h, n

    def decode(self, h: jax.Array, cache: Cache, index: jax.Array, block: int) -> tuple[jax.Array, Cache]:
        """`__call__` for the one position `index` (causal), reading and extending the layer's key/value cache."""
        a, cache = self.attn.decode(self.ln_1(h), cache, index, block)
        h = h + a
        return h + self.mlp(self.ln_2(h)), cache


def _stacked_blocks(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Block:
    """`num_layers` blocks as one Block whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return create(rngs)


class IGPT(nnx.Module):
    """The whole model. `objective` (objectives.OBJECTIVES) fixes, by its `left_to_right` trait, how inputs are
    formed and whether attention is causal."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, objective: str = "ar", rngs: nnx.Rngs):
        self.left_to_right = objectives.get(objective).left_to_right
        d, v = cfg.embed_dim, cfg.vocab_size
        pd = DTYPES[cfg.param_dtype]
        normal = nnx.initializers.normal
        self.objective = objective
        self.dtype = DTYPES[cfg.dtype]
        self.num_layers = cfg.num_layers
        self.num_heads = cfg.num_heads
        self.scan_layers = cfg.scan_layers
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={cfg.remat!r} is unknown; allowed: {list(REMAT_POLICIES)}")
        self.remat = cfg.remat
        self.wte = _param(normal(0.02), rngs, (v, d), ("vocab", "embed"), pd)
        self.wpe = _param(normal(0.01), rngs, (cfg.num_positions, d), (None, "embed"), pd)
        self.sos = _param(normal(0.02), rngs, (d,), ("embed",), pd)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.ln_f = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        # OpenAI zero-initialises every projection that produces logits.
        self.head = _param(nnx.initializers.zeros, rngs, (d, v), ("embed", "vocab"), pd)
        if cfg.get("num_classes", 0):
            self.classifier = _param(nnx.initializers.zeros, rngs, (d, cfg.num_classes), ("embed", None), pd)

    def embed(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Input embeddings [B, N, d]: AR shifts in the SOS vector; BERT zeroes masked positions."""
        n = tokens.shape[1]
        if n > self.wpe.shape[0]:
            raise ValueError(f"{n} tokens do not fit the {self.wpe.shape[0]}-row position table")
        wte = self.wte[...]
        if self.left_to_right:
            x = jnp.take(wte, tokens[:, :-1], axis=0)
            sos = jnp.broadcast_to(self.sos[...], (tokens.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([sos.astype(x.dtype), x], axis=1)
        else:
            x = jnp.take(wte, tokens, axis=0)
            if mask is not None:
                x = jnp.where(mask[..., None], 0, x)
        h = (x + self.wpe[:n][None]).astype(self.dtype)
        return constrain(h, ACTIVATION_NAMES)

    def run_blocks(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """All blocks over the residual stream; returns it and each layer's mean-pooled norm(h) as [L, B, d] fp32."""
        causal = self.left_to_right
        graphdef, stacked = nnx.split(self.blocks)

        def body(h, layer_params):
            h, n = nnx.merge(graphdef, layer_params)(h, causal=causal)
            return constrain(h, ACTIVATION_NAMES), jnp.mean(n.astype(jnp.float32), axis=1)

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            return jax.lax.scan(body, h, stacked)
        pooled = []
        for i in range(self.num_layers):
            h, p = body(h, jax.tree.map(lambda x, i=i: x[i], stacked))
            pooled.append(p)
        return h, jnp.stack(pooled)

    def normed_tokens(self, tokens: jax.Array, layer: int, *, mask: jax.Array | None = None) -> jax.Array:
        """n^layer at every position, fp32 [B, N, d] (the attentive probe's input): block `layer`'s ln_1 output, or
        ln_f's for layer = num_layers. Only the blocks before it run."""
        causal = self.left_to_right
        h = self.embed(tokens, mask)
        graphdef, stacked = nnx.split(self.blocks)

        def body(h, layer_params):
            h, _ = nnx.merge(graphdef, layer_params)(h, causal=causal)
            return constrain(h, ACTIVATION_NAMES), None

        if layer:
            h, _ = jax.lax.scan(body, h, jax.tree.map(lambda x: x[:layer], stacked))
        if layer == self.num_layers:
            return self.ln_f(h).astype(jnp.float32)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[layer], stacked)).ln_1(h).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits [B, N, vocab] fp32, named intermediates): see the module docstring.

        `mask` (bool [B, N], BERT only) marks the positions whose input embedding is zeroed.
        """
        if mask is not None and self.left_to_right:
            raise ValueError(f"a mask is only meaningful for a bidirectional objective, not {self.objective!r}")
        h, pooled = self.run_blocks(self.embed(tokens, mask))
        n = self.ln_f(h).astype(jnp.float32)  # logits and the head in fp32 (the head is small: vocab 512)
        logits = jnp.einsum("bsd,dv->bsv", n, self.head[...].astype(jnp.float32))
        out = {"probe_features": pooled, "pre_logits": jnp.mean(n, axis=1)}
        if hasattr(self, "classifier"):
            out["class_logits"] = out["pre_logits"] @ self.classifier[...].astype(jnp.float32)
        return logits, out

    # --- KV-cached decoding (AR): one position at a time, each block's keys and values kept in a cache.

    def init_cache(self, batch: int, length: int, blocks: int = 1) -> list[Cache]:
        """An empty cache for `length` positions in `blocks` equal blocks: per layer {'k', 'v'}, each a list of
        [batch, heads, length / blocks, head_dim] arrays in the compute dtype. Separate arrays per layer and per
        block, so a decoding loop updates each in place and reads only the blocks filled so far."""
        if length % blocks:
            raise ValueError(f"a cache of {length} positions cannot be cut into {blocks} equal blocks")
        d = self.wte.shape[1]
        shape = (batch, self.num_heads, length // blocks, d // self.num_heads)
        return [
            {name: [jnp.zeros(shape, self.dtype) for _ in range(blocks)] for name in ("k", "v")}
            for _ in range(self.num_layers)
        ]

    def layers(self) -> list[Block]:
        """The blocks as one Block per layer, each holding its slice of the stacked parameters. A decoding loop takes
        them once, before the loop: sliced inside it, every position would copy every layer's weights again."""
        graphdef, stacked = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(self.num_layers)]

    def decode_step(
        self,
        previous: jax.Array,
        cache: list[Cache],
        index: jax.Array,
        block: int = 0,
        layers: list[Block] | None = None,
    ) -> tuple[jax.Array, list[Cache]]:
        """fp32 logits [B, vocab] for token `index`, given token `index` - 1 (`previous` [B], ignored at index 0
        where the input is the SOS vector) and the cache of the positions before it; `block` (static) is the cache
        block that holds position `index`, `layers` the model's `layers()` (taken here when not given). Returns the
        extended cache. The same arithmetic as `__call__`: its logits at position `index` are these."""
        if not self.left_to_right:
            raise ValueError(f"decode_step needs a left-to-right objective; {self.objective!r} is not one")
        x = jnp.take(self.wte[...], previous, axis=0)
        x = jnp.where(index == 0, self.sos[...].astype(x.dtype), x)
        position = jax.lax.dynamic_index_in_dim(self.wpe[...], index, keepdims=False)
        h = (x + position)[:, None].astype(self.dtype)
        extended = []
        # unrolled: each layer's cache is its own buffers, updated in place
        for layer, layer_cache in zip(self.layers() if layers is None else layers, cache, strict=True):
            h, layer_cache = layer.decode(h, layer_cache, index, block)
            extended.append(layer_cache)
        n = self.ln_f(h[:, 0]).astype(jnp.float32)
        return n @ self.head[...].astype(jnp.float32), extended


def build(config: ml_collections.ConfigDict, *, seed: int | None = None) -> IGPT:
    """The model a full config describes, initialised from `seed` (default: config.seed)."""
    seed = config.seed if seed is None else seed
    return IGPT(config.model, objective=config.objective, rngs=nnx.Rngs(params=seed))


def abstract(config: ml_collections.ConfigDict) -> IGPT:
    """The model's shapes and logical axis names without allocating anything (jax.eval_shape)."""
    return nnx.eval_shape(lambda: build(config))


def count_params(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
