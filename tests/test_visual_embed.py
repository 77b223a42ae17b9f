"""Tests of the fused probabilistic visual embedding (kernels/).

Accuracy is checked against the float64 reference (kernels/reference.py) as a norm-wise
relative error  ||out - ref|| / ||ref||  over the whole [N, D] output:
* fp32 paths: <= 1e-5. fp32 unit roundoff is 6e-8; LayerNorm, softmax and a dot product over Vh
  terms each add a few ulps (measured ~3e-7), so 1e-5 has >10x margin yet catches any real bug
  (a wrong mask, a missing row or column, a wrong max shift all give >= 1e-3).
* bf16/fp16 inputs: cut-cross-entropy style, bounded by the error of the same-dtype torch
  computation (vLLM's unfused path) on the same inputs: err(ours) <= 1.0 * err(torch), where
  "ours" is the kernel's fp32 result before its final rounding (the kernel can store into an
  fp32 buffer). The kernel rounds a subset of what torch rounds (unnormalized probabilities, but
  not the LayerNorm output nor a normalized, possibly subnormal, probability), so it must not be
  worse; measured ratios are 0.3-0.75. The output in the input dtype must then be that result
  rounded: within one unit roundoff (2^-8 bf16, 2^-11 fp16), elementwise and so norm-wise.
  (Comparing rounded outputs directly is a coin toss on small outputs: one rounding per element
  is most of both errors.) The CPU path runs torch's very ops, so it is compared with them.
Inputs are fresh random draws each run; the seed is printed in failure messages.

Triton kernels are tested on CPU under the Triton interpreter. TRITON_INTERPRET must be set
before the kernel module is imported (triton.jit picks the interpreter at decoration time), other
test modules may import it first, and it must not leak into the CUDA tests, so the `test_interp_*`
tests run in a child pytest process started with TRITON_INTERPRET=1
(`test_triton_kernels_under_interpreter`); in that child they run directly.
"""
import os
import subprocess
import sys
import threading

import pytest
import torch

from ovis_vllm import kernels
from ovis_vllm.kernels import triton_kernels, vocab_parallel
from ovis_vllm.kernels.reference import row_stats_reference, visual_embedding_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = triton_kernels.INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process"
                            " of test_triton_kernels_under_interpreter")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FP32_TOL = 1e-5
UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}
EPS = 1e-5
# Ragged shapes: N, Vh, D are multiples of no block size; V = Vh + 5 indicator rows.
SHAPES = [(37, 301, 45), (1, 97, 16), (45, 520, 83)]


def make_inputs(n, vh, d, dtype, device="cpu", seed=None, offset=0.5, extra_rows=5):
    """Random Ovis-like inputs with a fresh seed (returned for failure messages). The LN weight
    is spread (0.5..2.5) so the softmax is neither flat nor one-hot; the VTE's indicator rows
    are set huge so that reading them by mistake would show."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vh, generator=g) * 3 + offset
    w = 0.5 + 2 * torch.rand(vh, generator=g)
    b = 0.5 * torch.randn(vh, generator=g)
    vte = 0.05 * torch.randn(vh + extra_rows, d, generator=g)
    vte[vh:] = 1e4
    cast = lambda t: t.to(device=device, dtype=dtype)
    return (cast(logits), cast(w), cast(b), cast(vte)), seed


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_accuracy(out, args, seed, eps=EPS):
    """Documented tolerance for out = f(*args) against the fp64 reference. For bf16/fp16 inputs
    `out` is the kernel's fp32 result before its final rounding (see `run_kernel`): the output
    rounding alone is random noise of up to a unit roundoff, which on small outputs would make
    the comparison with torch's error a coin toss; it is checked separately."""
    assert torch.isfinite(out).all(), f"non-finite output (seed {seed})"
    ref = visual_embedding_reference(*args, eps)
    err = rel_err(out, ref)
    if args[3].dtype == torch.float32:
        assert err <= FP32_TOL, f"rel err {err:.3g} > {FP32_TOL} (seed {seed})"
    else:
        # Both the kernel (tensor-core A tile) and torch round the probabilities to the input
        # dtype before the product, so their errors are the same size but independent draws:
        # on small outputs (N=1, D=16) the kernel's can exceed torch's by chance (seen: 1.6x).
        # Bound: twice torch's error, floored at one unit roundoff. Real bugs are O(1) errors.
        torch_err = rel_err(kernels.visual_embedding_unfused(*args, eps), ref)
        bound = max(2 * torch_err, UNIT_ROUNDOFF[args[3].dtype])
        assert err <= bound, f"rel err {err:.3g} > {bound:.3g} (torch {torch_err:.3g}, seed {seed})"


def run_ranks(fn, ranks):
    """fn(rank, all_gather, all_reduce) on `ranks` threads joined by in-process collectives,
    as tensor-parallel ranks run it; returns the ranks' results. One rank computes at a time
    (the lock is let go only inside a collective): the Triton interpreter is not thread-safe."""
    barrier, lock = threading.Barrier(ranks), threading.Lock()
    slots, results, errors = [None] * ranks, [None] * ranks, []

    def collective(rank, tensor, merge):
        slots[rank] = tensor
        lock.release()
        try:
            barrier.wait()
            merged = merge(list(slots))
            barrier.wait()  # all have read before any slot is reused
        finally:
            lock.acquire()
        return merged

    def run(rank):
        with lock:
            try:
                results[rank] = fn(rank, lambda t: collective(rank, t, lambda ts: torch.cat(ts, -1)),
                                   lambda t: collective(rank, t, lambda ts: sum(ts)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)
                barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def combine_vocabulary_slices(x, w, b, vte, slices, chunk_mb=kernels.DEFAULT_CHUNK_MB):
    """What tensor-parallel ranks holding these vocabulary slices compute, through the very
    function serving calls: (the [N, D] fp32 embedding, checked equal on every rank; the
    merged LayerNorm statistics of the row)."""
    widths = [s.stop - s.start for s in slices]
    outs = run_ranks(lambda rank, all_gather, all_reduce: kernels.vocab_parallel_visual_embedding(
        x[:, slices[rank]], w[slices[rank]], b[slices[rank]], vte[slices[rank]], EPS,
        widths=widths, rank=rank, all_gather=all_gather, all_reduce=all_reduce,
        dtype=torch.float32, chunk_mb=chunk_mb), len(slices))
    assert all(torch.equal(o, outs[0]) for o in outs)
    norm = vocab_parallel.combine_ln_stats(
        [(width, vocab_parallel.ln_partial_stats(x[:, s])) for width, s in zip(widths, slices)], EPS)
    return outs[0], norm


def run_kernel(args, seed, **kwargs):
    """Triton path into NaN-poisoned outputs: in the inputs' dtype and in fp32. Checks the first
    is the second rounded (round to nearest: within one unit roundoff per element, hence
    norm-wise) and the fp32 one against the reference; returns the first."""
    n, d, dtype = args[0].shape[0], args[3].shape[1], args[3].dtype
    out = torch.full((n, d), float("nan"), dtype=dtype, device=args[0].device)
    assert kernels.visual_embedding_triton(*args, EPS, out=out, **kwargs) is out
    out32 = out
    if dtype != torch.float32:
        out32 = torch.full((n, d), float("nan"), device=args[0].device)
        kernels.visual_embedding_triton(*args, EPS, out=out32, **kwargs)
    assert torch.isfinite(out).all(), f"non-finite output (seed {seed})"
    # The interpreter converts fp32 -> bf16 by truncation (cast_impl in triton/runtime/
    # interpreter.py), up to one ulp = 2 unit roundoffs; compiled Triton rounds to nearest.
    tol = UNIT_ROUNDOFF[dtype] * (2 if INTERPRETED and dtype == torch.bfloat16 else 1)
    assert rel_err(out, out32.double()) <= tol, f"seed {seed}"
    check_accuracy(out32, args, seed)
    return out


# ---------------------------------------------------------------------------------------------
# CPU paths (run in-process)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 7, None])
def test_chunked_matches_reference(shape, dtype, rows):
    args, seed = make_inputs(*shape, dtype)
    out = kernels.visual_embedding_chunked(*args, EPS, rows=rows)
    assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
    if dtype == torch.float32:
        check_accuracy(out, args, seed)
    # Same ops as the unfused path (vLLM's, the "same-dtype torch" baseline) per chunk: equal up
    # to matmul rounding. Low precision: the GEMMs accumulate in fp32, so at most an output
    # rounding flip here and there (<= unit roundoff norm-wise; measured: bit-identical).
    # fp32: another summation order over <= 1000 terms, ~sqrt(K) * 6e-8 = 2e-6 (measured 5e-7).
    unfused = kernels.visual_embedding_unfused(*args, EPS)
    tol = 2e-6 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    assert rel_err(out, unfused.double()) <= tol, f"seed {seed}"


def packable(dtype):
    """`dtype` as a parameter, skipped where vLLM's oneDNN GEMM does not take it on this CPU (bf16
    without AVX-512: serving then runs torch.matmul, the unpacked chunked path tested above)."""
    why = kernels.onednn_unavailable(dtype)
    return pytest.param(dtype, marks=pytest.mark.skipif(why is not None, reason=str(why)))


PACKABLE_DTYPES = [packable(torch.float32), packable(torch.bfloat16)]


@pytest.mark.parametrize("dtype", PACKABLE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 7, None])
def test_chunked_with_packed_vte(shape, dtype, rows):
    """The serving path on CPU: VTE softmax rows packed for oneDNN once (PackedMatrix)."""
    args, seed = make_inputs(*shape, dtype)
    x, w, b, vte = args
    table = kernels.PackedMatrix(vte[: shape[1]])
    out = kernels.visual_embedding_chunked(x, w, b, table, EPS, rows=rows)
    assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
    assert torch.equal(kernels.visual_embedding(x, w, b, table, EPS),
                       kernels.visual_embedding_chunked(x, w, b, table, EPS))
    if dtype == torch.float32:
        check_accuracy(out, args, seed)
    # The same products as torch.matmul up to summation order (bf16: fp32 accumulation, then
    # one rounding; measured bit-identical), so the same bounds as the unpacked chunked path.
    unpacked = kernels.visual_embedding_chunked(*args, EPS, rows=rows)
    tol = 2e-6 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    assert rel_err(out, unpacked.double()) <= tol, f"seed {seed}"


@pytest.mark.parametrize("dtype", PACKABLE_DTYPES)
def test_packed_matrix_matmul(dtype):
    """a @ B for 2-D and 3-D, non-contiguous a, into a poisoned row block of a bigger output;
    against fp64."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    b = torch.randn(301, 45, generator=g).to(dtype)
    packed_b = kernels.PackedMatrix(b)
    assert packed_b.shape == (301, 45) and packed_b.dtype == dtype
    a = torch.randn(2, 301, 37, generator=g).to(dtype).transpose(1, 2)  # [2, 37, 301], strided
    ref = a.double() @ b.double()
    out = packed_b.matmul(a)
    assert out.shape == (2, 37, 45) and out.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    assert rel_err(out, ref) <= tol
    big = torch.full((50, 45), float("nan"), dtype=dtype)
    packed_b.matmul(a[0], out=big[5:42])
    assert torch.equal(big[5:42], out[0])
    assert big[:5].isnan().all() and big[42:].isnan().all()
    with pytest.raises(ValueError, match="packed VTE has 301 rows"):
        kernels.visual_embedding_chunked(torch.randn(3, 300).to(dtype), torch.ones(300).to(dtype),
                                    torch.zeros(300).to(dtype), packed_b, EPS)
    assert not kernels.PackedMatrix.supported(b.half())


def test_chunk_rows_budget():
    assert kernels.chunk_rows(65531, torch.bfloat16) == 512  # 64 MiB / (65531 * 2 bytes)
    assert kernels.chunk_rows(65531, torch.float32) == 256
    assert kernels.chunk_rows(301, torch.float32, chunk_mb=0.01) == 8
    assert kernels.chunk_rows(301, torch.float32, chunk_mb=0) == 1
    args, seed = make_inputs(37, 301, 45, torch.float32)
    check_accuracy(kernels.visual_embedding(*args, EPS, chunk_mb=0.01), args, seed)


def test_public_api_cpu_dispatch():
    args, seed = make_inputs(37, 301, 45, torch.float32)
    out = kernels.visual_embedding(*args, EPS)
    assert torch.equal(out, kernels.visual_embedding_chunked(*args, EPS))
    assert torch.equal(kernels.visual_embedding(*args, EPS, impl="unfused"),
                       kernels.visual_embedding_unfused(*args, EPS))
    with pytest.raises(ValueError, match="implementation 'bogus'"):
        kernels.visual_embedding(*args, EPS, impl="bogus")


def test_strided_inputs_cpu():
    (x, w, b, vte), seed = make_inputs(37, 301, 45, torch.float32)
    xt = x.t().contiguous().t()  # column-major logits
    vt = vte.t().contiguous().t()
    w2 = torch.stack([w, w], 1)[:, 0]  # stride 2
    out = kernels.visual_embedding(xt, w2, b, vt, EPS)
    check_accuracy(out, (xt, w2, b, vt), seed)


def test_empty_rows():
    (x, w, b, vte), _ = make_inputs(3, 50, 16, torch.float32)
    assert kernels.visual_embedding(x[:0], w, b, vte, EPS).shape == (0, 16)


def test_validation_errors():
    (x, w, b, vte), _ = make_inputs(4, 50, 16, torch.float32)
    cases = [
        ((x[0], w, b, vte), "logits must be"),
        ((x, w[:-1], b, vte), "ln_weight and ln_bias"),
        ((x, w, b[:, None], vte), "ln_weight and ln_bias"),
        ((x, w, b, vte[:49]), "V >= Vh"),
        ((x, w, b, vte[0]), "vte must be"),
        ((x.double(), w, b, vte), "dtype"),
        ((x, w, b, vte.to(torch.int32)), "dtype"),
        ((x[:, :0], w[:0], b[:0], vte), "at least one column"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            kernels.visual_embedding(*args, EPS)
    if not triton_kernels.HAS_TRITON or INTERPRETED:
        return
    with pytest.raises(ValueError, match="CUDA"):  # no silent interpreter fallback on CPU
        kernels.visual_embedding_triton(x, w, b, vte, EPS)


def test_custom_op_opcheck():
    args, _ = make_inputs(5, 40, 16, torch.float32)
    for impl in ("auto", "unfused"):
        torch.library.opcheck(torch.ops.ovis.visual_embedding.default, (*args, EPS, impl, 64.0))


def test_custom_op_torch_compile_fullgraph():
    args, seed = make_inputs(9, 130, 24, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(kernels.visual_embedding, fullgraph=True, dynamic=False)
    out = compiled(*args, EPS)
    assert torch.equal(out, kernels.visual_embedding(*args, EPS)), f"seed {seed}"


def _compile_for_sm90(kernel, ptr_types, constexprs, num_warps, num_stages=3):
    """Ahead-of-time compile through PTX and ptxas (shipped with triton) for an H100: no GPU
    needed. Ints equal to 1 and 16-divisible ones are specialized as a JIT launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if isinstance(kernel, triton.runtime.Heuristics):
        kernel = kernel.fn  # the JITFunction under triton.heuristics
    names = kernel.arg_names
    constexprs = dict(constexprs, **{n: 1 for n in ("stride_xv", "stride_w", "stride_b",
                                                   "stride_ed", "stride_od") if n in names})
    signature = {n: ptr_types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    if "eps" in names:
        signature["eps"] = "fp32"
    div16 = [n for n in names if n.endswith("_ptr") or n in ("D", "stride_ev", "stride_om")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.skipif(INTERPRETED or not triton_kernels.HAS_TRITON, reason="needs the compiler, not the"
                    " interpreter")
def test_kernels_compile_for_sm90():
    """Catches what the interpreter does not check (constexpr-only globals, types, shared
    memory over the 227 KiB an H100 block may use) on machines without a GPU."""
    h100_smem = 227 * 1024
    base = {"norm_ptr": "*fp32", "sm_ptr": "*fp32"}
    for dtype, normalize in ((torch.bfloat16, True), (torch.float16, False), (torch.float32, True)):
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        cfg = triton_kernels.product_blocks(dtype)
        ptrs = dict(base, **{n: f"*{dt}" for n in ("x_ptr", "w_ptr", "b_ptr", "vte_ptr")},
                    out_ptr=f"*{dt}" if normalize else "*fp32")
        k = _compile_for_sm90(triton_kernels._product_kernel, ptrs,
                              dict(NORMALIZE=normalize, DOT_FP32=dtype == torch.float32,
                                   **{n: cfg.pop(n) for n in ("BLOCK_M", "BLOCK_V", "BLOCK_D")}),
                              **cfg)
        assert k.metadata.shared <= h100_smem, (dt, k.metadata.shared)
    stats = triton_kernels.stats_config()
    blocks = dict(BLOCK_M=stats["BLOCK_M"], BLOCK_V=stats["BLOCK_V"])
    _compile_for_sm90(triton_kernels._ln_moments_kernel, {"x_ptr": "*bf16", "moments_ptr": "*fp32"},
                      blocks, stats["num_warps"])
    ptrs = dict(base, **{n: "*bf16" for n in ("x_ptr", "w_ptr", "b_ptr")})
    for given in (True, False):  # the whole row, a vocabulary slice given the row's (mean, rstd)
        absent = "norm_out_ptr" if given else "norm_in_ptr"  # None: a compile-time constant
        _compile_for_sm90(triton_kernels._row_stats_kernel,
                          dict(ptrs, norm_in_ptr="*fp32", norm_out_ptr="*fp32"),
                          dict(blocks, NORM_GIVEN=given, **{absent: None}), stats["num_warps"])


@pytest.mark.skipif(INTERPRETED or not triton_kernels.HAS_TRITON, reason="the child itself / no triton")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp_",
         os.path.abspath(__file__)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (child process, see module docstring)
# ---------------------------------------------------------------------------------------------
CONFIGS = [
    None,  # the interpreter default (16 x 64 x 32 blocks)
    dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=16, num_warps=1, num_stages=1, SPLIT=3),  # split-K
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_interp_kernel_matches_reference(shape, dtype, config):
    args, seed = make_inputs(*shape, dtype)
    run_kernel(args, seed, config=config)


@interp
def test_interp_strided_inputs_and_output():
    (x, w, b, vte), seed = make_inputs(37, 301, 45, torch.float32)
    xt, vt = x.t().contiguous().t(), vte.t().contiguous().t()
    w2 = torch.stack([w, w], 1)[:, 0]
    big = torch.full((45, 80), float("nan"))
    out = big[:, 3:40].t()  # [37, 45] view with strides (1, 80)
    kernels.visual_embedding_triton(xt, w2, b, vt, EPS, out=out)
    check_accuracy(out, (xt, w2, b, vt), seed)
    assert big[:, :3].isnan().all() and big[:, 40:].isnan().all()  # nothing written outside


@interp
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_interp_row_stats(offset):
    """Row statistics vs fp64; offset 1000 (|mean| >> std) is where a raw sum of squares in fp32
    loses the variance entirely (~30% error); the centred merge keeps it to ~1e-5."""
    (x, w, b, _), seed = make_inputs(37, 301, 16, torch.float32, offset=offset)
    norm, sm = triton_kernels.row_stats(x, w, b, EPS)
    ref = row_stats_reference(x, w, b, EPS)
    tol = 1e-5 if offset == 0 else 1e-3  # fp32 inputs near 1000 carry 6e-5 absolute error
    close = lambda a, r: ((a.double() - r).abs() / r.abs().clamp_min(1)).max().item() <= tol
    assert close(norm[:, 0], ref["mean"]) and close(norm[:, 1], ref["rstd"]), f"seed {seed}"
    assert close(sm[:, 0], ref["max"]) and close(sm[:, 1], ref["sumexp"]), f"seed {seed}"


@interp
@pytest.mark.parametrize("cuts", [[0, 150, 301], [0, 100, 211, 301], [0, 1, 300, 301]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_tensor_parallel_pieces(cuts, dtype):
    """Vocabulary slices (as TP ranks would hold) combined exactly equal the whole."""
    (x, w, b, vte), seed = make_inputs(37, 301, 45, dtype)
    slices = [slice(lo, hi) for lo, hi in zip(cuts, cuts[1:])]
    combined, norm = combine_vocabulary_slices(x, w, b, vte, slices)
    whole = kernels.visual_embedding_triton(x, w, b, vte, EPS, out=torch.empty(37, 45))
    # fp32: equal to rounding (1e-6). fp16: each slice rounds its unnormalized probabilities
    # relative to its own max, the whole run relative to the global one: equal up to fp16 unit
    # roundoff (2^-11, measured ~5e-6 norm-wise).
    tol = 1e-6 if dtype == torch.float32 else 2**-11
    assert rel_err(combined, whole.double()) <= tol, f"seed {seed}"
    check_accuracy(combined, (x, w, b, vte), seed)
    ref = row_stats_reference(x, w, b, EPS)
    assert torch.allclose(norm[:, 1].double(), ref["rstd"], rtol=1e-5), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cuts", [[0, 150, 301], [0, 1, 300, 301]])
def test_cpu_tensor_parallel_pieces(cuts, dtype):
    """The torch versions of the slice pieces (vLLM's CPU backend under tensor parallel), with
    chunks of a few rows, combined equal the fp64 reference."""
    (x, w, b, vte), seed = make_inputs(37, 301, 45, dtype)
    slices = [slice(lo, hi) for lo, hi in zip(cuts, cuts[1:])]
    combined, norm = combine_vocabulary_slices(x, w, b, vte, slices,
                                               chunk_mb=8 * 301 * 4 / 2**20)  # 8-row chunks
    assert torch.isfinite(combined).all()
    check_accuracy(combined, (x, w, b, vte), seed)
    ref = row_stats_reference(x, w, b, EPS)
    assert torch.allclose(norm[:, 1].double(), ref["rstd"], rtol=1e-5), f"seed {seed}"


@interp
def test_interp_public_api_forced_triton():
    args, seed = make_inputs(37, 301, 45, torch.float32)
    out = kernels.visual_embedding(*args, EPS, impl="triton")
    check_accuracy(out, args, seed)
    check_accuracy(kernels.visual_embedding(*args, EPS, impl="chunked"), args, seed)


# ---------------------------------------------------------------------------------------------
# CUDA (real compiler, real sizes); skipped without a GPU
# ---------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("n", [196, 1960])
def test_cuda_real_sizes_bf16(n):
    """Ovis1.6 sizes: Vh=65531, V=65536, D=3584, bf16; error bounded by torch bf16's."""
    args, seed = make_inputs(n, 65531, 3584, torch.bfloat16, device="cuda")
    out = run_kernel(args, seed)
    assert torch.equal(kernels.visual_embedding(*args, EPS), out)  # public API dispatches here


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(300, 4099, 200)])
def test_cuda_ragged(shape, dtype):
    args, seed = make_inputs(*shape, dtype, device="cuda")
    run_kernel(args, seed)


@cuda
def test_cuda_tensor_parallel_pieces():
    (x, w, b, vte), seed = make_inputs(300, 4099, 200, torch.bfloat16, device="cuda")
    combined, _ = combine_vocabulary_slices(x, w, b, vte, [slice(0, 1500), slice(1500, 4099)])
    check_accuracy(combined, (x, w, b, vte), seed)


@cuda
def test_cuda_graph_capture():
    args, seed = make_inputs(196, 4099, 200, torch.bfloat16, device="cuda")
    kernels.visual_embedding(*args, EPS)  # compile kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.visual_embedding(*args, EPS)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, kernels.visual_embedding(*args, EPS)), f"seed {seed}"
