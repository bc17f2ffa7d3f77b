"""The train state and the jitted steps, as pure functions of (config, mesh).

Training, tests and ahead-of-time compilation all build their steps here, so they compile the same program. The
state is a plain pytree, {'step', 'params', 'opt_state'}, with fp32 params and Adam moments; its shardings come from
the parameters' logical axis names and `config.logical_axis_rules` (jax.eval_shape, nothing allocated), and init is
jitted with those shardings as `out_shardings`, so no device ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax import model as model_lib
from igpt_jax import objectives, optim, palette, sharding

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the steps are built from: static parts (graphdef, optimizer) and the state's layout."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # the learning rate by step: the one inside `tx`, also logged by the train step
    abstract_state: State  # ShapeDtypeStructs carrying their shardings
    state_shardings: State

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def _param_shardings(abstract_model: nnx.Module, mesh, rules) -> dict:
    return nnx.to_pure_dict(sharding.variable_shardings(nnx.state(abstract_model, nnx.Param), mesh, rules))


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, train: bool = True) -> Setup:
    """Shapes and shardings of the state for `config` on `mesh`, from jax.eval_shape (nothing allocated): with the
    optimizer's state for training, {'step', 'params'} alone for the modes that only run the model."""
    sharding.check_batch(config, mesh)
    schedule = optim.schedule(config)
    tx = optim.make(config, schedule)
    abstract_model = model_lib.abstract(config)
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    params = nnx.to_pure_dict(abstract_params)
    param_shardings = _param_shardings(abstract_model, mesh, config.logical_axis_rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {"step": replicated, "params": param_shardings}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params}
    if train:
        shapes["opt_state"] = jax.eval_shape(tx.init, params)
        shardings["opt_state"] = optax.tree_map_params(
            tx, lambda _, s: s, shapes["opt_state"], param_shardings, transform_non_params=lambda _: replicated
        )
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return Setup(config, mesh, graphdef, tx, schedule, abstract_state, shardings)


def init_state(setup: Setup, seed: int | None = None) -> State:
    """A fresh state, created directly in its shards (jit with out_shardings)."""
    config = setup.config

    def init():
        model = model_lib.build(config, seed=seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": setup.tx.init(params)}

    with jax.set_mesh(setup.mesh):
        return jax.jit(init, out_shardings=setup.state_shardings)()


def init_params(setup: Setup, seed: int | None = None) -> dict:
    """Freshly initialised parameters (default: config.seed, the run's own step-0 model), in their shards."""
    config = setup.config

    def init():
        return nnx.to_pure_dict(nnx.state(model_lib.build(config, seed=seed), nnx.Param))

    with jax.set_mesh(setup.mesh):
        return jax.jit(init, out_shardings=setup.state_shardings["params"])()


def with_fresh_optimizer(setup: Setup, step: jax.Array, params: dict) -> State:
    """A state around restored parameters with a new optimizer state, built in its shards (`config.restore='params'`
    when the checkpoint's optimizer state belongs to another optimizer recipe). Adam's moments start from zero; every
    step count is set to `step`, so the learning-rate schedule goes on where the checkpoint left it, and Adam's bias
    correction is that of step `step` too: its first updates from the zero moments are about 0.45 of a full step
    (b1 0.9, b2 0.95), growing back over some 20 steps, rather than full-size steps at a mid-run learning rate."""

    def build(step, params):
        def count_at_step(path, leaf):
            return jnp.full_like(leaf, step) if getattr(path[-1], "name", None) == "count" else leaf

        opt_state = jax.tree_util.tree_map_with_path(count_at_step, setup.tx.init(params))
        return {"step": step, "params": params, "opt_state": opt_state}

    with jax.set_mesh(setup.mesh):
        return jax.jit(build, out_shardings=setup.state_shardings)(step, params)


def _tokens(batch: dict, clusters: jax.Array | None) -> jax.Array:
    """Palette tokens for a batch of uint8 images (quantised here, on the device) or of ready tokens."""
    if "tokens" in batch:
        return batch["tokens"]
    return palette.quantize(batch["images"], clusters)


def _per_example_fn(setup: Setup):
    """(params, tokens, noise, labels) -> per-example metric vectors [B] under config.objective (labels: None, or
    class labels [B] when fine-tuning)."""
    config = setup.config

    def per_example(params, tokens, noise, labels):
        model = nnx.merge(setup.graphdef, nnx.State(params))
        with sharding.axis_rules(config.logical_axis_rules):
            return objectives.per_example(model, tokens, noise, config, labels)

    return per_example


def _step_key(config, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), step)


def make_grad_fn(setup: Setup):
    """(params, tokens, key, labels) -> (grads, metrics). The batch's randomness (BERT's mask) is drawn once from
    `key` for the whole batch; then `config.microbatches` equal microbatches run one after another (lax.scan) and their
    gradients and metrics are averaged, so microbatching changes peak memory, not the result."""
    config = setup.config
    objective = objectives.get(config.objective)
    per_example = _per_example_fn(setup)
    k = config.microbatches

    def mean_loss(params, tokens, noise, labels):
        metrics = {name: v.mean() for name, v in per_example(params, tokens, noise, labels).items()}
        return metrics["loss"], metrics

    grad_fn = jax.value_and_grad(mean_loss, has_aux=True)

    def grads_and_metrics(params, tokens, key, labels=None):
        noise = objective.noise(key, tokens.shape, config)
        if k == 1:
            (_, metrics), grads = grad_fn(params, tokens, noise, labels)
            return grads, objectives.with_bits(metrics)

        def split(x):
            return x.reshape(k, x.shape[0] // k, *x.shape[1:])

        micro = jax.tree.map(split, (tokens, noise, labels))  # labels=None stays None

        def accumulate(carry, xs):
            (_, m), g = grad_fn(params, *xs)
            return jax.tree.map(jnp.add, carry, (g, m)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, params, *first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
        grads, metrics = jax.tree.map(lambda x: x / k, (grads, metrics))
        return grads, objectives.with_bits(metrics)

    return grads_and_metrics


def make_train_step(setup: Setup):
    """jit(state, batch, clusters) -> (state, metrics), with the state donated."""
    config = setup.config
    grads_and_metrics = make_grad_fn(setup)

    def train_step(state: State, batch: dict, clusters: jax.Array | None):
        tokens = _tokens(batch, clusters)
        key = _step_key(config, state["step"])
        grads, metrics = grads_and_metrics(state["params"], tokens, key, batch.get("labels"))
        updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = metrics | {"grad_norm": optax.tree.norm(grads), "learning_rate": setup.schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, None, setup.replicated),
        out_shardings=(setup.state_shardings, setup.replicated),
        donate_argnums=0,
    )


def make_eval_step(setup: Setup):
    """jit(params, batch, clusters, key) -> weighted sums over a held-out batch: {metric: sum of weight * value,
    'weight': sum of weights}. `batch['weights']` marks the real images (the padding of a last batch weighs 0); `key`
    draws the batch's randomness (BERT's mask). Sums, not means, so the caller can average over a whole split."""
    config = setup.config
    objective = objectives.get(config.objective)
    per_example = _per_example_fn(setup)

    def eval_step(params, batch, clusters, key):
        tokens = _tokens(batch, clusters)
        values = per_example(params, tokens, objective.noise(key, tokens.shape, config), batch.get("labels"))
        weights = batch["weights"]
        return {name: jnp.sum(v * weights) for name, v in values.items()} | {"weight": jnp.sum(weights)}

    return jax.jit(
        eval_step,
        in_shardings=(setup.state_shardings["params"], None, setup.replicated, setup.replicated),
        out_shardings=setup.replicated,
    )


def make_feature_step(setup: Setup, layers: tuple[int, ...]):
    """jit(params, batch, clusters, key) -> float32 [len(layers), B, d]: the paper's probe features f^l, the mean over
    positions of n^l, for the chosen layers l in 0 .. L, from one forward pass: n^l is block l's ln_1 output for
    l < L, and ln_f's output for l = L (num_layers). BERT models see masked inputs (their pretraining protocol), the
    mask drawn from `key`."""
    config = setup.config
    objective = objectives.get(config.objective)
    chosen = jnp.asarray(layers, jnp.int32)

    def feature_step(params, batch, clusters, key):
        tokens = _tokens(batch, clusters)
        mask = objective.noise(key, tokens.shape, config).get("mask")
        model = nnx.merge(setup.graphdef, nnx.State(params))
        with sharding.axis_rules(config.logical_axis_rules):
            _, out = model(tokens, mask=mask)
        every = jnp.concatenate([out["probe_features"], out["pre_logits"][None]])  # [L + 1, B, d]
        return every[chosen]

    return jax.jit(
        feature_step,
        in_shardings=(setup.state_shardings["params"], None, setup.replicated, setup.replicated),
        out_shardings=setup.replicated,
    )


def make_predict_step(setup: Setup):
    """jit(params, batch, clusters, key) -> int32 [B]: the classification head's predicted class per image, from one
    forward pass (BERT models see masked inputs, the mask drawn from `key`): what an ensemble over masks votes on."""
    config = setup.config
    objective = objectives.get(config.objective)

    def predict_step(params, batch, clusters, key):
        tokens = _tokens(batch, clusters)
        mask = objective.noise(key, tokens.shape, config).get("mask")
        model = nnx.merge(setup.graphdef, nnx.State(params))
        with sharding.axis_rules(config.logical_axis_rules):
            _, out = model(tokens, mask=mask)
        return jnp.argmax(out["class_logits"], axis=-1).astype(jnp.int32)

    return jax.jit(
        predict_step,
        in_shardings=(setup.state_shardings["params"], None, setup.replicated, setup.replicated),
        out_shardings=setup.replicated,
    )


def make_token_step(setup: Setup, layer: int):
    """jit(params, batch, clusters, key) -> float32 [B, N, d]: layer `layer`'s normed input at every position
    (IGPT.normed_tokens; BERT models see masked inputs, the mask drawn from `key`): the attentive probe's features."""
    config = setup.config
    objective = objectives.get(config.objective)

    def token_step(params, batch, clusters, key):
        tokens = _tokens(batch, clusters)
        mask = objective.noise(key, tokens.shape, config).get("mask")
        model = nnx.merge(setup.graphdef, nnx.State(params))
        with sharding.axis_rules(config.logical_axis_rules):
            return model.normed_tokens(tokens, layer, mask=mask)

    return jax.jit(
        token_step,
        in_shardings=(setup.state_shardings["params"], None, setup.replicated, setup.replicated),
        out_shardings=setup.replicated,
    )
