"""Where context parallelism's head all-to-all lands on the nodes of a job, checked before it is submitted.

Megatron orders ranks tp-cp-dp (TP innermost), so one a2a group is TP x A consecutive global ranks
(A = ``parallel.a2a_group_size``); torchrun numbers ranks node by node, in blocks of the processes per
node. The group is therefore inside one node exactly when TP x A divides the processes per node.
``a2a+p2p`` exists to keep its all-to-all on the node's fast links, so a group that straddles nodes is
refused; plain ``a2a`` spanning nodes works, only slower, so it is a warning.
"""

from __future__ import annotations

from lucid_megatron.config.parallel import check_a2a_heads
from lucid_megatron.config.train import TrainConfig


def fitting_a2a_group_size(cfg: TrainConfig, nproc_per_node: int) -> int | None:
    """The largest a2a group size A for ``a2a+p2p`` that keeps each group inside a node and that the heads
    allow (both levels > 1, A x groups = CP); None when there is none."""
    tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    for a2a in range(cp - 1, 1, -1):
        if cp % a2a or nproc_per_node % (tp * a2a):
            continue
        try:
            check_a2a_heads(cfg.model.num_attention_heads // tp, cfg.model.kv_heads // tp, a2a, "a2a+p2p")
        except ValueError:
            continue
        return a2a
    return None


def check_placement(cfg: TrainConfig, nodes: int, nproc_per_node: int) -> list[str]:
    """Raise a ValueError when an ``a2a+p2p`` group would straddle nodes; return warnings (plain ``a2a``
    across nodes). Call after ``split_world`` (world size divisible by TP x CP)."""
    parallel = cfg.parallel
    tp, a2a = parallel.tensor_parallel_size, parallel.a2a_group_size
    span = tp * a2a
    if a2a == 1 or nodes == 1 or nproc_per_node % span == 0:
        return []
    size = "a2a group size" if parallel.cp_comm_type == "a2a+p2p" else "context_parallel_size"
    where = (f"tensor_parallel_size x {size} = {tp} x {a2a} = {span} consecutive ranks, which do not fit "
             f"inside one node of {nproc_per_node} process(es) (TP x {size} must divide the processes per node)")
    fit = fitting_a2a_group_size(cfg, nproc_per_node)
    fit_text = None if fit is None else (
        f"parallel.hierarchical_context_parallel_sizes=[{fit}, {parallel.context_parallel_size // fit}] "
        f"(the largest a2a group that fits a node and the heads)")
    if parallel.cp_comm_type == "a2a+p2p":
        advice = (f"choose {fit_text}" if fit is not None else
                  f"no a2a group size fits both the heads and a node of {nproc_per_node} process(es) with "
                  f"tensor_parallel_size {tp}: use parallel.cp_comm_type=p2p")
        raise ValueError(
            f"parallel.hierarchical_context_parallel_sizes: {parallel.hierarchical_context_parallel_sizes} puts "
            f"each head all-to-all on {where}, so it would cross nodes; {advice}; or run a multiple of {span} "
            f"processes per node"
        )
    advice = (f"parallel.cp_comm_type=a2a+p2p with {fit_text}: all-to-all inside each node, p2p across nodes"
              if fit is not None else "parallel.cp_comm_type=p2p")
    return [f"parallel.cp_comm_type='a2a' runs its head all-to-all over all context-parallel ranks, {where}: "
            f"every all-to-all crosses nodes. Consider {advice}"]
