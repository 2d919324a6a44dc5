"""Modules as pure pytrees and the shardings of their state (parameters, optimiser, step).

Not training-specific: the trainers, evaluation, zero-shot and AOT compilation all hold a model
as a :class:`Model` (graphdef + abstract template + shardings) with parameters outside it, a
plain dict of ``jax.Array`` rebuilt into an nnx module with :func:`merge_pure`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from decipher_jax import sharding as sh


def merge_pure(graphdef, template, params):
    """A module from a pure dict of arrays and its abstract template state."""
    state = jax.tree.map(lambda v: v, template, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


class Model:
    """graphdef + template + shardings of one nnx module family; params live outside."""

    def __init__(self, factory, mesh, rules=sh.DEFAULT_RULES):
        self.factory, self.mesh, self.rules = factory, mesh, rules
        self.graphdef, self.template = sh.abstract_model(factory)
        self.shardings = nnx.to_pure_dict(sh.state_shardings(self.template, mesh, rules))

    def init(self, key):
        """Parameters born sharded (jit with out_shardings)."""
        f = lambda k: nnx.to_pure_dict(nnx.split(self.factory(nnx.Rngs(k)))[1])  # noqa: E731
        return jax.jit(f, out_shardings=self.shardings)(key)

    def __call__(self, params):
        return merge_pure(self.graphdef, self.template, params)


def opt_shardings(tx, params, param_shardings, mesh):
    """Shardings of ``tx.init(params)``: each state leaf that mirrors a parameter (Adam moments,
    also inside ``multi_transform`` / masked states) takes that parameter's sharding; counts,
    hyperparameters and empty placeholders are replicated.

    Matching is by the dict-key suffix of the leaf's path and its shape, which survives the
    wrapper nodes optax adds (``optax.tree_map_params`` fails on masked states: frozen towers).
    """
    by_path = {}
    jax.tree_util.tree_map_with_path(
        lambda p, x, s: by_path.__setitem__(_dict_path(p), (x.shape, s)), params, param_shardings)
    rep = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _dict_path(path)
        for n in range(len(keys), 0, -1):  # longest suffix first
            hit = by_path.get(keys[-n:])
            if hit and hit[0] == leaf.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


def _dict_path(path) -> tuple:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def replicated(mesh):
    return NamedSharding(mesh, P())


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def tree_norm(tree):
    """The global L2 norm of a pytree of arrays (in float32)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
