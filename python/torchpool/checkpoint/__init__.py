"""Safetensors checkpoints: read, bind lazily, load into distributed state dicts, inspect.

    reader.py        open_checkpoint / Checkpoint: the validated, memory-mapped reader
    lazy.py          load_lazily / load_into / init_empty_weights: weights bound to a model by name
    hf.py            from_pretrained: Hugging Face transformers checkpoint directories
    distributed.py   HFStorageReader for torch.distributed.checkpoint (dcp.load)
    _ranges.py       the box reader a rank's slices go through (Note [Reading a box])
    inspect.py       `torchpool inspect PATH`

``torchpool.checkpoint`` is the reader's API (``torchpool.checkpoint.CheckpointError`` ...); the
other parts are imported by name (``torchpool.checkpoint.lazy``; old name ``torchpool.lazy``).
"""

from .reader import Checkpoint, CheckpointError, TensorInfo, TensorNotFoundError, open_checkpoint
from .reader import INDEX_NAME, TensorSlice

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "TensorNotFoundError", "TensorSlice", "open_checkpoint",
           "INDEX_NAME"]
