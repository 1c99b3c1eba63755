"""The exported model on disk: pruned weights stored sparse (their kept values + a bitmask), the rest dense.

A pruned conv/linear weight is stored as the float32 values it keeps, in row-major order, and one bit per
weight saying which are kept (numpy's packbits, big-endian bit order): 4 bytes per kept weight + 1/8 byte per
weight, which is the `sparse_bytes` a trial reports (study.trial.pruning.SizeReport), plus a few kilobytes of
torch's file format. torch's COO/CSR layouts
would carry an int64 index (or two) per kept weight, 2-4 times the values themselves. Everything else (biases,
BatchNorm's parameters and statistics, a weight kept whole) is stored as it is.

The file is a `torch.save` of plain containers and tensors, so it loads with `torch.load(weights_only=True)`;
`load_state` turns it back into the dense state dict (hard zeros), bitwise equal to what was saved, and also
reads the older format (the dense state dict itself).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

FORMAT = "robust-prune-study/sparse-v1"


class SparseFileError(ValueError):
    """A model file that is neither format, or whose parts do not fit together."""


def is_prunable(name: str, tensor: torch.Tensor) -> bool:
    """A conv or linear weight (every one is prunable in this project's architectures): a floating tensor named
    `*.weight` with 2 or more dimensions (BatchNorm's weights are 1-D)."""
    return name.endswith("weight") and tensor.dim() >= 2 and tensor.is_floating_point()


def encode(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The sparse-file payload of a dense state dict (hard zeros where pruned).

    Few tensors, whatever the model: the kept values of every pruned weight in one float32 tensor, their
    bitmasks in one uint8 tensor, and the dense tensors flattened into one tensor per dtype (a tensor in torch's
    file format costs a few hundred bytes of records: 30 of them would be 10% of a small model's file).
    `layout` says, in the state dict's order, how to cut them apart again."""
    layout, values, masks, dense = [], [], [], {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if is_prunable(name, t) and t.dtype == torch.float32:
            kept = t.reshape(-1).view(torch.int32) != 0  # by bits: a -0.0 is kept, so the round trip is exact
            values.append(t.reshape(-1)[kept])
            masks.append(torch.from_numpy(np.packbits(kept.numpy())))
            layout.append([name, "sparse", list(t.shape), "float32"])
        else:
            kind = str(t.dtype).replace("torch.", "")
            dense.setdefault(kind, []).append(t.reshape(-1))
            layout.append([name, "dense", list(t.shape), kind])
    cat = lambda ts, dtype: torch.cat(ts) if ts else torch.zeros(0, dtype=dtype)  # noqa: E731
    return {"format": FORMAT, "layout": layout, "values": cat(values, torch.float32), "mask": cat(masks, torch.uint8),
            "dense": {kind: torch.cat(ts) for kind, ts in dense.items()}}


def decode(payload: Any, where: str = "model file") -> dict[str, torch.Tensor]:
    """The dense state dict of a payload (either format)."""
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        try:
            return _decode_sparse(payload)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise SparseFileError(f"{where}: a damaged {FORMAT} file ({type(e).__name__}: {e})") from None
    if isinstance(payload, dict) and payload and all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in payload.items()):
        return dict(payload)  # the older format: the dense state dict itself
    raise SparseFileError(f"{where}: not a model file of this project (neither {FORMAT} nor a state dict)")


def _decode_sparse(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    values, mask, dense = payload["values"], payload["mask"].numpy(), payload["dense"]
    at = {"values": 0, "mask": 0, **{kind: 0 for kind in dense}}
    out: dict[str, torch.Tensor] = {}
    for name, kind, shape, dtype in payload["layout"]:
        n = int(np.prod(shape)) if shape else 1
        if kind == "dense":
            out[name] = dense[dtype][at[dtype]:at[dtype] + n].reshape(shape).clone()
            at[dtype] += n
            continue
        nbytes = (n + 7) // 8
        kept = np.unpackbits(mask[at["mask"]:at["mask"] + nbytes], count=n).astype(bool)
        k = int(kept.sum())
        if at["values"] + k > values.numel() or len(kept) != n:
            raise ValueError(f"{name}: its mask keeps more weights than the file stores")
        flat = torch.zeros(n, dtype=values.dtype)
        flat[torch.from_numpy(kept)] = values[at["values"]:at["values"] + k]
        out[name] = flat.reshape(shape)
        at["mask"] += nbytes
        at["values"] += k
    if at["values"] != values.numel():
        raise ValueError(f"{values.numel() - at['values']} stored values belong to no weight")
    return out


def save(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the sparse file (to a temporary name, then renamed: a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(encode(state), tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict in a model file of either format, read with torch's weights-only unpickler."""
    return decode(torch.load(path, map_location="cpu", weights_only=True), str(path))
