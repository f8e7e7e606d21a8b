"""The NNX front end against Linen: same weights in, same masks and params out.

Each twin pair is a Linen model and an NNX model whose params have the same keys, so the
same algorithm key draws the same masks; every difference would be the adapter's.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sparsejax
from sparsejax import algorithms, posttrain, transforms
from sparsejax import masks as masks_lib
from sparsejax import nnx as snnx

IN, HIDDEN, OUT = 12, 16, 8
STEPS = 100


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN, name="dense_0")(x))
        return nn.Dense(OUT, name="dense_1")(x)


class _NNXMLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.dense_0 = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.dense_1 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.dense_1(jax.nn.relu(self.dense_0(x)))


def _copy_into(model: nnx.Module, params: dict) -> None:
    """Loads Linen ``params`` into the NNX twin ``model`` (same keys)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def _twins():
    linen = _LinenMLP()
    params = linen.init(jax.random.key(1), jnp.zeros((1, IN)))["params"]
    model = _NNXMLP(rngs=nnx.Rngs(7))
    _copy_into(model, params)
    return linen, params, model


def _data(steps: int = STEPS, batch: int = 16):
    kx, ky = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (steps, batch, IN))
    y = jax.random.randint(ky, (steps, batch), 0, OUT)
    return x, y


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _named(tree) -> dict:
    """``{'dense_0/kernel': leaf}`` of a params or mask tree (None leaves kept)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masks_lib.is_none)[0]
    return {masks_lib.path_name(path): leaf for path, leaf in leaves}


def _assert_same_masks(nnx_masks, linen_masks):
    a, b = _named(nnx_masks), _named(linen_masks)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _assert_same_params(model, params, rtol=1e-5, atol=1e-6):
    a, b = _named(nnx.to_pure_dict(nnx.state(model, nnx.Param))), _named(params)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def _algo_state(opt_state):
    is_state = lambda s: isinstance(s, transforms.MaskedState)  # noqa: E731
    return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)][0].algo_state


def _train_linen(linen, params, tx, algorithm, x, y):
    """The Linen step of `experiments.state.step_functions`, on every batch of ``x``."""
    opt_state = tx.init(params)
    if not algorithm.straight_through:
        params = transforms.sparsify(params, opt_state)

    @jax.jit
    def step(params, opt_state, xb, yb):
        masks_tree, algo_state = transforms.get_masks(opt_state), _algo_state(opt_state)

        def loss_fn(p):
            forward = algorithm.forward_params_with_state(p, masks_tree, algo_state)
            with algorithm.model_context(p, masks_tree, algo_state):
                return _loss(linen.apply({"params": forward}, xb), yb)

        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for xb, yb in zip(x, y):
        params, opt_state = step(params, opt_state, xb, yb)
    return params, opt_state


@functools.partial(nnx.jit, static_argnames="algorithm")
def _nnx_step(model, opt, xb, yb, *, algorithm):
    def loss_fn(model):
        with snnx.forward_context(model, opt, algorithm):
            return _loss(model(xb), yb)

    opt.update(model, nnx.grad(loss_fn)(model))


def _train_nnx(model, opt, algorithm, x, y):
    if not algorithm.straight_through:
        snnx.sparsify(model, opt)
    for xb, yb in zip(x, y):
        _nnx_step(model, opt, xb, yb, algorithm=algorithm)


# name -> (algorithm, build the NNX optimizer with plain nnx.Optimizer?)
_CASES = {
    "rigl": (dict(sparsity=0.8, update_every_steps=10, end_step=80), True),
    "snip": (dict(sparsity=0.8), True),
    "sr_ste": (dict(n=2, m=4), True),
    "bimask": (dict(n=2, m=4), False),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_training_matches_linen(name):
    kwargs, plain = _CASES[name]
    algorithm = algorithms.get(name, **kwargs)
    tx = transforms.masked(optax.adam(1e-2), algorithm, key=jax.random.key(3))
    linen, params, model = _twins()
    x, y = _data()
    params, opt_state = _train_linen(linen, params, tx, algorithm, x, y)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param) if plain else snnx.optimizer(model, tx)
    _train_nnx(model, opt, algorithm, x, y)
    _assert_same_masks(snnx.get_masks(opt), transforms.get_masks(opt_state))
    _assert_same_params(model, params)
    # The masks are keyed like the model's params and the pruned weights are exactly zero.
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks_tree = snnx.get_masks(opt)
    assert jax.tree.structure(masks_tree, is_leaf=masks_lib.is_none) == jax.tree.structure(
        jax.tree.map(lambda _: 0, trained)
    )
    if not algorithm.straight_through:
        chex.assert_trees_all_equal(masks_lib.apply_masks(trained, masks_tree), trained)


def _masks_at_init(algorithm, linen, params, model, x, y):
    """The algorithm's masks of the Linen model and of its NNX twin."""
    key = jax.random.key(4)
    linen_masks = algorithm.masks_from_model(
        params,
        key=key,
        apply_fn=lambda p, xb: linen.apply({"params": p}, xb),
        batch=(x[0], y[0]),
        loss_fn=_loss,
    )
    nnx_masks = snnx.masks_from_model(algorithm, model, key=key, batch=(x[0], y[0]), loss_fn=_loss)
    _assert_same_masks(nnx_masks, linen_masks)
    return linen_masks, nnx_masks


@pytest.mark.parametrize("score,rounds", [("grasp", 1), ("synflow", 5)])
def test_pruning_at_init_matches_linen(score, rounds):
    algorithm = algorithms.PruneAtInit(score=score, rounds=rounds, sparsity=0.8)
    linen, params, model = _twins()
    x, y = _data(steps=1)
    _masks_at_init(algorithm, linen, params, model, x, y)


def test_snip_at_init_then_training_matches_linen():
    # The model's masks reach masked(..., masks=...) through the adapter's optimizer.
    algorithm = algorithms.PruneAtInit(score="snip", rounds=1, sparsity=0.8)
    linen, params, model = _twins()
    x, y = _data(steps=20)
    linen_masks, nnx_masks = _masks_at_init(algorithm, linen, params, model, x, y)
    params, opt_state = _train_linen(
        linen,
        params,
        transforms.masked(optax.adam(1e-2), algorithm, masks=linen_masks),
        algorithm,
        x,
        y,
    )
    opt = snnx.optimizer(model, transforms.masked(optax.adam(1e-2), algorithm, masks=nnx_masks))
    _train_nnx(model, opt, algorithm, x, y)
    _assert_same_masks(snnx.get_masks(opt), linen_masks)
    _assert_same_params(model, params)


def test_packed_masks_need_the_adapter_optimizer():
    algorithm = algorithms.get("rigl", sparsity=0.8, update_every_steps=2, end_step=8)
    x, y = _data(steps=6)
    runs = {}
    for packed in (False, True):
        _, _, model = _twins()
        tx = transforms.masked(optax.adam(1e-2), algorithm, packed=packed)
        opt = snnx.optimizer(model, tx)
        _train_nnx(model, opt, algorithm, x, y)
        runs[packed] = (model, snnx.get_masks(opt))
    _assert_same_masks(runs[True][1], runs[False][1])
    chex.assert_trees_all_equal(
        nnx.state(runs[True][0], nnx.Param), nnx.state(runs[False][0], nnx.Param)
    )
    # A plain nnx.Optimizer writes the packed bits back as a dict of bytes: refused by name.
    _, _, model = _twins()
    opt = nnx.Optimizer(
        model, transforms.masked(optax.adam(1e-2), algorithm, packed=True), wrt=nnx.Param
    )
    _train_nnx(model, opt, algorithm, x[:1], y[:1])
    with pytest.raises(ValueError, match="sparsejax.nnx.optimizer"):
        snnx.get_masks(opt)


def test_checkpoint_round_trip(tmp_path):
    algorithm = algorithms.get("rigl", sparsity=0.8, update_every_steps=2, end_step=8)
    tx = transforms.masked(optax.adam(1e-2), algorithm, packed=True, key=jax.random.key(5))
    x, y = _data(steps=5)
    _, _, model = _twins()
    opt = snnx.optimizer(model, tx)
    _train_nnx(model, opt, algorithm, x[:3], y[:3])
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.StandardSave(nnx.state((model, opt))))
    manager.wait_until_finished()

    fresh = _NNXMLP(rngs=nnx.Rngs(99))
    fresh_opt = snnx.optimizer(fresh, tx)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state((fresh, fresh_opt)))
    restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
    nnx.update((fresh, fresh_opt), restored)
    chex.assert_trees_all_equal(nnx.state((fresh, fresh_opt)), nnx.state((model, opt)))
    _assert_same_masks(snnx.get_masks(fresh_opt), snnx.get_masks(opt))
    # Training continues identically, mask updates included.
    for m, o in ((model, opt), (fresh, fresh_opt)):
        for xb, yb in zip(x[3:], y[3:]):
            _nnx_step(m, o, xb, yb, algorithm=algorithm)
    chex.assert_trees_all_equal(nnx.state((fresh, fresh_opt)), nnx.state((model, opt)))


def test_functional_is_pure():
    class WithNorm(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(IN, HIDDEN, rngs=rngs)
            self.norm = nnx.BatchNorm(HIDDEN, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dense(x))

    model = WithNorm(nnx.Rngs(0))
    before = jax.tree.map(jnp.copy, nnx.state(model))
    apply_fn, params = snnx.functional(model)
    x = _data(steps=1)[0][0]
    out = jax.jit(apply_fn)(params, x)
    np.testing.assert_allclose(out, WithNorm(nnx.Rngs(0))(x), atol=1e-6)
    chex.assert_trees_all_equal(nnx.state(model), before)  # batch statistics untouched
    grads = jax.grad(lambda p: apply_fn(p, x).sum())(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


# ----------------------------------------------------------------- post-training pruning
class _LinenConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8, name="first")(x))
        x = nn.relu(nn.Conv(8, (3,), strides=(2,), padding=((1, 1),), name="conv")(x))
        return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))


class _NNXConvNet(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(4, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, (3,), strides=(2,), padding=((1, 1),), rngs=rngs)
        self.head = nnx.Linear(48, 4, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(jax.nn.relu(self.first(x))))
        return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize(
    "method,twins", [("wanda", "mlp"), ("sparsegpt", "mlp"), ("wanda", "conv")]
)
def test_prune_model_matches_linen(method, twins):
    if twins == "mlp":
        linen, params, model = _twins()
        x = _data(steps=1, batch=24)[0][0]
    else:
        x = jax.random.normal(jax.random.key(0), (16, 12, 4)) + 0.3
        linen = _LinenConvNet()
        params = linen.init(jax.random.key(1), x)["params"]
        model = _NNXConvNet(nnx.Rngs(0))
        _copy_into(model, params)
    want = posttrain.prune_model(linen.apply, params, x, method=method, sparsity=0.5)
    got = snnx.prune_model(model, x, method=method, sparsity=0.5)
    _assert_same_masks(got.masks, want.masks)
    chex.assert_trees_all_close(got.params, want.params, atol=1e-6)
    assert got.errors.keys() == want.errors.keys()
    np.testing.assert_allclose(list(got.errors.values()), list(want.errors.values()), rtol=1e-5)
    # The model itself is unchanged until the result is applied.
    _assert_same_params(model, params, rtol=0, atol=0)
    nnx.update(model, got.params)
    assert (
        float(
            jnp.mean(
                nnx.state(model, nnx.Param)["dense_0" if twins == "mlp" else "first"]["kernel"][...]
                == 0
            )
        )
        == 0.5
    )


def test_prune_model_list_paths_and_skip():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List(
                [nnx.Linear(IN, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, 4, rngs=rngs)]
            )

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    model = Stack(nnx.Rngs(0))
    x = _data(steps=1, batch=8)[0][0]
    result = snnx.prune_model(model, x, method="magnitude", n=2, m=4, skip=["layers/1"])
    assert list(result.errors) == ["layers/0"]
    kernel = result.masks["layers"][0]["kernel"]
    np.testing.assert_array_equal(kernel.reshape(-1, 4, HIDDEN).sum(1), 2)
    assert result.masks["layers"][1]["kernel"] is None
    with pytest.raises(ValueError, match="skip names layers"):
        snnx.prune_model(model, x, method="magnitude", sparsity=0.5, skip=["layers/2"])
    with pytest.raises(ValueError, match="x of shape"):
        snnx.prune_model(model, x[:, :5], method="magnitude", sparsity=0.5)


def test_errors_name_the_argument():
    _, _, model = _twins()
    with pytest.raises(ValueError, match="model must be an nnx.Module"):
        snnx.optimizer({"w": jnp.ones(2)}, optax.sgd(0.1))
    with pytest.raises(ValueError, match="tx must be"):
        snnx.optimizer(model, "adam")
    with pytest.raises(ValueError, match="optimizer must be an nnx.Optimizer"):
        snnx.get_masks(optax.sgd(0.1).init({}))
    with pytest.raises(ValueError, match="holds no MaskedState"):
        snnx.get_masks(snnx.optimizer(model, optax.sgd(0.1)))
    assert sparsejax.nnx is snnx
