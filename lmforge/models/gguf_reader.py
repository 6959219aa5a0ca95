"""A lean reader for GGUF v2/v3 files and a torch dequantizer for their tensors.

Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (all fields little-endian):

    magic b"GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type u32, value)        string = u64 length + UTF-8 bytes
    tensor_count x (name: string, n_dims u32, ne: n_dims x u64, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then tensor data (each offset relative to here)

`gguf.GGUFReader` builds numpy objects for every array element (2.5 s for the default model's 98k
vocabulary strings); this reader walks the header once with `struct` and decodes strings straight from
a memoryview (~60 ms for that header), and hands tensor data out as zero-copy views of one `np.memmap`.

`dequantize` has torch fast paths for the common storage types and falls back to `gguf.quants.dequantize`,
which is the reference: every fast path equals it bitwise (tests/models/test_gguf_reader.py).
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmforge.errors import UserError

QType = gguf.GGMLQuantizationType
VType = gguf.GGUFValueType

_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TYPE_AND_OFFSET = struct.Struct("<IQ")

# Fixed-size value types: (struct format for scalars, numpy dtype for arrays).
_FIXED: dict[VType, tuple[struct.Struct, np.dtype]] = {
    VType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    VType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    VType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    VType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    VType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    VType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    VType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    VType.BOOL: (struct.Struct("<B"), np.dtype("<u1")),  # decoded as byte != 0
    VType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    VType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    VType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}

# Tensor types whose data is exposed as typed elements (like gguf.GGUFReader); all others as raw block bytes.
_ELEMENT_DTYPES: dict[QType, np.dtype] = {
    QType.F32: np.dtype("<f4"),
    QType.F16: np.dtype("<f2"),
    QType.F64: np.dtype("<f8"),
    QType.I8: np.dtype("<i1"),
    QType.I16: np.dtype("<i2"),
    QType.I32: np.dtype("<i4"),
    QType.I64: np.dtype("<i8"),
}


@dataclass
class GGUFTensor:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (GGML's ne reversed), e.g. token_embd (vocab, n_embd)
    # As stored, a view into the file's memmap: typed elements of `shape` for F32/F16/F64/I8..I64,
    # otherwise uint8 block bytes of shape (*shape[:-1], bytes_per_row) -- the same as gguf.GGUFReader.
    data: np.ndarray


@dataclass
class GGUFFile:
    path: Path
    version: int
    # Same values as gguf.GGUFReader's field.contents(): str / int / float / bool, and arrays as Python
    # lists (list[str], list[int], ...). Arrays of arrays are nested lists (the gguf reader flattens them).
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]  # in file order


class _Header:
    """Cursor over the file's bytes; every read is bounds-checked so a corrupt file gives a UserError."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.size, self.off = buf, path, len(buf), 0

    def truncated(self, end: int, what: str) -> UserError:
        return UserError(
            f"{self.path} is truncated: {what} needs at least {end} bytes but the file has {self.size}; "
            "download or export it again"
        )

    def need(self, n: int, what: str) -> int:
        start = self.off
        if start + n > self.size:
            raise self.truncated(start + n, what)
        self.off = start + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.need(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is corrupt: {what} is not valid UTF-8; download it again") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == VType.STRING:
            return self.string(what)
        if vtype == VType.ARRAY:
            return self.array(what)
        fixed = _FIXED.get(vtype)
        if fixed is None:
            raise UserError(
                f"{self.path} is corrupt: {what} has unknown value type {vtype}; download it again"
            )
        fmt = fixed[0]
        (v,) = fmt.unpack_from(self.buf, self.need(fmt.size, what))
        return v != 0 if vtype == VType.BOOL else v

    def array(self, what: str) -> list[Any]:
        itype = self.u32(what)
        count = self.u64(what)
        if itype == VType.STRING:
            return self.string_array(count, what)
        fixed = _FIXED.get(itype)
        if fixed is not None:
            dt = fixed[1]
            if count == 0:
                return []
            start = self.need(count * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=start)
            return (arr != 0).tolist() if itype == VType.BOOL else arr.tolist()
        return [self.value(itype, what) for _ in range(count)]  # arrays of arrays (or an unknown type: error)

    def string_array(self, count: int, what: str) -> list[str]:
        # The hot loop for vocabularies and merges (~100k strings): locals only, one bounds check per string.
        buf, off, size, unpack = self.buf, self.off, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, off)
                off += 8
                if off + n > size:
                    break
                append(str(buf[off : off + n], "utf-8"))
                off += n
            else:
                self.off = off
                return out
        except struct.error:  # fewer than 8 bytes left for a length
            off += 8
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is corrupt: {what} is not valid UTF-8; download it again") from None
        raise self.truncated(max(off, size + 1), what)


def read_gguf(path: str | Path) -> GGUFFile:
    """Read a GGUF v2/v3 file: metadata as Python values, tensors as views of a copy-on-write memmap."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:  # np.memmap cannot map an empty file
            raise UserError(f"{path} is empty (0 bytes), not a GGUF file; download or export it again")
        # mode "c" (copy-on-write) gives writable views, so torch.from_numpy takes them without a warning,
        # and nothing can ever write back to the user's file.
        mm = np.memmap(path, dtype=np.uint8, mode="c")
    except OSError as e:
        raise UserError(f"cannot read GGUF file {path}: {e.strerror or e}; check the path") from None
    base = mm.view(np.ndarray)  # plain ndarray views keep the memmap alive through .base
    h = _Header(memoryview(base), path)

    magic = bytes(base[:4])
    if magic != b"GGUF":
        if b"GGUF".startswith(magic):
            raise h.truncated(4, "the GGUF magic")
        raise UserError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model"
        )
    h.off = 4
    version = h.u32("the header")
    if version not in _SUPPORTED_VERSIONS:
        if (
            version & 0xFFFF == 0
            and int.from_bytes(version.to_bytes(4, "little"), "big") in _SUPPORTED_VERSIONS
        ):
            raise UserError(f"{path} is a big-endian GGUF file; lmforge reads little-endian GGUF only")
        raise UserError(
            f"{path} is GGUF version {version}; lmforge reads versions 2 and 3 (re-convert it with llama.cpp)"
        )
    n_tensors = h.u64("the header")
    n_kv = h.u64("the header")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = h.string(f"metadata key #{i}")
        what = f"metadata value {key!r}"
        value = h.value(h.u32(what), what)
        if key in metadata:
            raise UserError(f"{path} is corrupt: metadata key {key!r} appears twice; download it again")
        metadata[key] = value

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = h.string(f"tensor info #{i}")
        what = f"tensor info {name!r}"
        n_dims = h.u32(what)
        ne = struct.unpack_from(f"<{n_dims}Q", h.buf, h.need(8 * n_dims, what))
        raw_type, offset = _TYPE_AND_OFFSET.unpack_from(h.buf, h.need(_TYPE_AND_OFFSET.size, what))
        infos.append((name, tuple(reversed(ne)), raw_type, offset))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise UserError(f"{path} is corrupt: general.alignment is {alignment!r}, not a power of two")
    data_start = -(-h.off // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, raw_type, offset in infos:
        if name in tensors:
            raise UserError(f"{path} is corrupt: tensor {name!r} appears twice; download it again")
        tensors[name] = _tensor(base, path, name, shape, raw_type, data_start + offset)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)


def _tensor(
    base: np.ndarray, path: Path, name: str, shape: tuple[int, ...], raw_type: int, start: int
) -> GGUFTensor:
    try:
        qtype = QType(raw_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise UserError(
            f"{path}: tensor {name!r} has unknown GGML type {raw_type}; "
            "upgrade the gguf package or re-convert the file"
        ) from None
    cols = shape[-1] if shape else 1
    if cols % block:
        raise UserError(
            f"{path} is corrupt: tensor {name!r} has rows of {cols} values, not a multiple of the "
            f"{qtype.name} block size {block}"
        )
    n = math.prod(shape)  # Python ints: corrupt dims must not overflow into a small, "valid" size
    nbytes = n // block * type_size
    if start + nbytes > base.size:
        raise UserError(
            f"{path} is truncated: tensor {name!r} needs bytes {start}..{start + nbytes} but the file has "
            f"{base.size} bytes; download or export it again"
        )
    raw = base[start : start + nbytes]
    dt = _ELEMENT_DTYPES.get(qtype)
    try:
        data = (
            raw.view(dt).reshape(shape)
            if dt is not None
            else raw.reshape(*shape[:-1], cols // block * type_size)
        )
    except ValueError:  # only reachable with absurd dims around a zero, e.g. (2**63, 0)
        raise UserError(f"{path} is corrupt: tensor {name!r} has shape {shape}; download it again") from None
    return GGUFTensor(name=name, ggml_type=qtype, shape=shape, data=data)


# --- dequantization ------------------------------------------------------------------------------------
# Each fast path mirrors the numpy reference in gguf/quants.py operation by operation (same float32
# multiplies and adds, never fused), which is what makes the results bitwise equal. A kernel takes the
# blocks as a (n_blocks, type_size) uint8 tensor and writes float32 into out (n_blocks, block_size).

_Kernel = Callable[[torch.Tensor, torch.Tensor], None]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 (n_blocks, 1).

    Converted by numpy like the reference: torch turns every fp16 NaN into one canonical NaN, numpy keeps
    sign and payload, and so a corrupt (NaN) scale still dequantizes to the reference's exact bits.
    """
    return torch.from_numpy(blocks[:, start : start + 2].numpy().view(np.float16).astype(np.float32))


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups*g) bytes -> (n, groups*2*g) values 0..15: per group of g bytes its low nibbles, then high."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    q = torch.empty(n, groups, 2, qs.shape[-1], dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[:, :, :1])
    torch.bitwise_right_shift(qs, 4, out=q[:, :, 1:])
    return q.reshape(n, -1)


def _high_bits(qh: torch.Tensor, nbits: int) -> torch.Tensor:
    """(n, m) bytes -> (n, nbits, m): bit i of every byte (the Q5 / Q5_K layout)."""
    shifts = torch.arange(nbits, dtype=torch.uint8).reshape(1, nbits, 1)
    return (qh.unsqueeze(1) >> shifts) & 1


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(blocks[:, 2:].view(torch.int8), _f16(blocks, 0), out=out)


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 2:], 1).view(torch.int8).sub_(8)
    torch.mul(q, _f16(blocks, 0), out=out)


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_nibbles(blocks[:, 4:], 1), _f16(blocks, 0), out=out)
    out.add_(_f16(blocks, 2))


def _q5(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit values 0..31: low nibbles as Q4, bit j of the little-endian u32 qh is element j's bit 4."""
    ql = _nibbles(blocks[:, qh_at + 4 :], 1)
    qh = _high_bits(blocks[:, qh_at : qh_at + 4], 8).transpose(1, 2).reshape(-1, 32)  # bit j%8 of byte j//8
    return ql | (qh << 4)


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_q5(blocks, 2).view(torch.int8).sub_(16), _f16(blocks, 0), out=out)


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_q5(blocks, 4), _f16(blocks, 0), out=out)
    out.add_(_f16(blocks, 2))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins per block (gguf Q4_K.get_scale_min)."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_affine(blocks: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """out = d*scale * q - dmin*min per 32-value sub-block, q (n, 8, 32) values."""
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).unsqueeze(-1)  # (n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).unsqueeze(-1)
    out3 = out.view(-1, 8, 32)
    torch.mul(q, d, out=out3)
    out3.sub_(dm)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _k_affine(blocks, _nibbles(blocks[:, 16:], 4).view(-1, 8, 32), out)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    ql = _nibbles(blocks[:, 48:], 4).view(-1, 8, 32)
    qh = _high_bits(blocks[:, 16:48], 8)  # (n, 8, 32): sub-block i takes bit i
    _k_affine(blocks, ql | (qh << 4), out)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128], 2).view(n, 8, 32)  # per 128-value half: low nibbles of 64 bytes, then high
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qh = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03  # per half: 4 x 2 bits of 32 bytes
    q = (ql | (qh.view(n, 8, 32) << 4)).view(torch.int8).sub_(32).view(n, 16, 16)
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # (n, 16, 1)
    torch.mul(q, d, out=out.view(n, 16, 16))


_KERNELS: dict[QType, _Kernel] = {
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
}


def _torch_view(arr: np.ndarray) -> torch.Tensor:
    if not arr.flags.writeable:  # e.g. a caller's read-only memmap; we never write through this view
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: dequantizing is memory-bound and costs ~10 elementwise ops per tensor.

    On the 2-core dev machine with other processes busy, every OpenMP region waits for a descheduled
    worker: the default model took 2.7-7.6 s with 2 threads vs 0.2-0.6 s with 1 (0.13 vs 0.19 s when idle).
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def dequantize(t: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor's values as a new `dtype` tensor of shape t.shape (never a view of the file).

    Values are computed in float32 exactly as `gguf.quants.dequantize` does (bitwise equal; only where
    corrupt scales make two NaNs meet may the NaN payload differ), then cast to `dtype`. F16/BF16 asked
    for in their own dtype are copied as is; F64 and integer tensors (which gguf.quants does not handle)
    are converted straight to `dtype`.
    """
    qtype = t.ggml_type
    with _one_thread():
        if qtype == QType.F16:
            if dtype == torch.float16:
                return torch.from_numpy(np.array(t.data, copy=True))
            return torch.from_numpy(t.data.astype(np.float32)).to(dtype)  # numpy for the NaN bits (see _f16)
        if qtype == QType.BF16:
            src = _torch_view(np.ascontiguousarray(t.data)).view(torch.bfloat16).view(t.shape)
            return src.clone() if dtype == torch.bfloat16 else src.float().to(dtype)  # bf16 -> fp32 is exact
        if qtype in _ELEMENT_DTYPES:  # F32, F64 and integer types: plain element conversion
            return torch.from_numpy(np.array(t.data, copy=True)).to(dtype).view(t.shape)
        kernel = _KERNELS.get(qtype)
        if kernel is None:
            return _dequantize_reference(t).to(dtype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = _torch_view(t.data).reshape(-1, type_size)
        # Whole tensor per call: cache-sized chunks measured slower (per-op overhead outweighs locality).
        out = torch.empty(blocks.shape[0], block, dtype=torch.float32)
        kernel(blocks, out)
        return out.view(t.shape).to(dtype)


def _dequantize_reference(t: GGUFTensor) -> torch.Tensor:
    try:
        values = gguf.quants.dequantize(t.data, t.ggml_type)
    except NotImplementedError:
        raise UserError(
            f"{_file_of(t.data)}: tensor {t.name!r} has type {t.ggml_type.name}, which lmforge cannot "
            "dequantize; use a GGUF with another quantization"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(t.shape)


def _file_of(data: np.ndarray) -> str:
    """The file a tensor's data maps (for error messages; dequantize only gets the tensor)."""
    arr: Any = data
    while arr is not None:
        if isinstance(arr, np.memmap) and arr.filename:
            return arr.filename
        arr = getattr(arr, "base", None)
    return "GGUF file"
