"""lmforge.models.gguf_reader against the gguf package: GGUFReader and gguf.quants are the reference.

Real data (the default SmolLM2 GGUF), synthetic files written with gguf.GGUFWriter (every metadata value
type, every tensor type with a fast path plus some that take the fallback), and corrupt files.
"""

import random
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.errors import UserError
from lmforge.models.gguf_reader import GGUFFile, dequantize, read_gguf

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

TIMINGS: dict[str, float] = {}  # reference timings, printed next to ours by test_smollm2_load_time


def reference_metadata(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def reference_values(rt: gguf.ReaderTensor) -> np.ndarray:
    if rt.tensor_type in (Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):  # gguf.quants has no dequantizer for these
        return rt.data.astype(np.float32)
    return np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32, copy=True)


def assert_bitwise_equal(ours: torch.Tensor, ref: np.ndarray, what: str) -> None:
    ref_t = torch.from_numpy(np.array(ref, dtype=np.float32, copy=True))
    assert ours.dtype == torch.float32, what
    assert tuple(ours.shape) == tuple(ref_t.shape), (
        f"{what}: shape {tuple(ours.shape)} vs {tuple(ref_t.shape)}"
    )
    # Bitwise, NaN payloads included, except where two NaNs meet (inf*0 + NaN): IEEE leaves open which
    # payload survives, and numpy and torch order their operands differently. There, any NaN will do.
    differ = ours.view(torch.int32) != ref_t.view(torch.int32)
    differ &= ~(ours.isnan() & ref_t.isnan())
    if differ.any():
        diff = (ours - ref_t).abs()
        raise AssertionError(
            f"{what}: {int(differ.sum())}/{differ.numel()} values differ; "
            f"max |diff| {diff.nan_to_num(nan=float('inf')).max().item():.3g}, mean {diff.nanmean().item():.3g}"
        )


def check_against_reader(path: Path, ours: GGUFFile, reader: gguf.GGUFReader) -> None:
    assert [rt.name for rt in reader.tensors] == list(ours.tensors)
    for rt in reader.tensors:
        t = ours.tensors[rt.name]
        assert t.ggml_type == rt.tensor_type, rt.name
        assert t.shape == tuple(reversed(rt.shape.tolist())), rt.name  # the reader keeps GGML's ne order
        assert t.data.dtype == rt.data.dtype and t.data.shape == rt.data.shape, rt.name
        assert np.array_equal(t.data.view(np.uint8), rt.data.view(np.uint8)), rt.name
        assert not t.data.flags.owndata, f"{rt.name}: data should be a view of the file's memmap"
        assert_bitwise_equal(
            dequantize(t), reference_values(rt), f"{path.name}:{rt.name} ({rt.tensor_type.name})"
        )


# --- the default model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf: Path) -> gguf.GGUFReader:
    start = time.perf_counter()
    reader = gguf.GGUFReader(smollm2_gguf)
    TIMINGS["GGUFReader"] = time.perf_counter() - start
    return reader


def test_smollm2_metadata_matches_gguf_reader(smollm2_gguf, smollm2_reference):
    ours = read_gguf(smollm2_gguf)
    ref = reference_metadata(smollm2_reference)
    assert ours.version == 3
    assert list(ours.metadata) == list(ref)
    for key, value in ref.items():
        assert ours.metadata[key] == value, key
        assert type(ours.metadata[key]) is type(value), key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900


def test_smollm2_tensors_match_gguf_reader(smollm2_gguf, smollm2_reference):
    ours = read_gguf(smollm2_gguf)
    assert len(ours.tensors) == 272
    assert ours.tensors["token_embd.weight"].shape == (49152, 576)
    assert ours.tensors["token_embd.weight"].ggml_type == Q.Q8_0
    start = time.perf_counter()
    for rt in smollm2_reference.tensors:
        reference_values(rt)
    TIMINGS["gguf.quants.dequantize"] = time.perf_counter() - start
    check_against_reader(smollm2_gguf, ours, smollm2_reference)


def test_smollm2_load_time(smollm2_gguf):
    """Prints read and dequantize times (run with -s); no bound: timings on shared machines drift."""
    reads, deqs = [], []
    for _ in range(2):
        start = time.perf_counter()
        f = read_gguf(smollm2_gguf)
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = {name: dequantize(t) for name, t in f.tensors.items()}
        deqs.append(time.perf_counter() - start)
        assert sum(v.numel() for v in state.values()) > 134_000_000
        del state, f
    ref = ", ".join(f"{k} {v:.2f} s" for k, v in TIMINGS.items()) or "not run"
    print(
        f"\nSmolLM2 GGUF -> float32 state: read_gguf {min(reads):.3f} s, dequantize {min(deqs):.3f} s "
        f"(best of 2; first {reads[0]:.3f} + {deqs[0]:.3f} s); reference: {ref}"
    )


# --- synthetic files written with gguf.GGUFWriter ---------------------------------------------------------

# (value type, value) for every scalar type, and arrays of each.
SCALARS = {
    "t.u8": (V.UINT8, 255),
    "t.i8": (V.INT8, -128),
    "t.u16": (V.UINT16, 65535),
    "t.i16": (V.INT16, -32768),
    "t.u32": (V.UINT32, 2**32 - 1),
    "t.i32": (V.INT32, -(2**31)),
    "t.u64": (V.UINT64, 2**64 - 1),
    "t.i64": (V.INT64, -(2**63)),
    "t.f32": (V.FLOAT32, 0.1),  # not representable: must come back as the float32 value, like the reader's
    "t.f64": (V.FLOAT64, 0.1),
    "t.bool_true": (V.BOOL, True),
    "t.bool_false": (V.BOOL, False),
    "t.str": (V.STRING, "héllo wörld ✓ 🚀"),
}
ARRAYS = {
    "t.a_u8": (V.UINT8, [0, 1, 255]),
    "t.a_i8": (V.INT8, [-128, 0, 127]),
    "t.a_u16": (V.UINT16, [0, 65535]),
    "t.a_i16": (V.INT16, [-32768, 32767]),
    "t.a_u32": (V.UINT32, [0, 2**32 - 1]),
    "t.a_i32": (V.INT32, [-(2**31), 7, 2**31 - 1]),
    "t.a_u64": (V.UINT64, [0, 2**64 - 1]),
    "t.a_i64": (V.INT64, [-(2**63), 2**63 - 1]),
    "t.a_f32": (V.FLOAT32, [0.1, -2.5, 1e30]),
    "t.a_f64": (V.FLOAT64, [0.1, -2.5, 1e300]),
    "t.a_bool": (V.BOOL, [True, False, True]),
    "t.a_str": (V.STRING, ["", "a", "Ġ t", "日本語", "x" * 1000, "\x00nul"]),
}
NESTED = [[1, 2], [3, 4, 5]]

# Byte offsets of the fp16 scale fields within a block.
FP16_FIELDS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
    Q.TQ2_0: (64,),
}
QUANTIZABLE = (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf.quants.quantize supports these
RANDOM_BYTES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.TQ2_0)  # it does not these


def random_blocks(rng: np.random.Generator, qtype: Q, shape: tuple[int, ...], scale_bits=None) -> np.ndarray:
    """Random block bytes (uint8, GGUF byte shape) whose fp16 scales are sane, so every value is finite."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        if scale_bits is None:
            scales = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        else:
            scales = rng.choice(np.asarray(scale_bits, dtype=np.uint16), n_blocks).view(np.float16)
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * type_size)


def synthetic_tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q | None]]:
    """name -> (array to write, raw_dtype): every fast path, a few fallbacks, odd shapes."""
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {
        "f32": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "f32_1d": (rng.standard_normal(7).astype(np.float32), None),
        "f16": (rng.standard_normal((4, 6)).astype(np.float16), None),
        "f64": (rng.standard_normal((2, 3)), None),
        "i32": (rng.integers(-1000, 1000, (2, 5), dtype=np.int32), None),
    }
    for qtype in QUANTIZABLE:
        for shape in ((8, 64), (2, 3, 96), (256,)):
            values = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
            values.reshape(-1)[:32] = 0.0  # an all-zero block (scale 0)
            name = f"{qtype.name.lower()}_{'x'.join(map(str, shape))}"
            tensors[name] = (gguf.quants.quantize(values, qtype), qtype)
    for qtype in RANDOM_BYTES:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for shape in ((4, 2 * block), (2, 2, block)):
            name = f"{qtype.name.lower()}_{'x'.join(map(str, shape))}"
            tensors[name] = (random_blocks(rng, qtype, shape), qtype)
    return tensors


def write_gguf(
    path: Path, metadata: bool = True, tensors: dict | None = None, alignment: int | None = None
) -> Path:
    w = gguf.GGUFWriter(path, arch="llama")
    if metadata:
        for key, (vtype, value) in SCALARS.items():
            w.add_key_value(key, value, vtype)
        for key, (vtype, value) in ARRAYS.items():
            w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
        w.add_key_value("t.nested", NESTED, V.ARRAY)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for name, (array, raw_dtype) in (tensors or {}).items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "synthetic.gguf", tensors=synthetic_tensors(rng))


def test_synthetic_metadata_every_value_type(synthetic):
    ours = read_gguf(synthetic).metadata
    ref = reference_metadata(gguf.GGUFReader(synthetic))
    assert list(ours) == list(ref)
    for key, value in ref.items():
        if key == "t.nested":
            continue
        assert ours[key] == value and type(ours[key]) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in ours[key]] == [type(v) for v in value], key
    assert ours["general.architecture"] == "llama"
    for key, (vtype, value) in {**SCALARS, **ARRAYS}.items():
        if vtype not in (V.FLOAT32, V.FLOAT64):
            assert ours[key] == value, key
    assert ours["t.f32"] == float(np.float32(0.1)) and ours["t.f64"] == 0.1
    # Arrays of arrays come back nested; the gguf reader flattens them.
    assert ours["t.nested"] == NESTED
    assert ref["t.nested"] == [v for inner in NESTED for v in inner]


def test_synthetic_tensors_every_type(synthetic):
    ours = read_gguf(synthetic)
    reader = gguf.GGUFReader(synthetic)
    types = {t.ggml_type for t in ours.tensors.values()}
    assert types >= {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    check_against_reader(synthetic, ours, reader)
    assert ours.tensors["q4_1_2x3x96"].shape == (2, 3, 96)
    assert ours.tensors["q6_k_2x2x256"].data.shape == (2, 2, 210)


def test_quantized_values_are_close_to_the_originals(tmp_path):
    """Guards the test itself: the quantized synthetic tensors decode to roughly what was quantized."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    tensors = {q.name: (gguf.quants.quantize(values, q), q) for q in QUANTIZABLE}
    f = read_gguf(write_gguf(tmp_path / "q.gguf", metadata=False, tensors=tensors))
    for name, t in f.tensors.items():
        err = (dequantize(t) - torch.from_numpy(values)).abs().max().item()
        assert err < 0.5, (name, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_to_other_dtypes(synthetic, dtype):
    reader = {rt.name: rt for rt in gguf.GGUFReader(synthetic).tensors}
    for name, t in read_gguf(synthetic).tensors.items():
        ours = dequantize(t, dtype)
        if t.ggml_type in (Q.F64, Q.I32):  # element types convert straight to dtype (no float32 detour)
            ref = torch.from_numpy(reader[name].data.copy()).to(dtype)
        else:
            ref = torch.from_numpy(reference_values(reader[name])).to(dtype)
        assert ours.dtype == dtype and torch.equal(ours, ref), name


def test_f16_and_bf16_every_bit_pattern(tmp_path):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    tensors = {"f16": (bits.view(np.float16), None), "bf16": (bits.view(np.uint8), Q.BF16)}
    path = write_gguf(tmp_path / "bits.gguf", metadata=False, tensors=tensors)
    check_against_reader(path, read_gguf(path), gguf.GGUFReader(path))
    f16 = read_gguf(path).tensors["f16"]
    assert torch.equal(
        dequantize(f16, torch.float16).view(torch.int16), torch.from_numpy(bits.view(np.int16))
    )


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference's inf * 0
def test_extreme_scales_match_bitwise(tmp_path):
    """Zero, subnormal, huge, inf and NaN fp16 scales: still the reference's values (see assert_bitwise_equal)."""
    scale_bits = [
        0x0000,
        0x8000,
        0x0001,
        0x03FF,
        0x7BFF,
        0xFBFF,
        0x7C00,
        0xFC00,
        0x7E00,
        0x7C01,
        0xFE01,
        0x3C00,
    ]
    rng = np.random.default_rng(2)
    tensors = {}
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        tensors[qtype.name] = (random_blocks(rng, qtype, (16, 4 * block), scale_bits), qtype)
    path = write_gguf(tmp_path / "extreme.gguf", metadata=False, tensors=tensors)
    check_against_reader(path, read_gguf(path), gguf.GGUFReader(path))


def test_custom_alignment(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {"a": (rng.standard_normal(3).astype(np.float32), None), "b": (rng.standard_normal(5), None)}
    path = write_gguf(tmp_path / "aligned.gguf", metadata=False, tensors=tensors, alignment=256)
    ours = read_gguf(path)
    assert ours.metadata["general.alignment"] == 256
    check_against_reader(path, ours, gguf.GGUFReader(path))


def test_version_2_is_read(tmp_path):
    data = bytearray(write_gguf(tmp_path / "v3.gguf").read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout (v3 only allowed big-endian files)
    path = tmp_path / "v2.gguf"
    path.write_bytes(data)
    ours = read_gguf(path)
    assert ours.version == 2 and ours.metadata["t.a_str"] == ARRAYS["t.a_str"][1]


def test_empty_array_and_no_tensors(tmp_path):
    # GGUFWriter refuses empty arrays; write the bytes by hand.
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    kv = string("empty") + struct.pack("<IIQ", V.ARRAY, V.INT32, 0)
    kv += string("empty_str") + struct.pack("<IIQ", V.ARRAY, V.STRING, 0)
    kv += string("empty_nested") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1) + struct.pack("<IQ", V.UINT8, 0)
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + kv)
    ours = read_gguf(path)
    assert ours.metadata == {"empty": [], "empty_str": [], "empty_nested": [[]]}
    assert ours.tensors == {}


# --- corrupt files ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[bytes, gguf.GGUFReader]:
    rng = np.random.default_rng(4)
    tensors = {
        "w": (gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q4_1), Q.Q4_1),
        "norm": (rng.standard_normal(16).astype(np.float32), None),
    }
    path = write_gguf(tmp_path_factory.mktemp("small") / "small.gguf", tensors=tensors)
    return path.read_bytes(), gguf.GGUFReader(path)


def corrupt(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_in_header(tmp_path, small):
    message = read_error(corrupt(tmp_path, small[0][:10]))
    assert "truncated" in message and "the header" in message and "the file has 10" in message


def test_truncated_in_metadata(tmp_path, small):
    data, reader = small
    cut = reader.fields["t.a_str"].offset + 40  # inside the string array
    message = read_error(corrupt(tmp_path, data[:cut]))
    assert "truncated" in message and "'t.a_str'" in message and f"the file has {cut}" in message


def test_truncated_in_tensor_info(tmp_path, small):
    data, reader = small
    cut = reader.tensors[1].field.offset + 5
    message = read_error(corrupt(tmp_path, data[:cut]))
    assert "truncated" in message and "tensor info" in message


def test_truncated_in_tensor_data(tmp_path, small):
    data, reader = small
    end = reader.tensors[-1].data_offset + reader.tensors[-1].n_bytes
    message = read_error(corrupt(tmp_path, data[: end - 1]))
    assert "truncated" in message and "'norm'" in message
    assert f"{reader.tensors[-1].data_offset}..{end}" in message and f"has {end - 1} bytes" in message


def test_every_truncation_is_a_user_error(tmp_path, small):
    data, reader = small
    end = reader.tensors[-1].data_offset + reader.tensors[-1].n_bytes
    path = tmp_path / "cut.gguf"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        if cut < end:
            read_error(path)
        else:  # only the padding after the last tensor is missing
            assert len(read_gguf(path).tensors) == 2


def test_random_corruption_is_a_user_error_or_reads(tmp_path, small):
    """Byte flips in the header and tensor infos: a UserError or a readable file, never a numpy/struct error."""
    data, reader = small
    header_end = reader.data_offset
    rng = random.Random(5)
    path = tmp_path / "flip.gguf"
    for _ in range(400):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(header_end)] = rng.randrange(256)
        path.write_bytes(mutated)
        try:
            f = read_gguf(path)
            for t in f.tensors.values():
                dequantize(t)
        except UserError as e:
            assert "\n" not in str(e)


def test_bad_magic(tmp_path, small):
    message = read_error(corrupt(tmp_path, b"PK\x03\x04" + small[0][4:]))
    assert "not a GGUF file" in message


def test_empty_file(tmp_path):
    assert "empty" in read_error(corrupt(tmp_path, b""))


def test_missing_file_and_directory(tmp_path):
    read_error(tmp_path / "nope.gguf")
    read_error(tmp_path)


def test_unsupported_versions(tmp_path, small):
    data = small[0]
    assert "version 1" in read_error(corrupt(tmp_path, data[:4] + struct.pack("<I", 1) + data[8:]))
    assert "version 4" in read_error(corrupt(tmp_path, data[:4] + struct.pack("<I", 4) + data[8:]))
    assert "big-endian" in read_error(corrupt(tmp_path, data[:4] + struct.pack(">I", 3) + data[8:]))


def test_unknown_tensor_type(tmp_path, small):
    data, reader = small
    field = reader.tensors[0].field
    at = field.offset + sum(int(p.nbytes) for p in field.parts[:4])  # name len, name, n_dims, dims
    message = read_error(corrupt(tmp_path, data[:at] + struct.pack("<I", 99) + data[at + 4 :]))
    assert "'w'" in message and "unknown GGML type 99" in message


def test_unknown_value_type(tmp_path, small):
    data, reader = small
    field = reader.fields["t.u8"]
    at = field.offset + 8 + len("t.u8")
    assert "unknown value type 77" in read_error(
        corrupt(tmp_path, data[:at] + struct.pack("<I", 77) + data[at + 4 :])
    )


def test_duplicate_key(tmp_path, small):
    data, reader = small
    at = reader.fields["t.i8"].offset + 8
    assert data[at : at + 4] == b"t.i8"
    assert "appears twice" in read_error(corrupt(tmp_path, data[:at] + b"t.u8" + data[at + 4 :]))


def test_bad_alignment(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", metadata=False, alignment=64)
    data = path.read_bytes()
    at = data.index(b"general.alignment") + len("general.alignment") + 4
    assert "power of two" in read_error(corrupt(tmp_path, data[:at] + struct.pack("<I", 48) + data[at + 4 :]))


def test_invalid_utf8(tmp_path, small):
    data, reader = small
    at = reader.fields["t.str"].offset + 8 + len("t.str") + 4 + 8  # key, value type, string length
    assert "UTF-8" in read_error(corrupt(tmp_path, data[:at] + b"\xff" + data[at + 1 :]))


def test_type_without_a_dequantizer(tmp_path):
    raw = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), dtype=np.uint8)
    path = write_gguf(tmp_path / "q8k.gguf", metadata=False, tensors={"x": (raw, Q.Q8_K)})
    t = read_gguf(path).tensors["x"]
    assert t.shape == (1, 256)
    with pytest.raises(UserError, match="Q8_K") as info:
        dequantize(t)
    assert str(path) in str(info.value)
