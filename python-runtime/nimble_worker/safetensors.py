"""The safetensors format, by hand (no dependency on the safetensors package).

File: u64 LE header length N | N bytes of JSON header (padded with spaces to a multiple
of 8) | raw little-endian tensor data. The header maps each name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data start),
plus an optional "__metadata__" of string -> string.
"""

from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
FROM_NAME = {v: k for k, v in DTYPES.items()}


def dump_parts(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> list:
    """The file as parts to write (or send) one after another: its header, then each
    tensor's bytes, viewed where the tensor is a contiguous CPU tensor (no copy at all:
    a worker sends its final weights straight from its parameters)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    names, offset = sorted(tensors), 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} is not supported by safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    parts: list = [struct.pack("<Q", len(head)) + head]
    for name in names:
        b, e = header[name]["data_offsets"]
        if e > b:
            parts.append(_bytes_view(tensors[name]))
    return parts


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytearray:
    """The file's bytes, written into one buffer: the tensors' bytes are copied once (not
    per tensor, then joined, then prefixed: three copies of a stage's weights at the end
    of a run, past a --max-memory the stage was planned within)."""
    return joined(dump_parts(tensors, metadata))


def joined(parts) -> bytearray:
    """Byte strings joined into one buffer, each copied once."""
    out = bytearray(sum(len(p) for p in parts))
    view, at = memoryview(out), 0
    for p in parts:
        view[at:at + len(p)] = p
        at += len(p)
    return out


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy where it is already a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous()
    # view as bytes keeps bf16 and friends exact; the host is little-endian (x86/arm)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def loads(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) from a safetensors file's bytes; validates offsets."""
    if len(data) < 8:
        raise ValueError("safetensors: file shorter than 8 bytes")
    (n,) = struct.unpack_from("<Q", data, 0)
    if 8 + n > len(data):
        raise ValueError("safetensors: header length exceeds file")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base, size = 8 + n, len(data) - 8 - n
    meta = header.pop("__metadata__", {}) or {}
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = FROM_NAME.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"safetensors: {name}: unknown dtype {info['dtype']}")
        b, e = info["data_offsets"]
        shape = [int(s) for s in info["shape"]]
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not (0 <= b <= e <= size) or e - b != numel * itemsize:
            raise ValueError(f"safetensors: {name}: bad data_offsets {info['data_offsets']}")
        raw = bytearray(data[base + b:base + e])
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(dtype).reshape(shape).clone()
    return out, meta


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata=None) -> None:
    with open(path, "wb") as f:
        f.write(dumps(tensors, metadata))


def load_file(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        return loads(f.read())[0]
