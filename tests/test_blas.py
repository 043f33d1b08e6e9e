"""The matmul libraries. blas.gemm: MKL through ctypes (when the mkl package is installed) against
NumPy's matmul, on the operand layouts ops passes it (row slices, column slices, transposed views)
and the ones it must refuse (falling back to NumPy); gemm16.gemm_bf16 likewise, through oneDNN and
MKL. Which library a process takes: the choosers' rules on pretended CPUs and installs, the choice
made once per process (use, configure) from the DISTGPT_* switches; the CPU from /proc/cpuinfo.

Every test that changes the process's choice puts the one before back (use returns it)."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from distgpt import blas, cpu, gemm16, native
from distgpt.cpu import AMD, INTEL, Cpu

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


def recording(choice: blas.Choice, calls: list) -> blas.Choice:
    """The choice with each of its cblas gemms recording its arguments before it runs."""
    def spy(fn):
        return lambda *args: (calls.append(args), fn(*args))
    return dataclasses.replace(choice, gemms={t: spy(fn) for t, fn in choice.gemms.items()})


@pytest.fixture(params=["numpy", "mkl"])
def gemm_calls(request):
    """The process's fp32 gemm: NumPy's BLAS (yields None), then MKL with its calls recorded (yields them)."""
    if request.param == "numpy":
        previous, calls = blas.use("numpy"), None
    else:
        require_mkl()
        calls = []
        previous = blas.use(recording(blas.load("mkl"), calls))
    yield calls
    blas.use(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_how", LAYOUTS)
@pytest.mark.parametrize("b_how", LAYOUTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_matches_numpy_on_every_layout(gemm_calls, dtype, a_how, b_how, accumulate):
    rng = np.random.default_rng(0)
    M, K, N = 37, 53, 29
    a, b = operand(rng, (M, K), a_how, dtype), operand(rng, (K, N), b_how, dtype)
    base = rng.standard_normal((M, N + 4)).astype(dtype)
    out = base[:, 1:1 + N]                                   # a strided output view
    expect = (out.astype(np.float64) if accumulate else 0) + a.astype(np.float64) @ b.astype(np.float64)
    before = base.copy()
    blas.gemm(a, b, out, accumulate=accumulate)
    if gemm_calls is not None:                  # MKL itself must take every one of these layouts
        flag = {True: native.TRANS, False: native.NO_TRANS}
        assert [c[1:3] for c in gemm_calls] == [(flag[a_how.startswith("transposed")],
                                                 flag[b_how.startswith("transposed")])]
    # float32 sums of K=53 products of unit normals: relative error a few 1e-7 of the largest entry
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.abs(out - expect).max() <= tol * np.abs(expect).max()
    # the columns around the view are untouched
    assert np.array_equal(base[:, 0], before[:, 0]) and np.array_equal(base[:, N + 1:], before[:, N + 1:])


def test_mkl_actually_runs_when_chosen():
    require_mkl()
    calls = []
    previous = blas.use(recording(blas.load("mkl"), calls))
    try:
        rows = blas.SMALL_M + 1
        a, b = np.ones((rows, 3), np.float32), np.ones((3, 5), np.float32)
        out = np.empty((rows, 5), np.float32)
        blas.gemm(a, b, out)
        assert [c[3:6] for c in calls] == [(rows, 5, 3)] and np.all(out == 3)
        assert blas.describe().startswith("MKL ") and blas.using_mkl()
        # a few rows (decoding) go to NumPy's BLAS, which streams the weights faster there
        few = np.empty((blas.SMALL_M, 5), np.float32)
        blas.gemm(a[: blas.SMALL_M], b, few)
        assert len(calls) == 1 and np.all(few == 3)
    finally:
        blas.use(previous)


def test_unsupported_operands_fall_back_to_numpy():
    require_mkl()
    calls = []
    previous = blas.use(recording(blas.load("mkl"), calls))
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
        assert calls == []                                           # none of them reached MKL
    finally:
        blas.use(previous)


def test_a_read_only_output_is_refused_as_numpy_refuses_it(blas_backend):
    a, b = np.ones((4, 3), np.float32), np.ones((3, 5), np.float32)
    out = np.zeros((4, 5), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        blas.gemm(a, b, out)
    assert np.all(out == 0)


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


# ----------------------------------------------------------------------------- which fp32 library

XEON = Cpu(INTEL, "Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
EPYC = Cpu(AMD, "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))
OLD_INTEL = Cpu(INTEL, "Intel Core", frozenset({"avx2"}))
OLD_AMD = Cpu(AMD, "AMD Ryzen", frozenset({"avx2"}))


@pytest.mark.parametrize("name, on, mkl_path, library", [
    ("auto", XEON, "/x/libmkl_rt.so.2", "mkl"),        # Intel with MKL installed: MKL
    ("auto", OLD_INTEL, "/x/libmkl_rt.so.2", "mkl"),
    ("auto", EPYC, "/x/libmkl_rt.so.2", "numpy"),      # AMD: MKL may pick slower kernels there
    ("auto", XEON, None, "numpy"),                     # not installed
    ("mkl", EPYC, "/x/libmkl_rt.so.2", "mkl"),         # named: taken on any CPU
    ("numpy", XEON, "/x/libmkl_rt.so.2", "numpy"),
])
def test_fp32_library_rule(name, on, mkl_path, library):
    assert blas.choose(name, on, mkl_path) == library


def test_unknown_fp32_library_and_missing_mkl_are_clear_errors():
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS='cuda': expected auto, mkl or numpy"):
        blas.choose("cuda", XEON, "/x/libmkl_rt.so.2")
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS=mkl but the `mkl` package is not installed"):
        blas.choose("mkl", XEON, None)
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS=mkl but the `mkl` package is not installed"):
        blas.load("mkl", mkl_path=None)
    assert blas.load("auto", cpu=XEON, mkl_path=None).description == "NumPy's BLAS"


def test_a_broken_mkl_install_falls_back_or_is_a_clear_error(tmp_path):
    bogus = tmp_path / "libmkl_rt.so.2"
    bogus.write_text("not a library")
    with pytest.warns(UserWarning, match="cannot be used"):
        choice = blas.load("auto", cpu=XEON, mkl_path=str(bogus))
    assert choice.library == "numpy" and choice.description == "NumPy's BLAS" and not choice.gemms
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS=mkl but MKL at .*libmkl_rt.so.2 cannot be used"):
        blas.load("mkl", mkl_path=str(bogus))


def test_the_fp32_choice_is_made_once_from_distgpt_blas(monkeypatch):
    """Unchosen (use(None)), the first configure() reads DISTGPT_BLAS; later changes to the variable
    are not seen until use() chooses again."""
    require_mkl()
    previous = blas.use(None)
    try:
        monkeypatch.setenv("DISTGPT_BLAS", "mkl")
        first = blas.configure()
        assert first.asked == "mkl" and first.library == "mkl" and blas.using_mkl()
        monkeypatch.setenv("DISTGPT_BLAS", "numpy")
        assert blas.configure() is first and blas.describe().startswith("MKL ")
        assert blas.use("numpy") is first
        assert blas.describe() == "NumPy's BLAS" and not blas.using_mkl()
    finally:
        blas.use(previous)


def test_a_bad_distgpt_blas_is_a_one_line_blas_error(monkeypatch):
    monkeypatch.setenv("DISTGPT_BLAS", "cuda")
    with pytest.raises(blas.BlasError, match="DISTGPT_BLAS='cuda': expected one of auto, numpy, mkl") as exc:
        blas.load()
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- which bf16 library

class FakeGemm:
    """A bf16 gemm library that loaded (for the rule, only its name matters)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args):
        raise AssertionError("the rule tests never multiply")


ONEDNN, MKL = FakeGemm("oneDNN 9.9 dnnl_gemm_bf16bf16f32"), FakeGemm("MKL 9999 cblas_gemm_bf16bf16f32")
BOTH = {"onednn": ONEDNN, "mkl": MKL}
NO_ONEDNN = {"onednn": "oneDNN is not installed", "mkl": MKL}
NO_MKL = {"onednn": ONEDNN, "mkl": "MKL is not installed"}
NEITHER = {"onednn": "oneDNN is not installed", "mkl": "MKL is not installed"}
NO_INSTRUCTIONS = "this CPU has neither avx512_bf16 nor amx_bf16 (/proc/cpuinfo)"
MKL_NOT_FAST = ("MKL 9999 cblas_gemm_bf16bf16f32 is fast on Intel CPUs with AVX512-BF16 or AMX-BF16 only, "
                "and this CPU is not one (install onednn-cpu-gomp, or set DISTGPT_BF16_GEMM=onednn)")
XEON_NO_AMX = Cpu(INTEL, "Intel Xeon", frozenset({"avx512f", "avx512_bf16"}))


@pytest.mark.parametrize("name, on, libraries, library, fast, why_not", [
    ("auto", XEON, BOTH, "mkl", True, None),               # AMX: MKL's kernels use it
    ("auto", XEON, NO_MKL, "onednn", True, None),
    ("auto", XEON_NO_AMX, BOTH, "onednn", True, None),     # AVX512-BF16 alone: oneDNN first
    ("auto", XEON_NO_AMX, NO_ONEDNN, "mkl", True, None),   # ... MKL uses it on Intel
    ("auto", EPYC, BOTH, "onednn", True, None),
    ("auto", EPYC, NO_ONEDNN, "mkl", False, MKL_NOT_FAST),  # MKL's bf16 on AMD: no faster than sgemm
    ("auto", OLD_INTEL, BOTH, "mkl", False, NO_INSTRUCTIONS),  # nothing is fast: MKL (it emulates)
    ("auto", OLD_AMD, NO_MKL, "onednn", False, NO_INSTRUCTIONS),
    ("auto", EPYC, NEITHER, None, False,
     "bf16 matmuls need oneDNN or MKL: oneDNN is not installed; MKL is not installed"),
    ("onednn", XEON, BOTH, "onednn", True, None),          # named: taken, fast or not
    ("mkl", EPYC, BOTH, "mkl", False, MKL_NOT_FAST),
    ("mkl", OLD_AMD, NO_ONEDNN, "mkl", False, NO_INSTRUCTIONS),
])
def test_bf16_library_rule(name, on, libraries, library, fast, why_not):
    choice = gemm16.choose(name, on, libraries, emulated=False)
    assert (choice.library, choice.fast, choice.why_not) == (library, fast, why_not)
    assert choice.gemm is (libraries[library] if library else None)
    assert choice.fast_flags == tuple(f for f in ("avx512_bf16", "amx_bf16") if f in on.flags)
    emulated = gemm16.choose(name, on, libraries, emulated=True)   # accepts what loaded, fast or not
    assert (emulated.library, emulated.fast) == (library, fast)
    assert emulated.why_not == (why_not if library is None else None)


def test_bf16_run_header_says_which_library_and_whether_it_is_emulated():
    assert gemm16.choose("auto", EPYC, BOTH, emulated=False).describe() == ONEDNN.name
    assert gemm16.choose("mkl", EPYC, BOTH, emulated=True).describe() == (
        f"{MKL.name} (not fast on this CPU: DISTGPT_BF16_EMULATED=1)")
    assert gemm16.choose("auto", EPYC, NEITHER, emulated=True).describe() == "no bf16 gemm"


def test_unknown_or_missing_bf16_library_is_a_clear_error():
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_GEMM='amx': expected auto, onednn, mkl"):
        gemm16.choose("amx", XEON, BOTH, emulated=False)
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_GEMM=onednn but oneDNN is not installed"):
        gemm16.choose("onednn", XEON, NO_ONEDNN, emulated=False)


@pytest.mark.parametrize("name, on, loaded", [
    ("auto", XEON, ["mkl", "onednn"]),
    ("auto", EPYC, ["onednn", "mkl"]),
    ("auto", OLD_INTEL, ["mkl", "onednn"]),
    ("mkl", EPYC, ["mkl"]),                                 # a named library alone: the other is not loaded
    ("onednn", XEON, ["onednn"]),
    ("amx", XEON, []),
])
def test_bf16_load_loads_what_the_rule_needs(name, on, loaded):
    calls = []

    def loader(lib):
        calls.append(lib)
        return BOTH[lib]
    try:
        gemm16.load(name, cpu=on, emulated=False, loader=loader)
    except blas.BlasError:
        assert name == "amx"
    assert calls == loaded


def test_bf16_switches_are_read_when_loading(monkeypatch):
    monkeypatch.setenv("DISTGPT_BF16_GEMM", "mkl")
    monkeypatch.setenv("DISTGPT_BF16_EMULATED", "1")
    choice = gemm16.load(cpu=EPYC, loader=BOTH.get)
    assert (choice.asked, choice.library, choice.why_not) == ("mkl", "mkl", None)
    monkeypatch.setenv("DISTGPT_BF16_EMULATED", "yes")
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_EMULATED='yes': expected one of 0, 1"):
        gemm16.load(cpu=EPYC, loader=BOTH.get)


def test_the_bf16_choice_is_made_once_and_put_back():
    """use() sets the process's bf16 gemm and returns the one before; configure() keeps it."""
    mine = gemm16.choose("auto", EPYC, NEITHER, emulated=False)
    previous = gemm16.use(mine)
    try:
        assert gemm16.configure() is mine
        assert gemm16.configure().why_not == mine.why_not and gemm16.describe() == "no bf16 gemm"
        # the names from before the split answer from the same choice
        assert gemm16.configure().why_not == mine.why_not and gemm16.describe() == "no bf16 gemm"
    finally:
        assert gemm16.use(previous) is mine
    assert gemm16.configure() is not mine


# ----------------------------------------------------------------------------- bf16 inputs, fp32 output

def bf16_operand(rng, shape, how):
    """A bf16 (uint16) operand laid out `how`, and the float64 value of its bf16 numbers."""
    from distgpt import bf16

    x = operand(rng, shape, how, np.float32)
    bits = np.empty((x.shape[1], x.shape[0]), np.uint16).T if how.startswith("transposed") else None
    bits = bf16.to_bf16(x, bits)
    return bits, bf16.to_float32(bits).astype(np.float64)


class RecordingGemm:
    """A bf16 gemm recording (transpose a, transpose b) of each call before making it."""

    def __init__(self, gemm: gemm16.Bf16Gemm):
        self.gemm, self.name, self.calls = gemm, gemm.name, []

    def __call__(self, *args):
        self.calls.append(args[:2])
        self.gemm(*args)


@pytest.fixture(params=["onednn", "mkl"])
def bf16_library(request):
    """Each bf16 gemm library in turn as the process's (fast here or not), its calls recorded."""
    if request.param == "mkl":
        require_mkl()
    elif "avx512f" not in cpu.flags():
        pytest.skip("oneDNN's bf16 gemm needs AVX-512 (test_onednn_without_avx512_is_a_clear_error)")
    choice = gemm16.load(request.param, emulated=True)
    spy = RecordingGemm(choice.gemm)
    previous = gemm16.use(dataclasses.replace(choice, gemm=spy))
    yield spy.calls
    gemm16.use(previous)


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
    gemm16.gemm_bf16(a, b, out, accumulate=accumulate, alpha=alpha)
    assert bf16_library == [(a_how.startswith("transposed"), b_how.startswith("transposed"))]
    # products of bf16 numbers are exact in float32: only the float32 sums round
    assert np.abs(out - expect).max() <= 1e-6 * K * np.abs(expect).max()
    assert np.array_equal(base[:, 0], before[:, 0]) and np.array_equal(base[:, N + 1:], before[:, N + 1:])


def test_bf16_gemm_odd_operands_and_empty_dimensions(bf16_library):
    rng = np.random.default_rng(4)
    a, a64 = bf16_operand(rng, (6, 8), "contiguous")
    b, b64 = bf16_operand(rng, (8, 5), "contiguous")
    out = np.empty((5, 6), np.float32).T                     # a transposed output: via a temporary
    gemm16.gemm_bf16(a[::2].repeat(2, axis=0), b, out)
    assert np.allclose(out, a64[::2].repeat(2, axis=0) @ b64, rtol=1e-5, atol=1e-5)
    gemm16.gemm_bf16(a[::2], b, out[:3])                        # a row stride the gemm cannot take: a copy
    assert np.allclose(out[:3], a64[::2] @ b64, rtol=1e-5, atol=1e-5)
    out = np.full((6, 5), 7.0, np.float32)
    gemm16.gemm_bf16(a[:, :0], b[:0], out, accumulate=True)     # K = 0: nothing added
    assert np.all(out == 7.0)
    gemm16.gemm_bf16(a[:, :0], b[:0], out)
    assert np.all(out == 0.0)
    with pytest.raises(TypeError, match="uint16"):
        gemm16.gemm_bf16(a.astype(np.float32), b, out)
    with pytest.raises(ValueError, match="gemm_bf16"):
        gemm16.gemm_bf16(a, b[:5], out)


def test_onednn_without_avx512_is_a_clear_error():
    """oneDNN held to AVX2 (DNNL_MAX_CPU_ISA, read when it loads) has no bf16 gemm: one clear error."""
    code = ("import numpy as np; from distgpt import gemm16; gemm16.use('onednn'); "
            "gemm16.gemm_bf16(np.ones((64, 8), np.uint16), np.ones((8, 4), np.uint16), "
            "np.empty((64, 4), np.float32))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "DNNL_MAX_CPU_ISA": "AVX2"})
    assert r.returncode == 1
    assert ("BlasError: oneDNN's dnnl_gemm_bf16bf16f32 failed on 64x8 @ 8x4: dnnl_status_t 3 (unimplemented: "
            "oneDNN's bf16 gemm needs AVX-512)") in r.stderr


def test_bf16_gemm_without_a_library_is_a_clear_error():
    a, b, out = np.zeros((2, 3), np.uint16), np.zeros((3, 4), np.uint16), np.empty((2, 4), np.float32)
    previous = gemm16.use(gemm16.load("auto", cpu=EPYC, loader=lambda lib: f"{lib} is missing"))
    try:
        with pytest.raises(blas.BlasError, match="^no bf16 gemm: bf16 matmuls need oneDNN or MKL: onednn is "
                                                 "missing; mkl is missing$"):
            gemm16.gemm_bf16(a, b, out)
    finally:
        gemm16.use(previous)


# ----------------------------------------------------------------------------- the CPU

INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2
"""
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"


def test_cpuinfo_gives_the_first_processors_vendor_model_and_flags():
    xeon = cpu.parse(INTEL_CPUINFO)
    assert xeon == Cpu(INTEL, "Intel(R) Xeon(R) Platinum 8480+",
                       frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    assert xeon.intel and not cpu.parse(INTEL_CPUINFO.replace(INTEL, AMD)).intel
    assert cpu.parse(ARM_CPUINFO) == Cpu()                  # no x86 flags: nothing bf16-fast is assumed
    assert cpu.parse("") == Cpu()


def test_this_cpu_is_read_once():
    assert cpu.this_cpu() is cpu.this_cpu() and cpu.flags() is cpu.this_cpu().flags
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert "sse2" in cpu.flags() and cpu.this_cpu().vendor
