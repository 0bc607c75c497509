"""The Mamba-1 selective scan on CPU as torch custom ops: a C loop compiled on first use, cached in a directory no one
else can write ($XDG_CACHE_HOME/hybrid-gpt) and loaded only if its SHA-256 matches the one stored beside it."""
import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import stat
import subprocess
import sys
import tempfile

import torch

# The same scan as one pass in C, the CPU analogue of mamba-ssm's CUDA kernel: the state of 32 channels stays in
# cache while t runs, so nothing of size (b, L, D, N) is ever written; backward recomputes the states from
# checkpoints kept every 64 steps. Measured 20-60x faster than chunked_scan or a per-step PyTorch loop.
SCAN_C = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
#define DB 32  /* channels per task */
#define K 64   /* steps between state checkpoints */
static int imin(int a, int b) { return a < b ? a : b; }

void scan_fwd(const float* x, const float* dt, const float* A, const float* B, const float* C, const float* h0,
              float* y, float* hchk, float* hT, int b, int L, int D, int N, int threads) {
  int nblk = (D + DB - 1) / DB, nchk = (L + K - 1) / K;
  #pragma omp parallel for collapse(2) num_threads(threads)
  for (int i = 0; i < b; i++) for (int j = 0; j < nblk; j++) {
    int d0 = j * DB, nd = imin(D, d0 + DB) - d0;
    float h[DB * N];
    for (int k = 0; k < nd * N; k++) h[k] = h0 ? h0[((long)i * D + d0) * N + k] : 0.f;
    for (int t = 0; t < L; t++) {
      if (t % K == 0) memcpy(hchk + (((long)i * nchk + t / K) * D + d0) * N, h, sizeof(float) * nd * N);
      long r = (long)i * L + t;
      const float *Bt = B + r * N, *Ct = C + r * N;
      for (int d = 0; d < nd; d++) {
        float dtv = dt[r * D + d0 + d], bx = dtv * x[r * D + d0 + d], acc = 0.f, *hd = h + d * N;
        const float* Ad = A + (long)(d0 + d) * N;
        #pragma omp simd reduction(+:acc)
        for (int n = 0; n < N; n++) { hd[n] = expf(dtv * Ad[n]) * hd[n] + bx * Bt[n]; acc += Ct[n] * hd[n]; }
        y[r * D + d0 + d] = acc;
      }
    }
    memcpy(hT + ((long)i * D + d0) * N, h, sizeof(float) * nd * N);
  }
}

/* dA (b, D, N) and dB, dC (b, D/DB, L, N) are partial sums the caller zeroes and reduces. */
void scan_bwd(const float* x, const float* dt, const float* A, const float* B, const float* C, const float* hchk,
              const float* dy, const float* dhT, float* dx, float* ddt, float* dA, float* dB, float* dC, float* dh0,
              int b, int L, int D, int N, int threads) {
  int nblk = (D + DB - 1) / DB, nchk = (L + K - 1) / K;
  #pragma omp parallel for collapse(2) num_threads(threads)
  for (int i = 0; i < b; i++) for (int j = 0; j < nblk; j++) {
    int d0 = j * DB, nd = imin(D, d0 + DB) - d0;
    float g[DB * N], *hs = malloc(sizeof(float) * (K + 1) * DB * N);  /* g = dLoss/dh_t */
    float *dAi = dA + ((long)i * D + d0) * N;
    float *dBj = dB + ((long)i * nblk + j) * L * N, *dCj = dC + ((long)i * nblk + j) * L * N;
    memcpy(g, dhT + ((long)i * D + d0) * N, sizeof(float) * nd * N);
    for (int c = nchk - 1; c >= 0; c--) {
      int s = c * K, e = imin(L, s + K);
      memcpy(hs, hchk + (((long)i * nchk + c) * D + d0) * N, sizeof(float) * nd * N);
      for (int t = s; t < e; t++) {  /* hs[t - s + 1] = h_t */
        long r = (long)i * L + t;
        const float* Bt = B + r * N;
        float *hp = hs + (t - s) * DB * N, *hn = hp + DB * N;
        for (int d = 0; d < nd; d++) {
          float dtv = dt[r * D + d0 + d], bx = dtv * x[r * D + d0 + d];
          const float* Ad = A + (long)(d0 + d) * N;
          #pragma omp simd
          for (int n = 0; n < N; n++) hn[d * N + n] = expf(dtv * Ad[n]) * hp[d * N + n] + bx * Bt[n];
        }
      }
      for (int t = e - 1; t >= s; t--) {
        long r = (long)i * L + t;
        const float *Bt = B + r * N, *Ct = C + r * N;
        float *hp = hs + (t - s) * DB * N, *hn = hp + DB * N, *dBt = dBj + (long)t * N, *dCt = dCj + (long)t * N;
        for (int d = 0; d < nd; d++) {
          float dtv = dt[r * D + d0 + d], xv = x[r * D + d0 + d], dyv = dy[r * D + d0 + d], ddtv = 0.f, dxv = 0.f;
          const float* Ad = A + (long)(d0 + d) * N;
          float *gd = g + d * N, *dAd = dAi + (long)d * N;
          #pragma omp simd reduction(+:ddtv,dxv)
          for (int n = 0; n < N; n++) {
            float gn = gd[n] + dyv * Ct[n], a = expf(dtv * Ad[n]), ga = gn * hp[d * N + n] * a;
            dCt[n] += dyv * hn[d * N + n];
            dBt[n] += gn * dtv * xv;
            dAd[n] += ga * dtv;
            ddtv += ga * Ad[n] + gn * xv * Bt[n];
            dxv += gn * dtv * Bt[n];
            gd[n] = gn * a;
          }
          ddt[r * D + d0 + d] = ddtv;
          dx[r * D + d0 + d] = dxv;
        }
      }
    }
    memcpy(dh0 + ((long)i * D + d0) * N, g, sizeof(float) * nd * N);
    free(hs);
  }
}
"""


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def private(path):
    st = os.lstat(path)  # lstat: a symlink is refused, not followed
    return st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and not st.st_mode & 0o022


def build(cc, lib):
    """Compiles SCAN_C to lib and its SHA-256 to lib.sha256; False when the compiler fails with both flags."""
    # compile and link apart: linking with -ffast-math adds a constructor that makes the process flush denormals
    for openmp in ("-fopenmp", "-fopenmp-simd"):  # Apple's clang has no OpenMP runtime: one thread, still vectorised
        with tempfile.TemporaryDirectory(dir=os.path.dirname(lib)) as tmp:
            obj, out, digest = (os.path.join(tmp, f) for f in ("scan.o", "scan.so", "sha256"))
            try:
                for cmd in ([cc, "-O3", "-march=native", "-ffast-math", "-fPIC", openmp, "-xc", "-c", "-", "-o", obj],
                            [cc, "-shared", openmp, obj, "-o", out, "-lm"]):
                    subprocess.run(cmd, input=SCAN_C, text=True, check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                continue
            pathlib.Path(digest).write_text(sha256(out))
            os.chmod(out, 0o700)  # under any umask: a library others can write would be refused next time
            os.chmod(digest, 0o600)
            os.replace(digest, lib + ".sha256")
            os.replace(out, lib)  # atomic: concurrent processes never load a half-written library
            return True
    return False


def load(cc, lib):
    """lib when its SHA-256 matches the stored one and it loads; else a fresh build, and one rebuild."""
    for attempt in range(3):
        # missing, damaged (a truncated library would die of SIGBUS inside CDLL, hence the hash) or unloadable: build
        with contextlib.suppress(OSError), open(lib + ".sha256") as f:
            if sha256(lib) == f.read().strip():
                return ctypes.CDLL(lib)
        if attempt == 2 or not build(cc, lib):
            break
    if attempt:  # not when there is no compiler at all: then the chunked scan is the plan, not a failure
        print(f"warning: the compiled C scan {lib} would not load, even rebuilt; using the chunked PyTorch scan",
              file=sys.stderr)
    return None


@functools.cache
def cpu_scan_kernel():
    """SCAN_C compiled and loaded, cached per source, compiler and host; None without a working C compiler."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(f"{SCAN_C}{cc}{platform.node()}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybrid-gpt")
    lib = os.path.join(cache, f"scan-{key}.so")
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
        why = next((f"{p} is not yours or is writable by others" for p in (cache, lib, lib + ".sha256")
                    if os.path.lexists(p) and not private(p)), None)
    except OSError as e:
        why = f"{cache}: {e.strerror}"
    if why is None:
        return load(cc, lib)
    print(f"warning: not using the kernel cache ({why}); building the C scan in a private temp directory",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        return load(cc, os.path.join(tmp, "scan.so"))  # the loaded library outlives its file


@torch.compiler.assume_constant_result  # torch.compile folds the answer instead of tracing the build
def cpu_scan_available():
    return cpu_scan_kernel() is not None


# Custom ops rather than an autograd.Function: torch.compile then treats the scan as one opaque op (no graph break).
@torch.library.custom_op("hybrid_gpt::cpu_scan", mutates_args=())
def cpu_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y, h_L, and the states every 64 steps (for backward)."""
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    h0 = None if h0 is None else h0.float().contiguous()
    y, hT, hchk = cpu_scan_outputs(x, dt, A, B, C, h0)
    cpu_scan_kernel().scan_fwd(*ptrs(x, dt, A, B, C, h0, y, hchk, hT), *x.shape, A.shape[1], torch.get_num_threads())
    return y, hT, hchk


@torch.library.custom_op("hybrid_gpt::cpu_scan_backward", mutates_args=())
def cpu_scan_backward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      hchk: torch.Tensor, dy: torch.Tensor, dhT: torch.Tensor) -> list[torch.Tensor]:
    x, dt, A, B, C, dy, dhT = (t.contiguous() for t in (x, dt, A, B, C, dy, dhT))
    (b, L, D), N = x.shape, A.shape[1]
    dx, ddt, dh0 = torch.empty_like(x), torch.empty_like(x), x.new_empty(b, D, N)
    dA, dB, dC = x.new_zeros(b, D, N), x.new_zeros(b, -(-D // 32), L, N), x.new_zeros(b, -(-D // 32), L, N)
    cpu_scan_kernel().scan_bwd(*ptrs(x, dt, A, B, C, hchk, dy, dhT, dx, ddt, dA, dB, dC, dh0),
                               b, L, D, N, torch.get_num_threads())
    return [dx, ddt, dA.sum(0), dB.sum(1), dC.sum(1), dh0]


@cpu_scan.register_fake
def cpu_scan_outputs(x, dt, A, B, C, h0):
    (b, L, D), N = x.shape, A.shape[1]
    return torch.empty_like(x), x.new_empty(b, D, N), x.new_empty(b, -(-L // 64), D, N)


@cpu_scan_backward.register_fake
def _(x, dt, A, B, C, hchk, dy, dhT):
    return [torch.empty_like(t) for t in (x, dt, A, B, C, dhT)]  # dh0 is shaped as dhT


def cpu_scan_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output[2])  # x, dt, A, B, C and the checkpointed states
    ctx.h0_grad = inputs[5] is not None


def cpu_scan_grad(ctx, dy, dhT, _):
    x, dt, A, B, C, hchk = ctx.saved_tensors
    dhT = x.new_zeros(x.shape[0], *A.shape) if dhT is None else dhT
    dx, ddt, dA, dB, dC, dh0 = cpu_scan_backward(x, dt, A, B, C, hchk, dy, dhT)
    return dx, ddt, dA, dB, dC, dh0 if ctx.h0_grad else None


cpu_scan.register_autograd(cpu_scan_grad, setup_context=cpu_scan_setup_context)


def ptrs(*tensors):
    return [ctypes.c_void_p(None if t is None else t.data_ptr()) for t in tensors]
