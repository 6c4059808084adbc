"""Host memory for the tensors an export assembles and casts: in huge pages where the kernel has them.

An export allocates the whole model once more in the export dtype, a unit at a time, and frees
each unit when its writes are done. Fresh memory costs the kernel a page fault and a zeroed page
per 4 KiB. numpy asks the kernel for transparent huge pages for arrays of 4 MiB and more
(``madvise``, honoured when the kernel's THP mode is "madvise" or "always"): one fault per 2 MiB.
`empty` returns a torch tensor over such an array's memory; the tensor holds the array, and both
are freed together, so nothing outlives the unit. On the development machine (THP "madvise") this
took 3-6% off the CPU time of a 350M model's export (`bench.vs_bridge`). Keeping freed arrays for
later units of the same size as well took nothing more off, measured in the same run, so the
memory is not kept.
"""

from __future__ import annotations

import numpy as np
import torch

# From this size on, tensors come from numpy arrays (numpy madvises huge pages from 4 MiB on);
# smaller ones from torch.empty.
LARGE_BYTES = 4 << 20


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous host tensor (module docstring)."""
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if nbytes < LARGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` of a host tensor, into `empty` memory (the same kernel and rounding;
    contiguous); a device tensor or one already in ``dtype``: ``tensor.to(dtype)``."""
    if tensor.dtype == dtype or tensor.device.type != "cpu":
        return tensor.to(dtype)
    return empty(tensor.shape, dtype).copy_(tensor)
