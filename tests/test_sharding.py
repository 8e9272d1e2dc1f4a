"""Sharding on 8 fake CPU devices: the rules table, mesh errors, params placed sharded, forward unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stat_jax import sharding
from stat_jax.models import init_model, load_hf_checkpoint
from stat_jax.models.llama import tiny_llama
from tests.models.hf_fixtures import padded_batch, save_variants

MESHES = {"fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4), "data8": dict(data=8, fsdp=1, tensor=1)}


def test_eight_fake_devices():
    assert jax.device_count() == 8


# ----- the rules table -------------------------------------------------------------------------------------
def test_logical_to_spec_without_shapes():
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "q_heads", "head_dim")) == P("fsdp", "tensor", None)
    assert sharding.logical_to_spec((None, "norm")) == P(None, None)


def test_logical_to_spec_uses_each_mesh_axis_once():
    # mlp and vocab both map to `tensor`; the second one must be replicated, not a duplicate axis.
    assert sharding.logical_to_spec(("mlp", "vocab")) == P("tensor", None)


def test_logical_to_spec_drops_axes_that_do_not_divide():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    # 2 KV heads on a 4-way tensor axis: replicate heads, keep the fsdp split of embed.
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), sizes) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 4, 16), sizes) == P("fsdp", "tensor", None)
    # batch of 3 cannot be split 2 ways over fsdp; data (size 1) still divides.
    assert sharding.logical_to_spec(("batch", "length"), (3, 5), sizes) == P("data", None)
    assert sharding.logical_to_spec(("batch", "length"), (4, 5), sizes) == P(("data", "fsdp"), None)
    # an axis the mesh does not have is ignored
    assert sharding.logical_to_spec(("mlp",), (8,), {"data": 8}) == P(None)


def test_logical_to_spec_unknown_name():
    with pytest.raises(KeyError, match="no_such_axis"):
        sharding.logical_to_spec(("embed", "no_such_axis"))


def test_make_mesh_shapes():
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=4)
    assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 1, "fsdp": 2, "tensor": 4}
    mesh = sharding.mesh_from_config({"data": 8, "fsdp": 1, "tensor": 1})
    assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 8, "fsdp": 1, "tensor": 1}
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize(
    "sizes, fragments",
    [
        (dict(data=3, fsdp=1, tensor=1), ["= 3", "8 devices"]),
        (dict(data=2, fsdp=2, tensor=4), ["= 16", "8 devices"]),
        (dict(data=3, fsdp=-1, tensor=1), ["8 devices", "product 3"]),
        (dict(data=-1, fsdp=-1, tensor=1), ["at most one axis"]),
        (dict(data=0, fsdp=-1, tensor=1), ["'data': 0"]),
        (dict(data=1, fsdp=-2, tensor=1), ["'fsdp': -2"]),
    ],
)
def test_make_mesh_errors_name_the_sizes(sizes, fragments):
    with pytest.raises(ValueError) as e:
        sharding.make_mesh(**sizes)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_constrain_is_a_no_op_without_mesh():
    x = jnp.ones((4, 3))
    assert sharding.constrain(x, ("batch", "length")) is x


def test_host_batch_is_split_over_data_axes():
    mesh = sharding.make_mesh(**MESHES["data8"])
    tokens = np.arange(32).reshape(8, 4)
    batch = {"tokens": jax.device_put(tokens, sharding.batch_sharding(mesh, 2, tokens.shape))}
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(1, 4)}
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(32).reshape(8, 4))


# ----- models on a mesh --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Qwen2 with q/k/v bias and 2 KV heads: the KV heads do not divide a 4-way tensor axis."""
    (path, _), = save_variants(tmp_path_factory.mktemp("hf"), ["qwen2"]).values()
    return path


@pytest.fixture(scope="module")
def batch():
    tokens, mask, positions = padded_batch("left", lengths=(11, 7, 4, 12, 1, 9, 3, 6), total=12)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)


def _shard_shapes(array) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in array.addressable_shards}


def _sharded_forward(model, mesh, batch):
    """The training-style call: split outside, merge inside one jit, inputs placed batch-sharded."""
    graphdef, params = nnx.split(model)
    with jax.set_mesh(mesh):
        inputs = tuple(jax.device_put(np.asarray(x), sharding.batch_sharding(mesh, x.ndim, x.shape)) for x in batch)
        logits = jax.jit(lambda p, t, pos, m: nnx.merge(graphdef, p)(t, pos, m))(params, *inputs)
    return logits


def test_load_onto_fsdp_tensor_mesh(qwen2_dir, batch):
    mesh = sharding.make_mesh(**MESHES["fsdp2_tensor4"])
    model = load_hf_checkpoint(qwen2_dir, mesh)
    attn, mlp = model.layers[0].attention, model.layers[0].mlp

    expect = {  # value, spec, shape of one shard (hidden 64, 4 heads x 16, 2 KV heads, mlp 96, vocab 128)
        "q_proj": (attn.q_proj, P("fsdp", "tensor", None), (32, 1, 16)),
        "k_proj": (attn.k_proj, P("fsdp", None, None), (32, 2, 16)),  # 2 KV heads on tensor=4: replicated
        "k_bias": (attn.k_bias, P(None, None), (2, 16)),
        "q_bias": (attn.q_bias, P("tensor", None), (1, 16)),
        "o_proj": (attn.o_proj, P("tensor", None, "fsdp"), (1, 16, 32)),
        "gate_proj": (mlp.gate_proj, P("fsdp", "tensor"), (32, 24)),
        "down_proj": (mlp.down_proj, P("tensor", "fsdp"), (24, 32)),
        "embed": (model.embed, P("tensor", "fsdp"), (32, 32)),
    }
    for name, (param, spec, shard_shape) in expect.items():
        value = param[...]
        assert value.sharding.spec == spec, name
        assert _shard_shapes(value) == {shard_shape}, name
        assert len(value.sharding.device_set) == 8, name

    single = load_hf_checkpoint(qwen2_dir)
    np.testing.assert_array_equal(np.asarray(attn.q_proj[...]), np.asarray(single.layers[0].attention.q_proj[...]))
    reference = np.asarray(single(*batch))
    logits = _sharded_forward(model, mesh, batch)
    assert logits.sharding.spec[0] is not None  # the batch dim stays split through the forward pass
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5)


def test_load_onto_data_mesh(qwen2_dir, batch):
    mesh = sharding.make_mesh(**MESHES["data8"])
    model = load_hf_checkpoint(qwen2_dir, mesh)
    q = model.layers[0].attention.q_proj[...]
    # pure data parallelism: every device holds the full parameters, the batch is split 8 ways
    assert _shard_shapes(q) == {q.shape} and len(q.sharding.device_set) == 8
    logits = _sharded_forward(model, mesh, batch)
    assert _shard_shapes(logits) == {(1, 12, 128)}
    np.testing.assert_allclose(np.asarray(logits), np.asarray(load_hf_checkpoint(qwen2_dir)(*batch)), atol=1e-5)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_init_model_on_mesh_matches_single_device(mesh_name, batch):
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    cfg = tiny_llama(num_kv_heads=2)  # untied lm_head; 2 KV heads again do not divide tensor=4
    model = init_model(cfg, mesh, seed=5)
    single = init_model(cfg, seed=5)

    for name, spec in sharding.describe(nnx.state(model, nnx.Param)).items():
        assert spec.startswith(("P(", "PartitionSpec(")), (name, spec)
    for value in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert value.sharding.mesh.shape == mesh.shape and len(value.sharding.device_set) == 8
    lm_head = model.lm_head[...]
    if mesh_name == "fsdp2_tensor4":
        assert lm_head.sharding.spec == P("fsdp", "tensor") and _shard_shapes(lm_head) == {(32, 32)}
        assert model.layers[1].attention.v_proj[...].sharding.spec == P("fsdp", None, None)
    # Same seed, same numbers (up to jit-vs-eager rounding): the initialiser does not depend on the layout.
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(single, nnx.Param)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(_sharded_forward(model, mesh, batch)), np.asarray(single(*batch)),
                               atol=1e-5)


def test_sharded_decode_matches_single_device(qwen2_dir):
    """The KV cache on the fsdp x tensor mesh: prefill + one step equal the unsharded decode."""
    mesh = sharding.make_mesh(**MESHES["fsdp2_tensor4"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 128, size=(4, 6)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (4, 6))
    starts = jnp.zeros((4,), jnp.int32)

    def run(model):
        graphdef, params = nnx.split(model)
        step = jax.jit(lambda p, t, pos, c, s: nnx.merge(graphdef, p).decode(t, pos, c, s))
        logits, cache = step(params, tokens, positions, model.init_cache(4, 8), starts)
        next_logits, cache = step(params, tokens[:, :1], positions[:, :1] + 6, cache, starts + 6)
        return np.asarray(logits), np.asarray(next_logits), cache

    with jax.set_mesh(mesh):
        sharded = run(load_hf_checkpoint(qwen2_dir, mesh))
    single = run(load_hf_checkpoint(qwen2_dir))
    np.testing.assert_allclose(sharded[0], single[0], atol=1e-5)
    np.testing.assert_allclose(sharded[1], single[1], atol=1e-5)
    assert sharded[2].keys[0].shape == (4, 2, 16, 8)  # [batch, kv_heads, head_dim, length]
    assert sharded[2].values[0].shape == (4, 2, 8, 16)  # [batch, kv_heads, length, head_dim]
