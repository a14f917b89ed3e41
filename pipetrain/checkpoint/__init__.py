"""Committed, checksummed, pickle-free checkpoints (see ``store.py``)."""
from pipetrain.checkpoint.codec import ShardFormatError, decode_state, encode_state
from pipetrain.checkpoint.manifest import (
    CheckpointCorruptError,
    CheckpointError,
    CommittedCheckpoint,
    ShardRecord,
    StaleGenerationError,
)
from pipetrain.checkpoint.store import CheckpointInfo, CheckpointStore

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStore",
    "CommittedCheckpoint",
    "ShardFormatError",
    "ShardRecord",
    "StaleGenerationError",
    "decode_state",
    "encode_state",
]
