"""How much Winograd 3x3 convolutions round when their transformed tiles and kernels are bf16.

F(m x m, 3x3) over interpolation points (plus infinity) against the exact convolution, with the
transformed input tiles and kernels rounded to bf16 (round to nearest even), products summed over
the input channels in f32, and the output transform in f64; a direct convolution over
bf16-rounded inputs and weights for comparison. Prints the relative RMS error of each.
    . scripts/bench/venv.sh && "$venv/bin/python" scripts/bench/winograd_bf16_error.py
"""
import numpy as np

rng = np.random.default_rng(0)


def bf16(x):
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def matrices(points, m, r=3):
    """A^T, G and B^T of F(m, r) over `points` and infinity (Toom-Cook; B^T solved for)."""
    n = m + r - 1
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for i, a in enumerate(points):
        at[:, i] = [a**j for j in range(m)]
        g[i] = [a**k / np.prod([a - b for b in points if b != a]) for k in range(r)]
    at[m - 1, n - 1], g[n - 1, r - 1] = 1, 1
    # sum_i A^T[j, i] G[i, k] B^T[i, l] = [l == j + k] for every output j, tap k, input l.
    rows, rhs = [], []
    for j in range(m):
        for k in range(r):
            for l in range(n):
                row = np.zeros((n, n))
                row[:, l] = at[j, :] * g[:, k]
                rows.append(row.ravel())
                rhs.append(float(l == j + k))
    bt = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(n, n)
    d, f = rng.standard_normal(n), rng.standard_normal(r)
    assert np.allclose(at @ ((g @ f) * (bt @ d)), [f @ d[j : j + r] for j in range(m)])
    return at, g, bt


def error(points, m, channels=128, outputs=64, tiles=400, direct=False):
    n = m + 2
    d = rng.standard_normal((tiles, channels, n, n))
    w = rng.standard_normal((outputs, channels, 3, 3)) / np.sqrt(9 * channels)
    windows = [(a, b) for a in range(m) for b in range(m)]
    exact = np.zeros((tiles, outputs, m, m))
    for a, b in windows:
        exact[:, :, a, b] = np.einsum("tcij,kcij->tk", d[:, :, a : a + 3, b : b + 3], w)
    if direct:
        out = np.zeros_like(exact)
        for a, b in windows:
            out[:, :, a, b] = np.einsum("tcij,kcij->tk", bf16(d[:, :, a : a + 3, b : b + 3]), bf16(w))
    else:
        at, g, bt = matrices(points, m)
        u = bf16(np.einsum("ia,kcab,jb->kcij", g, w, g))
        v = bf16(np.einsum("ia,tcab,jb->tcij", bt, d, bt))
        products = np.einsum("tcij,kcij->tkij", v, u).astype(np.float32).astype(np.float64)
        out = np.einsum("ai,tkij,bj->tkab", at, products, at)
    return np.sqrt(np.mean((out - exact) ** 2) / np.mean(exact**2))


print(f"direct bf16: {error(None, 2, direct=True):.1e}")
for name, points, m in [
    ("F(2x2), 0, 1, -1", (0, 1, -1), 2),
    ("F(3x3), 0, 1, -1, 2", (0, 1, -1, 2), 3),
    ("F(3x3), 0, 1, -1, 1/2", (0, 1, -1, 0.5), 3),
    ("F(4x4), 0, 1, -1, 2, -2", (0, 1, -1, 2, -2), 4),
    ("F(4x4), 0, 1, -1, 1/2, -1/2", (0, 1, -1, 0.5, -0.5), 4),
    ("F(4x4), 0, 1, -1, 1/2, -2", (0, 1, -1, 0.5, -2), 4),
]:
    print(f"{name}: {error(points, m):.1e}")
