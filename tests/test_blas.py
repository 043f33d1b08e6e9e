"""blas.gemm: MKL through ctypes (when the mkl package is installed) against NumPy's matmul, on the
operand layouts ops passes it (row slices, column slices, transposed views) and the ones it must
refuse (falling back to NumPy); blas.gemm_bf16 likewise, through oneDNN and MKL."""
import os
import subprocess
import sys

import numpy as np
import pytest

from distgpt import blas

from conftest import require_mkl


def operand(rng, shape, how, dtype):
    """A (rows, cols) array laid out `how`: contiguous, a column slice of a wider array, or the
    transpose of a (cols, rows) one (also sliced)."""
    r, c = shape
    if how == "contiguous":
        return rng.standard_normal((r, c)).astype(dtype)
    if how == "column-slice":
        return rng.standard_normal((r, c + 7)).astype(dtype)[:, 3:3 + c]
    if how == "transposed":
        return rng.standard_normal((c, r)).astype(dtype).T
    return rng.standard_normal((c, r + 5)).astype(dtype)[:, 2:2 + r].T          # transposed slice


LAYOUTS = ["contiguous", "column-slice", "transposed", "transposed-slice"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_how", LAYOUTS)
@pytest.mark.parametrize("b_how", LAYOUTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_matches_numpy_on_every_layout(blas_backend, monkeypatch, dtype, a_how, b_how, accumulate):
    rng = np.random.default_rng(0)
    M, K, N = 37, 53, 29
    a, b = operand(rng, (M, K), a_how, dtype), operand(rng, (K, N), b_how, dtype)
    base = rng.standard_normal((M, N + 4)).astype(dtype)
    out = base[:, 1:1 + N]                                   # a strided output view
    expect = (out.astype(np.float64) if accumulate else 0) + a.astype(np.float64) @ b.astype(np.float64)
    before = base.copy()
    calls = []
    if blas_backend == "mkl":                   # MKL itself must take every one of these layouts
        real = blas._mkl().gemm[np.dtype(dtype)]
        spy = lambda *args: (calls.append(args[1:3]), real(*args))          # noqa: E731
        monkeypatch.setitem(blas._mkl().gemm, np.dtype(dtype), spy)
    blas.gemm(a, b, out, accumulate=accumulate)
    if blas_backend == "mkl":
        flag = {True: blas._TRANS, False: blas._NO_TRANS}
        assert calls == [(flag[a_how.startswith("transposed")], flag[b_how.startswith("transposed")])]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.abs(out - expect).max() <= tol * np.abs(expect).max()
    # the columns around the view are untouched
    assert np.array_equal(base[:, 0], before[:, 0]) and np.array_equal(base[:, N + 1:], before[:, N + 1:])


def test_mkl_actually_runs_when_chosen(monkeypatch):
    require_mkl()
    blas.use("mkl")
    try:
        mkl = blas._mkl()
        calls = []
        real = mkl.gemm[np.dtype(np.float32)]
        spy = lambda *args: (calls.append(args[3:6]), real(*args))              # noqa: E731
        monkeypatch.setitem(mkl.gemm, np.dtype(np.float32), spy)
        rows = blas.SMALL_M + 1
        a, b = np.ones((rows, 3), np.float32), np.ones((3, 5), np.float32)
        out = np.empty((rows, 5), np.float32)
        blas.gemm(a, b, out)
        assert calls == [(rows, 5, 3)] and np.all(out == 3)
        assert blas.describe().startswith("MKL ")
        # a few rows (decoding) go to NumPy's BLAS, which streams the weights faster there
        few = np.empty((blas.SMALL_M, 5), np.float32)
        blas.gemm(a[: blas.SMALL_M], b, few)
        assert len(calls) == 1 and np.all(few == 3)
    finally:
        blas.use("auto")


def test_unsupported_operands_fall_back_to_numpy():
    require_mkl()
    blas.use("mkl")
    try:
        rng = np.random.default_rng(1)
        a = rng.standard_normal((6, 8)).astype(np.float32)
        b = rng.standard_normal((8, 5)).astype(np.float32)
        cases = [
            (a[::2], b, np.empty((3, 5), np.float32)),              # row stride not a plain leading dim
            (a, b, np.empty((5, 6), np.float32).T),                  # transposed output
            (a.astype(np.float16), b.astype(np.float16), np.empty((6, 5), np.float16)),
            (a, b.astype(np.float64), np.empty((6, 5), np.float64)),  # mixed dtypes
            ((a * 100).astype(np.int64), (b * 100).astype(np.int64), np.empty((6, 5), np.int64)),
        ]
        for x, y, out in cases:
            blas.gemm(x, y, out)
            assert np.allclose(out, x @ y, rtol=1e-2, atol=1e-2)
        sq = rng.standard_normal((5, 5)).astype(np.float32)
        expect = sq @ sq
        blas.gemm(sq, sq.copy(), sq)                                 # output overlaps an input
        assert np.allclose(sq, expect, rtol=1e-5, atol=1e-5)
    finally:
        blas.use("auto")


def test_unknown_backend_and_missing_mkl_are_clear_errors(monkeypatch):
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS='cuda': expected auto, mkl or numpy"):
        blas.use("cuda")
    monkeypatch.setattr(blas, "_mkl_library_path", lambda: None)
    with pytest.raises(blas.BlasError, match="mkl. package is not installed"):
        blas.use("mkl")
    blas.use("auto")
    assert blas.describe() == "NumPy's BLAS"
    monkeypatch.undo()
    blas.use("auto")


def test_a_read_only_output_is_refused_as_numpy_refuses_it(blas_backend):
    a, b = np.ones((4, 3), np.float32), np.ones((3, 5), np.float32)
    out = np.zeros((4, 5), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        blas.gemm(a, b, out)
    assert np.all(out == 0)


def test_a_broken_mkl_install_falls_back_or_is_a_clear_error(monkeypatch, tmp_path):
    bogus = tmp_path / "libmkl_rt.so.2"
    bogus.write_text("not a library")
    monkeypatch.setattr(blas, "_mkl_library_path", lambda: str(bogus))
    monkeypatch.setattr(blas, "_intel_cpu", lambda: True)
    with pytest.warns(UserWarning, match="cannot be used"):
        blas.use("auto")
    assert blas.describe() == "NumPy's BLAS"
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS=mkl but MKL at .*libmkl_rt.so.2 cannot be used"):
        blas.use("mkl")
    monkeypatch.undo()
    blas.use("auto")


@pytest.mark.parametrize("M,K,N", [(1, 5, 4), (5, 1, 4), (5, 4, 1), (1, 1, 1)])
def test_unit_dimensions_and_broadcast_rows(blas_backend, M, K, N):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    out = np.full((M, N), np.nan, np.float32)
    blas.gemm(a, b, out)
    assert np.allclose(out, a @ b, rtol=1e-5, atol=1e-6)
    a_rows = np.broadcast_to(a[:1], (M, K))                          # stride-0 rows
    blas.gemm(a_rows, b.T.copy().T, out)                              # and a transposed b
    assert np.allclose(out, a_rows @ b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bf16 inputs, fp32 output

def bf16_operand(rng, shape, how):
    """A bf16 (uint16) operand laid out `how`, and the float64 value of its bf16 numbers."""
    from distgpt import bf16

    x = operand(rng, shape, how, np.float32)
    bits = np.empty((x.shape[1], x.shape[0]), np.uint16).T if how.startswith("transposed") else None
    bits = bf16.to_bf16(x, bits)
    return bits, bf16.to_float32(bits).astype(np.float64)


@pytest.fixture(params=["onednn", "mkl"])
def bf16_library(request, monkeypatch):
    """Each bf16 gemm library in turn, its calls recorded as (transpose a, transpose b)."""
    if request.param == "mkl":
        require_mkl()
    elif "avx512f" not in blas.cpu_flags():
        pytest.skip("oneDNN's bf16 gemm needs AVX-512 (test_onednn_without_avx512_is_a_clear_error)")
    blas.use_bf16(request.param)
    calls = []
    lib = blas._bf16_gemm()
    monkeypatch.setattr(blas, "_bf16", lambda *args: (calls.append(args[:2]), lib(*args)))
    yield calls
    monkeypatch.undo()
    blas.use_bf16("auto")


@pytest.mark.parametrize("a_how", LAYOUTS)
@pytest.mark.parametrize("b_how", LAYOUTS)
@pytest.mark.parametrize("accumulate, alpha", [(False, 1.0), (True, 1.0), (False, 0.125), (True, -0.3)])
def test_bf16_gemm_equals_float64_product_of_the_rounded_inputs(bf16_library, a_how, b_how, accumulate,
                                                                alpha):
    rng = np.random.default_rng(3)
    M, K, N = 37, 53, 29
    (a, a64), (b, b64) = bf16_operand(rng, (M, K), a_how), bf16_operand(rng, (K, N), b_how)
    base = rng.standard_normal((M, N + 4)).astype(np.float32)
    out = base[:, 1:1 + N]
    expect = (out.astype(np.float64) if accumulate else 0) + alpha * (a64 @ b64)
    before = base.copy()
    blas.gemm_bf16(a, b, out, accumulate=accumulate, alpha=alpha)
    assert bf16_library == [(a_how.startswith("transposed"), b_how.startswith("transposed"))]
    # products of bf16 numbers are exact in float32: only the float32 sums round
    assert np.abs(out - expect).max() <= 1e-6 * K * np.abs(expect).max()
    assert np.array_equal(base[:, 0], before[:, 0]) and np.array_equal(base[:, N + 1:], before[:, N + 1:])


def test_bf16_gemm_odd_operands_and_empty_dimensions(bf16_library):
    rng = np.random.default_rng(4)
    a, a64 = bf16_operand(rng, (6, 8), "contiguous")
    b, b64 = bf16_operand(rng, (8, 5), "contiguous")
    out = np.empty((5, 6), np.float32).T                     # a transposed output: via a temporary
    blas.gemm_bf16(a[::2].repeat(2, axis=0), b, out)
    assert np.allclose(out, a64[::2].repeat(2, axis=0) @ b64, rtol=1e-5, atol=1e-5)
    blas.gemm_bf16(a[::2], b, out[:3])                        # a row stride the gemm cannot take: a copy
    assert np.allclose(out[:3], a64[::2] @ b64, rtol=1e-5, atol=1e-5)
    out = np.full((6, 5), 7.0, np.float32)
    blas.gemm_bf16(a[:, :0], b[:0], out, accumulate=True)     # K = 0: nothing added
    assert np.all(out == 7.0)
    blas.gemm_bf16(a[:, :0], b[:0], out)
    assert np.all(out == 0.0)
    with pytest.raises(TypeError, match="uint16"):
        blas.gemm_bf16(a.astype(np.float32), b, out)
    with pytest.raises(ValueError, match="gemm_bf16"):
        blas.gemm_bf16(a, b[:5], out)


def test_onednn_without_avx512_is_a_clear_error():
    """oneDNN held to AVX2 (DNNL_MAX_CPU_ISA, read when it loads) has no bf16 gemm: one clear error."""
    code = ("import numpy as np; from distgpt import blas; blas.use_bf16('onednn'); "
            "blas.gemm_bf16(np.ones((64, 8), np.uint16), np.ones((8, 4), np.uint16), "
            "np.empty((64, 4), np.float32))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "DNNL_MAX_CPU_ISA": "AVX2"})
    assert r.returncode == 1
    assert ("BlasError: oneDNN's dnnl_gemm_bf16bf16f32 failed on 64x8 @ 8x4: dnnl_status_t 3 (unimplemented: "
            "oneDNN's bf16 gemm needs AVX-512)") in r.stderr


def test_bf16_gemm_without_a_library_is_a_clear_error(monkeypatch):
    a, b, out = np.zeros((2, 3), np.uint16), np.zeros((3, 4), np.uint16), np.empty((2, 4), np.float32)
    monkeypatch.setattr(blas, "_load_bf16", lambda lib: f"{lib} is missing")
    blas.use_bf16("auto")
    try:
        with pytest.raises(blas.BlasError, match="no bf16 gemm: .*onednn is missing; mkl is missing"):
            blas.gemm_bf16(a, b, out)
    finally:
        monkeypatch.undo()
        blas.use_bf16("auto")
