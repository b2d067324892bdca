"""dCTS / CTS policy: superpatch partition, window labels, the policy CNN and its training.

Modules:
    partition: quadtree (dCTS) and top-K (CTS) window selection, the token map they induce.
    labels: uniform-window targets from ground truth, the oracle policy.
    network: ``PolicyNet`` and its checkpoints (state dict + ``.json`` configuration sidecar).
    train: ``train_policy``, BCE training of the policy on a segmentation data set.
"""

from tokred.policy.labels import oracle_scores, window_labels
from tokred.policy.network import PolicyNet, build_policy, load_policy_checkpoint, save_policy
from tokred.policy.partition import Partition, partition_from_windows, quadtree_partition, topk_partition
from tokred.policy.train import train_policy

__all__ = [
    "Partition", "PolicyNet", "build_policy", "load_policy_checkpoint", "oracle_scores", "partition_from_windows",
    "quadtree_partition", "save_policy", "topk_partition", "train_policy", "window_labels",
]

