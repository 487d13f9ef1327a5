"""Activations (and their gradients) between pipeline stages, as bytes.

    magic "NPA1" | u8 codec | u8 dtype | u16 ndim | ndim x u64 dims | body   (little-endian)

Body by codec: `none`, the tensor's own bytes (bit exact, dtype kept); `fp16` / `bf16`,
two bytes per value; `int8`, blockwise absmax as the ring's int8 codec (compress/fake.py):
one float32 scale per block of 256 values, then the int8 values padded to whole blocks.
Lossy codecs unpack to float32. The bytes come from another provider's worker, so
`unpack` checks everything and raises ValueError on any mismatch.
"""

from __future__ import annotations

import math
import struct

import torch

from ..compress.fake import INT8_BLOCK, blockwise_dequantize, blockwise_quantize

MAGIC = b"NPA1"
HEAD = struct.Struct("<4sBBH")
MAX_NDIM = 8
CODECS = ("none", "fp16", "bf16", "int8")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
"""Wire dtype numbers are indices into this tuple."""


def pack(tensor: torch.Tensor, codec: str) -> bytes:
    """`tensor` (any device) as bytes; lossy codecs need a floating-point tensor."""
    if codec not in CODECS:
        raise ValueError(f"unknown activation codec {codec!r} (one of {', '.join(CODECS)})")
    if tensor.dtype not in DTYPES:
        raise ValueError(f"cannot send a {tensor.dtype} tensor between stages")
    if codec != "none" and not tensor.is_floating_point():
        raise ValueError(f"activation codec {codec} needs a floating-point tensor, not {tensor.dtype}")
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"a tensor of {tensor.dim()} dimensions (at most {MAX_NDIM})")
    t = tensor.detach().to("cpu").contiguous()
    head = HEAD.pack(MAGIC, CODECS.index(codec), DTYPES.index(t.dtype), t.dim()) \
        + struct.pack(f"<{t.dim()}Q", *t.shape)
    if codec == "none":
        body = _bytes(t)
    elif codec in ("fp16", "bf16"):
        body = _bytes(t.to(torch.float16 if codec == "fp16" else torch.bfloat16))
    else:
        scales, q = blockwise_quantize(t.reshape(-1), INT8_BLOCK, 127)
        body = _bytes(scales) + _bytes(q)
    return head + body


def unpack(data: bytes | bytearray | memoryview, max_bytes: int, expected_codec: str) -> torch.Tensor:
    """The tensor `pack` made (float32 for a lossy codec), after checking the header
    against `expected_codec` and every length against the bytes and `max_bytes`."""
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise ValueError(f"activation of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < HEAD.size:
        raise ValueError(f"activation of {len(view)} bytes is shorter than its {HEAD.size}-byte header")
    magic, codec_id, dtype_id, ndim = HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"not an activation: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if codec_id >= len(CODECS):
        raise ValueError(f"unknown activation codec number {codec_id}")
    codec = CODECS[codec_id]
    if codec != expected_codec:
        raise ValueError(f"activation packed with codec {codec}, expected {expected_codec}")
    if dtype_id >= len(DTYPES):
        raise ValueError(f"unknown activation dtype number {dtype_id}")
    dtype = DTYPES[dtype_id]
    if codec != "none" and not dtype.is_floating_point:
        raise ValueError(f"codec {codec} with a non-floating dtype {dtype}")
    if ndim > MAX_NDIM:
        raise ValueError(f"activation of {ndim} dimensions (at most {MAX_NDIM})")
    at = HEAD.size + 8 * ndim
    if len(view) < at:
        raise ValueError(f"activation header of {ndim} dimensions is cut short ({len(view)} bytes)")
    shape = struct.unpack_from(f"<{ndim}Q", view, HEAD.size)
    numel = math.prod(shape)
    if numel > max_bytes:  # before any size arithmetic on absurd shapes
        raise ValueError(f"activation shape {list(shape)} exceeds the limit of {max_bytes} bytes")
    if codec == "none":
        want = numel * _itemsize(dtype)
    elif codec in ("fp16", "bf16"):
        want = 2 * numel
    else:
        blocks = -(-numel // INT8_BLOCK)
        want = 4 * blocks + INT8_BLOCK * blocks
    if len(view) - at != want:
        raise ValueError(f"activation of shape {list(shape)} ({codec}, {dtype}) needs {want} "
                         f"bytes after its header, found {len(view) - at}")
    body = view[at:]
    if codec == "none":
        return _tensor(body, dtype, numel).reshape(shape)
    if codec in ("fp16", "bf16"):
        half = torch.float16 if codec == "fp16" else torch.bfloat16
        return _tensor(body, half, numel).to(torch.float32).reshape(shape)
    blocks = -(-numel // INT8_BLOCK)
    scales = _tensor(body[:4 * blocks], torch.float32, blocks)
    q = _tensor(body[4 * blocks:], torch.int8, blocks * INT8_BLOCK)
    return blockwise_dequantize(scales, q, numel, INT8_BLOCK).reshape(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as int16
        t = t.view(torch.int16)
    return t.contiguous().numpy().tobytes()


def _tensor(body: memoryview, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A fresh tensor (our own memory, writable) of `numel` values of `dtype` in `body`."""
    if numel == 0:
        return torch.zeros(0, dtype=dtype)
    raw = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    if dtype == torch.bool:
        if bool((raw > 1).any()):
            raise ValueError("a bool activation holds bytes other than 0 and 1")
        return raw.to(torch.bool)
    return raw.view(dtype)
