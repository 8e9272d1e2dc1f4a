"""Device mesh and THE table of logical-axis -> mesh-axis rules.

Model code names axes logically (`embed`, `mlp`, `q_heads`, `batch`, ...). This module alone knows the mesh
axes (`data`, `fsdp`, `tensor`) and how logical names map onto them, so changing the parallelism layout is a
one-table edit (MaxText's `logical_axis_rules` idea).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of mesh axes, or None for replicated).
# Parameters: `embed` is FSDP-sharded, the wide dims (`mlp`, heads, `vocab`) are tensor-parallel.
# Activations: the batch is split over every data-like axis; the hidden dim stays whole so that each
# tensor-parallel matmul needs one all-reduce (Megatron layout).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # Adapters' rank axis (models/lora.py): takes fsdp when the array's other axes left it free (B of q/k/v/gate/up
    # is [rank, heads or mlp], tensor-sharded at most), so no adapter is replicated whole on every device.
    ("lora_rank", "fsdp"),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # The training head and the embedding lookup (models/transformer.py) run vocab-parallel: the batch of a chunk
    # is gathered over fsdp, the vocabulary split over it, so neither the [vocab, embed] table nor its gradient
    # ever exists whole on a device (the 151,936 x 2,048 float32 head gradient of Qwen2.5-3B is 1.2 GB).
    ("head_batch", "data"),
    ("head_vocab", ("tensor", "fsdp")),
    # KV cache for decoding: [batch, kv_heads, cache_length, head_dim] (head-major)
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; one axis may be -1 to take all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    auto = [name for name, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {bad}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if auto:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices cannot be split with fixed axes {sizes} "
                f"(product {fixed} does not divide {len(devices)})"
            )
        sizes[auto[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {total} but {len(devices)} devices are available "
            f"({sizes}); set one axis to -1 to absorb the rest"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes give classic GSPMD propagation with with_sharding_constraint hints.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_config(mesh_cfg: Mapping[str, Any] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh from a config section with fields data/fsdp/tensor."""
    get = mesh_cfg.get if isinstance(mesh_cfg, Mapping) else lambda k, d: getattr(mesh_cfg, k, d)
    return make_mesh(get("data", 1), get("fsdp", -1), get("tensor", 1), devices=devices)


def _mesh_axes_for(name: str | None, rules: Iterable[tuple[str, Any]]) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in sharding.LOGICAL_AXIS_RULES")


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_axis_sizes: Mapping[str, int] | None = None,
    rules: Iterable[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    When `shape` and `mesh_axis_sizes` are given, mesh axes that do not divide a dimension are dropped
    (that dimension is replicated over them instead): e.g. 2 KV heads on a 4-way tensor axis.
    A mesh axis is used at most once per array.
    """
    rules = tuple(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        chosen: list[str] = []
        size = None if shape is None else int(shape[dim])
        for axis in _mesh_axes_for(name, rules):
            if axis in used:
                continue
            if mesh_axis_sizes is not None and (axis not in mesh_axis_sizes or size is not None and size % (
                    math.prod(mesh_axis_sizes[a] for a in chosen) * mesh_axis_sizes[axis])):
                continue  # not in this mesh, or the dimension does not split evenly over it
            chosen.append(axis)
        used.update(chosen)
        if not chosen:
            spec.append(None)
        elif len(chosen) == 1:
            spec.append(chosen[0])
        else:
            spec.append(tuple(chosen))
    return PartitionSpec(*spec)


def _axis_sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, _axis_sizes(mesh)))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """For an (abstract) NNX state whose Variables carry `logical_axes`, the matching NamedShardings."""
    sizes = _axis_sizes(mesh)

    def one(var):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("logical_axes")
            if axes is None:
                raise ValueError(f"parameter of shape {var.shape} has no logical_axes metadata")
            return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, sizes)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding for a host batch [batch, length, ...]: batch split over the data-like axes."""
    axes = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, _axis_sizes(mesh)))


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh`, or None outside any mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", False) or not mesh.axis_names:
        return None
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation; a no-op when no mesh is set (single-device use, tests)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    sizes = _axis_sizes(mesh)
    if all(v == 1 for v in sizes.values()):
        return x
    spec = logical_to_spec(logical_axes, x.shape, sizes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def describe(state: nnx.State) -> dict[str, str]:
    """Human-readable map param path -> sharding spec (for logs and tests)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        sharding = getattr(value, "sharding", None)
        out["/".join(map(str, path))] = str(getattr(sharding, "spec", sharding))
    return out
