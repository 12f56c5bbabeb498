#!/usr/bin/env python3
"""Cross-checks subspace's safetensors I/O against the reference implementation (pip install safetensors numpy).

    python3 tests/data/check_safetensors.py check [FILE]   # FILE (default: subspace_written.safetensors beside
                                                            # this script) loads with `safetensors` and holds the
                                                            # expected tensors and metadata
    python3 tests/data/check_safetensors.py write [FILE]   # writes python_written.safetensors with `safetensors`

Both files are kept in tests/data/. The host test suite (tests/host/test_io.cpp) checks, without Python, that our
writer still produces subspace_written.safetensors byte for byte and that our reader loads python_written.safetensors;
this script is the link to the reference implementation, run by hand when either side changes.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def expected_subspace_tensors():
    """The tensors of subspace_written.safetensors (the C++ test builds the same ones): name -> (dtype, array)."""
    bf16_values = np.array([1.0, -2.5, 0.15625, 256.0], dtype=np.float32)  # exact in bfloat16
    return {
        "f32": ("F32", ((np.arange(6, dtype=np.float32) - 2.5) * 0.75).reshape(2, 3)),
        "bf16": ("BF16", bf16_values),
        "f16": ("F16", np.array([0.5, -65504.0, 6.103515625e-05], dtype=np.float16)),
        "f64": ("F64", np.array([0.1, -1e300], dtype=np.float64)),
        "i32": ("I32", np.array([[-2147483648, -1], [0, 2147483647]], dtype=np.int32)),
        "i64": ("I64", np.array([-(1 << 40), 1 << 62], dtype=np.int64)),
        "u8": ("U8", np.array([0, 128, 255], dtype=np.uint8)),
        "scalar": ("F32", np.array(42.5, dtype=np.float32)),
        "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
    }


def raw_bytes(dtype, array):
    if dtype == "BF16":  # the upper half of each float32 (these values are exact in bfloat16)
        return (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def check(path):
    from safetensors import deserialize, safe_open

    with open(path, "rb") as f:
        content = f.read()
    expected = expected_subspace_tensors()
    # The reference parser validates the header and the buffer layout (no holes, offsets matching the shapes).
    tensors = dict(deserialize(content))
    assert set(tensors) == set(expected), f"tensor names {sorted(tensors)} != {sorted(expected)}"
    for name, (dtype, array) in expected.items():
        t = tensors[name]
        assert t["dtype"] == dtype, f"{name}: dtype {t['dtype']} != {dtype}"
        assert list(t["shape"]) == list(array.shape), f"{name}: shape {t['shape']} != {list(array.shape)}"
        assert bytes(t["data"]) == raw_bytes(dtype, array), f"{name}: data differs"
    # And the numpy front end reads the values and the metadata (it has no bfloat16).
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "producer": "subspace"}, f"metadata {f.metadata()}"
        for name, (dtype, array) in expected.items():
            if dtype == "BF16":
                continue
            got = f.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape, f"{name}: {got.dtype} {got.shape}"
            assert np.array_equal(got, array), f"{name}: values differ"
    print(f"check_safetensors: {path}: {len(expected)} tensors and the metadata load with safetensors "
          f"(reference implementation) as expected")


def write(path):
    from safetensors.numpy import save_file

    tensors = {
        "py_f32": (np.arange(6, dtype=np.float32) * 0.25).reshape(3, 2),
        "py_f16": np.array([1.5, -0.25], dtype=np.float16),
        "py_f64": np.array([1.0 / 3.0], dtype=np.float64),
        "py_i64": np.array([1, -2, 3 << 40], dtype=np.int64),
        "py_u8": np.array([7, 200], dtype=np.uint8),
        "py_bool": np.array([True, False], dtype=np.bool_),
    }
    save_file(tensors, path, metadata={"format": "np", "who": "python"})
    print(f"check_safetensors: wrote {path} with safetensors.numpy.save_file")


def main(argv):
    if len(argv) < 2 or argv[1] not in ("check", "write") or len(argv) > 3:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "check":
        path = argv[2] if len(argv) == 3 else os.path.join(HERE, "subspace_written.safetensors")
        if not os.path.isfile(path):
            print(f"check_safetensors: error: '{path}': no such file", file=sys.stderr)
            return 1
        check(path)
    else:
        write(argv[2] if len(argv) == 3 else os.path.join(HERE, "python_written.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
