"""Everything that talks across ranks: layouts, the ring, ring attention (and the mesh, in mesh.py)."""
from seqpar.parallel.layout import (
    check_divisible,
    gather_shards,
    local_positions,
    required_multiple,
    shard_sequence,
    unshard_sequence,
)
from seqpar.parallel.ring import RingComm
from seqpar.parallel.ring_attention import (
    make_ring_attn_fn,
    plan_step,
    ring_attention,
    ring_attention_with_lse,
    validate_inputs,
)

__all__ = [
    "RingComm",
    "check_divisible",
    "gather_shards",
    "local_positions",
    "make_ring_attn_fn",
    "plan_step",
    "required_multiple",
    "ring_attention",
    "ring_attention_with_lse",
    "shard_sequence",
    "unshard_sequence",
    "validate_inputs",
]
