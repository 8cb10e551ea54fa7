"""Model parallelism for the head: W and the DSA centers partitioned by rows over ranks."""

from .checkpoint import HeadCheckpointError, load_head, read_head_metadata, save_head
from .comm import Comm, SoloComm, gather_rows
from .head import HeadOutput, HeadSpec, PartitionedHead
from .optim import InPlaceSGD
from .partition import HeadLayout, RowPartition

__all__ = [
    "Comm", "HeadCheckpointError", "HeadLayout", "HeadOutput", "HeadSpec", "InPlaceSGD",
    "PartitionedHead", "RowPartition", "SoloComm", "gather_rows", "load_head",
    "read_head_metadata", "save_head",
]
