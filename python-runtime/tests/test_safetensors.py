import json
import struct

import pytest
import torch

from nimble_worker import safetensors


def test_round_trip_many_dtypes():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 4, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "bf": torch.randn(2, 2, generator=g).bfloat16(),
        "i": torch.arange(6, dtype=torch.int64).view(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False, True]),
    }
    data = safetensors.dumps(tensors, {"step": "7"})
    (n,) = struct.unpack_from("<Q", data)
    assert n % 8 == 0
    header = json.loads(data[8:8 + n])
    assert header["w"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": header["w"]["data_offsets"]}
    assert header["bf"]["dtype"] == "BF16" and header["i"]["dtype"] == "I64"
    assert header["__metadata__"] == {"step": "7"}
    back, meta = safetensors.loads(data)
    assert meta == {"step": "7"} and back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)
    # the raw bytes of "w" are its float32 little-endian values
    b, e = header["w"]["data_offsets"]
    assert data[8 + n + b:8 + n + e] == tensors["w"].numpy().tobytes()


def test_rejects_bad_offsets():
    data = bytearray(safetensors.dumps({"a": torch.ones(4)}))
    (n,) = struct.unpack_from("<Q", data)
    header = data[8:8 + n].decode().replace("[0,16]", "[0,20]")
    with pytest.raises(ValueError, match="data_offsets"):
        safetensors.loads(bytes(data[:8]) + header.encode() + bytes(data[8 + n:]))
    with pytest.raises(ValueError):
        safetensors.loads(b"\xff" * 8)
