"""Mesh, rules, born-sharded parameters, and sharded == single-device numerics (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from decipher_jax import sharding as sh
from decipher_jax.models.bert import Bert, BertConfig
from decipher_jax.models.vit3d import ViT3D, ViTConfig

VIT = ViTConfig(dim=48, depth=2, heads=4, mlp_dim=96, patch_size=(8, 8, 4), img_size=(32, 32, 16), num_registers=2)
BERT = BertConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=24)


def test_eight_devices():
    assert jax.device_count() == 8


def test_make_mesh():
    m = sh.make_mesh({"data": -1, "tensor": 2})
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert m.axis_types == (AxisType.Auto,) * 3
    assert dict(sh.make_mesh(None, jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices"):
        sh.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sh.make_mesh({"model": 2})


def test_rules_map_logical_names():
    assert sh.logical_to_spec(("layers", "embed", "qkv", "heads", "kv")) == P(None, "fsdp", None, "tensor", None)
    assert sh.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    # A mesh axis is used at most once per tensor.
    rules = (("a", "fsdp"), ("b", ("fsdp", "tensor")))
    assert sh.logical_to_spec(("a", "b"), rules) == P("fsdp", "tensor")
    with pytest.raises(KeyError, match="no rule"):
        sh.logical_to_spec(("nonsense",))


def test_params_born_sharded_with_expected_shard_shapes():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, state, _ = sh.init_sharded(lambda r: ViT3D(VIT, rngs=r), mesh, jax.random.key(0))
    b = state["blocks"]

    def shard_shape(v):
        return v[...].addressable_shards[0].data.shape

    assert shard_shape(b["qkv_kernel"]) == (2, 24, 3, 2, 12)
    assert shard_shape(b["mlp_in_kernel"]) == (2, 24, 48)
    assert shard_shape(b["mlp_out_kernel"]) == (2, 48, 24)
    assert shard_shape(b["out_kernel"]) == (2, 2, 12, 24)
    assert shard_shape(state["pos_embed"]) == (4, 4, 4, 24)
    assert shard_shape(state["norm"]["scale"]) == (48,)
    assert len(b["qkv_kernel"][...].sharding.device_set) == 8
    # Init with out_shardings equals the same jitted init on one device, bit for bit; and a plain
    # eager init with the same key to the last bit or so (XLA may fuse the jitted truncated
    # normal differently: the tests compile without LLVM optimisation, see conftest).
    _, one, _ = sh.init_sharded(lambda r: ViT3D(VIT, rngs=r), sh.make_mesh(None, jax.devices()[:1]), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(b["qkv_kernel"][...]), np.asarray(one["blocks"]["qkv_kernel"][...]))
    host = nnx.state(ViT3D(VIT, rngs=nnx.Rngs(jax.random.key(0))))
    np.testing.assert_allclose(np.asarray(b["qkv_kernel"][...]), np.asarray(host["blocks"]["qkv_kernel"][...]),
                               rtol=1e-6, atol=1e-9)


def test_indivisible_dimension_names_the_tensor():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = ViTConfig(dim=48, depth=1, heads=3, mlp_dim=96, patch_size=8, img_size=16)
    with pytest.raises(ValueError, match=r"cannot shard blocks/(qkv|out)_kernel: dimension \d has size 3, .*'tensor'"):
        sh.init_sharded(lambda r: ViT3D(cfg, rngs=r), mesh, jax.random.key(0))
    with pytest.raises(ValueError, match="batch/x"):
        sh.shard_batch({"x": np.zeros((6, 3))}, mesh)


def _fwd_bwd(graphdef, loss_fn):
    def f(state, batch):
        return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch))(state)

    return f


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}])
def test_sharded_vit_forward_backward_equals_single_device(mesh_shape, rng):
    def loss(model, batch):
        out = model(batch["x"], mask=batch["mask"], collect=(0,))
        return jnp.mean(out["cls"] ** 2) + jnp.mean(out["patch"] * batch["w"]) + jnp.mean(out["layers"][0] ** 2)

    batch = {
        "x": rng.standard_normal((8, 32, 32, 16, 1)).astype(np.float32),
        "mask": rng.random((8, 64)) < 0.3,
        "w": rng.standard_normal((8, 64, 48)).astype(np.float32),
    }
    one = sh.make_mesh(None, jax.devices()[:1])
    many = sh.make_mesh(mesh_shape)
    results = []
    for mesh in (one, many):
        graphdef, state, shardings = sh.init_sharded(lambda r: ViT3D(VIT, rngs=r), mesh, jax.random.key(1))
        b = sh.shard_batch(batch, mesh)
        step = jax.jit(_fwd_bwd(graphdef, loss), out_shardings=(None, shardings))
        with jax.set_mesh(mesh):  # activation constraints use the ambient mesh
            results.append(step(state, b))
    (l1, g1), (l8, g8) = results
    assert abs(float(l1) - float(l8)) <= 1e-5 * abs(float(l1)) + 1e-7
    _assert_same(g1, g8)
    assert g8["blocks"]["mlp_in_kernel"][...].sharding.spec == sh.logical_to_spec(("layers", "embed", "mlp"))


def test_sharded_bert_forward_backward_equals_single_device(rng):
    def loss(model, batch):
        h = model(batch["ids"], batch["mask"])
        return jnp.mean(model.mlm_logits(h) ** 2) + jnp.mean(h * batch["mask"][..., None])

    ids = rng.integers(0, 101, (8, 24))
    mask = (np.arange(24)[None] < rng.integers(5, 24, (8, 1))).astype(np.int32)
    batch = {"ids": ids, "mask": mask}
    results = []
    for mesh in (sh.make_mesh(None, jax.devices()[:1]), sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        graphdef, state, shardings = sh.init_sharded(lambda r: Bert(BERT, rngs=r), mesh, jax.random.key(2))
        step = jax.jit(_fwd_bwd(graphdef, loss), out_shardings=(None, shardings))
        with jax.set_mesh(mesh):
            results.append(step(state, sh.shard_batch(batch, mesh)))
    (l1, g1), (l8, g8) = results
    assert abs(float(l1) - float(l8)) <= 1e-5 * abs(float(l1)) + 1e-7
    _assert_same(g1, g8)


def test_constrain_is_a_noop_without_mesh():
    x = jnp.ones((4, 3))
    assert sh.constrain(x, ("act_batch", None)) is x
