"""Convolution algorithms other than oneDNN's direct one, timed forward + backward per layer (2 threads).

1. Winograd F(m x m, r x r) built from PyTorch ops: tiles by `unfold`, the transforms as Kronecker
   matrices (matmuls), the products as one batched matmul; autograd gives the backward. Matrices
   come from Toom-Cook with exact fractions (points 0, 1, -1, 2, -2, 1/2, -1/2, ...).
2. For convnet7's 2x2 kernels, im2col as four shifted NHWC views concatenated and one GEMM.

Measured 2026-11-26 on the 2-core EPYC (ms for forward + backward at batch 128):
  convnet3 conv3 (64->128, 24x24, 3x3): direct 440, Winograd F(2) 682, F(4) 561, F(6) 544 (first run)
  convnet5 conv2 (32->64, 28x28, 5x5): direct 496, F(2) 1080, F(4) 561; conv3 (64->96, 14x14):
  direct 399, F(4) 302; conv4 (96->128, 7x7): direct 199, F(4) 127
  convnet7 2x2 layers, NCHW / channels_last / GEMM: conv4 80 / 79 / 89, conv6 18 / 16 / 12
The transforms move several times the layer's data through memory, which two cores cannot hide:
a step would gain at most a few percent, so neither is used. Usage: python explore_winograd.py
"""
import time
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

POINTS = [0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), 3, -3, Fraction(1,3), Fraction(-1,3)]

def winograd_matrices(m, r):
    n = m + r - 1
    pts = [Fraction(p) for p in POINTS[: n - 1]]
    def evalm(k):
        E = [[p ** i for i in range(k)] for p in pts]
        E.append([Fraction(0)] * (k - 1) + [Fraction(1)])
        return np.array(E, dtype=object)
    Em, Er, Vn = evalm(m), evalm(r), evalm(n)
    Vinv = np.array(sympy_inv(Vn))
    AT = Em.T
    G = Er
    BT = Vinv.T
    f = lambda M: np.array(M, dtype=np.float64)
    return f(AT), f(G), f(BT)

def sympy_inv(M):
    # exact inverse with fractions (Gauss-Jordan)
    n = len(M)
    A = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(M)]
    for c in range(n):
        p = next(i for i in range(c, n) if A[i][c] != 0)
        A[c], A[p] = A[p], A[c]
        pv = A[c][c]
        A[c] = [x / pv for x in A[c]]
        for i in range(n):
            if i != c and A[i][c] != 0:
                fac = A[i][c]
                A[i] = [a - fac * b for a, b in zip(A[i], A[c])]
    return [row[n:] for row in A]

def make_ops(m, r, dtype=torch.float32):
    AT, G, BT = winograd_matrices(m, r)
    BB = torch.tensor(np.kron(BT, BT), dtype=dtype)      # n2 x n2
    GG = torch.tensor(np.kron(G, G), dtype=dtype)        # n2 x r2
    AA = torch.tensor(np.kron(AT, AT), dtype=dtype)      # m2 x n2
    return BB, GG, AA

def wino_conv(x, w, b, m, ops):
    # valid correlation, stride 1; x NCHW
    BB, GG, AA = ops
    N, C, H, W = x.shape
    K, _, r, _ = w.shape
    n = m + r - 1
    Ho, Wo = H - r + 1, W - r + 1
    th, tw = -(-Ho // m), -(-Wo // m)
    ph, pw = th * m + r - 1 - H, tw * m + r - 1 - W
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    T = th * tw
    tiles = x.unfold(2, n, m).unfold(3, n, m)  # N C th tw n n
    tiles = tiles.reshape(N, C, T, n * n)
    V = torch.matmul(tiles, BB.t())            # N C T n2
    V = V.permute(3, 0, 2, 1).reshape(n * n, N * T, C)
    U = torch.matmul(GG, w.reshape(K, C, r * r).permute(2, 1, 0).reshape(r * r, C * K)).reshape(n * n, C, K)
    M = torch.bmm(V, U)                        # n2, N*T, K
    Y = torch.matmul(AA, M.reshape(n * n, N * T * K))  # m2, N*T*K
    Y = Y.reshape(m, m, N, th, tw, K).permute(2, 5, 3, 0, 4, 1).reshape(N, K, th * m, tw * m)
    Y = Y[:, :, :Ho, :Wo]
    return Y + b.view(1, K, 1, 1)



def bench(fn, reps=5):
    """Median milliseconds of `fn()` over `reps` calls after two warm-up calls."""
    fn(); fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter(); fn(); times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1000


def check(m, r, C=8, K=16, H=13):
    torch.manual_seed(0)
    x = torch.randn(4, C, H, H, dtype=torch.float64)
    w = torch.randn(K, C, r, r, dtype=torch.float64) * 0.1
    b = torch.randn(K, dtype=torch.float64)
    ops = make_ops(m, r, torch.float64)
    ref = F.conv2d(x, w, b)
    out = wino_conv(x, w, b, m, ops)
    e64 = (out - ref).abs().max().item()
    ops32 = make_ops(m, r)
    out32 = wino_conv(x.float(), w.float(), b.float(), m, ops32)
    ref32 = F.conv2d(x.float(), w.float(), b.float())
    print(f"F({m},{r}) f64 err {e64:.2e}  f32 err wino {(out32.double()-ref).abs().max():.2e} direct {(ref32.double()-ref).abs().max():.2e}")


def time_winograd():
    torch.set_num_threads(2)
    layers = [("c3.conv2",32,64,26,3,0),("c3.conv3",64,128,24,3,0),("c5.conv2",32,64,28,5,2),("c5.conv3",64,96,14,5,2),("c5.conv4",96,128,7,5,2),("c7.conv4",64,96,14,2,1)]
    N=128
    for name,C,K,H,r,pad in layers:
        x = torch.randn(N,C,H,H, requires_grad=True)
        w = (torch.randn(K,C,r,r)*0.05).requires_grad_()
        b = torch.zeros(K, requires_grad=True)
        def direct():
            xi = F.pad(x,(0,pad,0,pad)) if pad else x  # asym pad approx
            y = F.conv2d(xi if not pad else F.pad(x,(pad,pad,pad,pad))[:, :, :, :], w, b)
            y.relu().sum().backward()
        def wino(m, ops):
            def f():
                xi = F.pad(x,(pad,pad,pad,pad)) if pad else x
                y = wino_conv(xi, w, b, m, ops)
                y.relu().sum().backward()
            return f
        res = {"direct": bench(direct)}
        for m in ([2,4,6] if r==3 else [2,4] if r==5 else [2,4,6]):
            res[f"F({m})"] = bench(wino(m, make_ops(m, r)))
        print(name, " ".join(f"{k}={v:.1f}ms" for k,v in res.items()), flush=True)

def time_gemm_2x2():
    # convnet7 layers: (C,K,H,stride)
    layers=[("conv2",16,32,28,2),("conv3",32,64,14,1),("conv4",64,96,14,1),("conv5",96,128,7,1),("conv6",128,164,3,1),("conv7",164,164,3,1)]
    N=128
    for name,C,K,H,s in layers:
        w=(torch.randn(K,C,2,2)*0.05).requires_grad_(); b=torch.zeros(K,requires_grad=True)
        x=torch.randn(N,C,H,H).requires_grad_()
        xcl=x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        def direct(xx):
            def f():
                xi = F.pad(xx,(0,1,0,1)) if s==1 else xx
                F.conv2d(xi,w,b,stride=s).relu().sum().backward()
            return f
        xh = x.detach().permute(0,2,3,1).contiguous().requires_grad_()  # NHWC storage as plain tensor
        def gemm():
            if s==1:
                xp = F.pad(xh,(0,0,0,1,0,1))  # N,H+1,W+1,C
                cols = torch.cat([xp[:, i:i+H, j:j+H, :] for i in (0,1) for j in (0,1)], dim=-1)  # N,H,W,4C (order kh,kw,c)
            else:
                Ho=H//2
                cols = xh.reshape(N,Ho,2,Ho,2,C).permute(0,1,3,2,4,5).reshape(N,Ho,Ho,4*C)
            wm = w.permute(2,3,1,0).reshape(4*C,K)
            y = torch.addmm(b, cols.reshape(-1,4*C), wm)
            y.relu().sum().backward()
        print(name, f"nchw {bench(direct(x)):.1f}  cl {bench(direct(xcl)):.1f}  gemm {bench(gemm):.1f} ms", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for m, r in [(2, 3), (4, 3), (6, 3), (2, 5), (4, 5), (2, 2), (4, 2)]:
        check(m, r)  # exact in float64; fp32 errors beside the direct convolution's
    time_winograd()
    time_gemm_2x2()
