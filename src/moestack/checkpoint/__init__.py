"""MoC-System checkpoints: two-level async, fully sharded, partial experts (PEC), verified on load.

    mgr = CheckpointManager(run_dir, CheckpointConfig(every=50, pec_k=2), group=ep_group)
    handle = mgr.save(step, tensors, experts, meta, expert_tokens)   # returns after the snapshot
    tensors, meta, report = mgr.load(experts_wanted=my_layout)       # newest intact checkpoint
"""

from moestack.checkpoint.config import CheckpointConfig
from moestack.checkpoint.manager import CheckpointManager, SaveHandle
from moestack.checkpoint.pec import PecState, portion_of_lost_tokens, select_experts_to_save
from moestack.checkpoint.recovery import LoadReport
from moestack.checkpoint.sharding import ExpertShard
from moestack.checkpoint.storage import CheckpointError, verify

__all__ = [
    "CheckpointConfig", "CheckpointError", "CheckpointManager", "ExpertShard", "LoadReport", "PecState",
    "SaveHandle", "portion_of_lost_tokens", "select_experts_to_save", "verify",
]
