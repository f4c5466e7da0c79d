"""Analytic cost of context-parallel LUCID attention, per rank and layer, forward + backward.

One parameterisation covers the three modes: groups of ``a2a_size`` consecutive CP ranks exchange heads by
all-to-all, and the ``cp // a2a_size`` groups run the sequence-pipelined solve (``a2a``: ``a2a_size == cp``;
``p2p``: ``a2a_size == 1``; ``a2a+p2p``: in between).  ``n`` counts the tokens of the whole (padded)
sequence, batch included; ``d`` is the head dim of keys and values alike.  The byte counts are exact: they
equal what ``parallel/context.py`` counts (tests/parallel/test_cp_bytes.py).  The time model is a rough
guide for choosing a mode; docs/context-parallel.md lists what it leaves out.
"""

from __future__ import annotations

import dataclasses
import math

from lucid_megatron.config.parallel import check_a2a_heads


def attention_flops(n: int, d: int, hq: int, hkv: int) -> float:
    """Causal LUCID attention, forward + backward: 7 N^2 D per query head (2 half-square matmuls forward,
    5 backward) and the same per KV head for the preconditioner."""
    return 7.0 * n * n * d * (hq + hkv)


def flops_per_rank(n: int, d: int, hq: int, hkv: int, cp: int, a2a_size: int) -> float:
    # KV heads are replicated up to the all-to-all size, and each copy is solved
    return attention_flops(n, d, hq, max(hkv, a2a_size)) / cp


def received_bytes(n: int, d: int, hq: int, hkv: int, cp: int, a2a_size: int, elem: int = 2,
                   acc: int = 4) -> dict[str, int]:
    """Bytes one rank receives, by collective kind (exact for a valid layout: ``n`` a multiple of ``2 cp``,
    heads that split).  ``elem``: bytes per element of the model dtype; ``acc``: of the preconditioner's
    compute dtype (4 for bf16/fp32 inputs, 8 for float64)."""
    a, p = a2a_size, cp // a2a_size
    hkv_a = max(hkv, a)
    out = {}
    if a > 1:
        # q, k, v, o forward and their gradients backward; a rank keeps 1/a of its n/cp tokens' heads
        out["all_to_all"] = 2 * (a - 1) * n * (2 * hq + 2 * hkv_a) * d * elem // (a * cp)
    if p > 1:
        # one KV-sized tensor from the rest of the sequence, for the hkv_a/a KV heads of this rank
        rest = (p - 1) * n // p * (hkv_a // a) * d
        out["broadcast"] = rest * 4 * acc  # the pipeline: (Kn, V') forward, (Kn, dV) backward
        out["ring"] = rest * (4 * elem + 2 * acc)  # K, V' forward; K, V' and then dK, dV' backward
        out["reduce_scatter"] = rest * acc  # the row side of dKn
    return out


@dataclasses.dataclass(frozen=True)
class Cluster:
    rate: float  # sustained attention FLOP/s per GPU
    ranks_per_node: int  # CP ranks in one node: GPUs per node / TP
    nvlink: float = 450e9  # bytes/s per GPU and direction inside a node (H100/H200 NVLink 4)
    ib: float = 50e9  # bytes/s per GPU across nodes (one InfiniBand NDR 400 Gb/s NIC per GPU)
    nvlink_latency: float = 10e-6
    ib_latency: float = 25e-6


def _members_per_node(size: int, stride: int, cluster: Cluster) -> int:
    """Members in one node of a group of ``size`` CP ranks ``stride`` apart (CP ranks fill nodes in order)."""
    return max(1, min(size, cluster.ranks_per_node // stride))


def _latency(size: int, per_node: int, cluster: Cluster) -> float:
    return cluster.nvlink_latency if per_node == size else cluster.ib_latency


def all_to_all_time(nbytes: float, size: int, cluster: Cluster) -> float:
    """``nbytes`` received by a rank from the ``size - 1`` others of a consecutive group: the pairs are
    distinct, so what comes from other nodes uses this GPU's own NIC, concurrently with NVLink."""
    per_node = _members_per_node(size, 1, cluster)
    inside = nbytes * (per_node - 1) / (size - 1)
    return max(inside / cluster.nvlink, (nbytes - inside) / cluster.ib)


def ring_time(nbytes: float, size: int, stride: int, cluster: Cluster) -> float:
    """All-gather, broadcast or reduce-scatter: every member of a node needs the same data from other nodes,
    which a ring brings into the node once, over the NICs of the node's ``per_node`` members."""
    per_node = _members_per_node(size, stride, cluster)
    from_other_nodes = nbytes * (size - per_node) / (size - 1)
    inside = nbytes / cluster.nvlink if per_node > 1 else 0.0
    return max(inside, from_other_nodes / (per_node * cluster.ib))


def _hop_time(nbytes: float, size: int, stride: int, cluster: Cluster) -> float:
    """One ring step: every member sends ``nbytes`` to the next; the slowest hop crosses nodes (its GPU's own
    NIC) unless the whole ring is inside one node."""
    inside = _members_per_node(size, stride, cluster) == size
    return (cluster.nvlink_latency + nbytes / cluster.nvlink) if inside else (cluster.ib_latency + nbytes / cluster.ib)


def step_time(n: int, d: int, hq: int, hkv: int, cp: int, a2a_size: int, cluster: Cluster, *,
              sub_chunks: int = 1, elem: int = 2, acc: int = 4) -> dict[str, float]:
    """Seconds per rank for one layer's attention, forward + backward: ``compute`` (the ``solve`` and
    ``softmax`` parts), ``a2a_comm``; for the p2p part the ``pipeline`` (its critical path, which the solve's
    other compute overlaps), the ``ring`` (its key/value passing, which the softmax part's compute
    overlaps) and ``p2p_comm`` (the final reduce-scatter); and ``total``.  Raises ValueError when the
    heads do not split."""
    check_a2a_heads(hq, hkv, a2a_size, "a2a" if a2a_size == cp else "a2a+p2p")
    a, p = a2a_size, cp // a2a_size
    hkv_a = max(hkv, a)
    sent = received_bytes(n, d, hq, hkv, cp, a, elem, acc)
    t = dict(solve=attention_flops(n, d, 0, hkv_a) / cp / cluster.rate,
             softmax=attention_flops(n, d, hq, 0) / cp / cluster.rate, a2a_comm=0.0, pipeline=0.0, ring=0.0,
             p2p_comm=0.0)
    t["compute"] = t["solve"] + t["softmax"]
    if a > 1:  # 8 all-to-alls (q, k, v, o and their gradients), a message to each peer
        t["a2a_comm"] = (all_to_all_time(sent["all_to_all"], a, cluster)
                         + 8 * (a - 1) * _latency(a, _members_per_node(a, 1, cluster), cluster))
    if p > 1:
        heads = hkv_a // a  # KV heads per rank in the p2p part
        steps = math.log2(p) * _latency(p, _members_per_node(p, a, cluster), cluster)  # one collective's
        units = 2 * p * sub_chunks
        m = n / units
        # per unit, one after another: its update and diagonal solve (forward 2 + 1 half-square matmuls of m
        # rows, backward about 2.5x that) and the broadcast of (Kn, V') or (Kn, dV) in each pass
        unit_compute = 3.5 * (2 * m * m * d * heads) / cluster.rate
        broadcast = steps + ring_time(m * heads * d * 2 * acc, p, a, cluster)
        t["pipeline"] = units * (unit_compute + 2 * broadcast)
        shard = n / p * heads * d  # elements of one rank's K (or V') shard
        t["ring"] = (p - 1) * (_hop_time(shard * 2 * elem, p, a, cluster)
                               + _hop_time(shard * (2 * elem + 2 * acc), p, a, cluster))
        t["p2p_comm"] = ring_time(sent["reduce_scatter"], p, a, cluster) + steps
    t["total"] = (t["a2a_comm"] + max(t["solve"], t["pipeline"]) + max(t["softmax"], t["ring"])
                  + t["p2p_comm"])
    return t
