"""Standalone reproducer: XLA:CPU jitted program hangs (deadlocks) in block_until_ready.

Versions: jax 0.10.2, jaxlib 0.10.2 (CPU backend), Python venv; machine: 2-core x86_64 CPU, no GPU.

Program: one jitted function; a jax.lax.map over 4 chunks; each chunk samples 2048 linear-regression
tasks (x ~ N(0, I) [2048, 21, 5] via an unrolled threefry + erf_inv, times a 5x5 matrix; w likewise;
y = x w; lax.cond(noise == 0, ...) adding noise * N(0, 1)) and stacks the squared errors of 4
predictors: zero (yhat = 0), OLS via jnp.linalg.pinv (batched SVD, LAPACK custom call), ridge via
jnp.linalg.solve (LAPACK custom call), and one gradient step with a 5x5 preconditioner (matmuls).

Expected: each call finishes in ~1 s, and the script prints "ok" after a few seconds.
Observed: the 1st-3rd call never returns; the process sits at 0% CPU inside BlockUntilReady with
all XLA worker threads idle (a lost wakeup / deadlock, not slow compute). Run it under a timeout:
    timeout 40 python xla_cpu_hang_repro.py     # exit 124 = hang
Observed hang rate: 7 of 10 processes (docs/XLA_CPU_HANG.md has the variants that pass).
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 12
B, N, D, CHUNKS = 2048, 20, 5, 4
_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry(k1, k2, x0, x1):  # threefry2x32, unrolled (bit-identical to jax.random's hash)
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROT[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def normal(key, shape):  # = jax.random.normal(key, shape), as fusible elementwise ops
    counts = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
    b0, b1 = _threefry(key[0], key[1], jnp.zeros_like(counts), counts)
    bits = ((b0 ^ b1) >> np.uint32(9)) | np.uint32(0x3F800000)
    unit = jax.lax.bitcast_convert_type(bits, jnp.float32) - np.float32(1.0)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(jax.lax.max(lo, unit * (np.float32(1.0) - lo) + lo))


def sample(key, sigma_sqrt, prior_sqrt, noise):
    kx, kw, _, ke = jax.random.split(key, 4)
    kz, _ = jax.random.split(kx)
    x = normal(kz, (B, N + 1, D)) @ sigma_sqrt
    w = normal(kw, (B, D)) @ prior_sqrt
    y = sum(x[..., i] * w[:, None, i] for i in range(D))
    y = jax.lax.cond(noise == 0, lambda: y, lambda: y + noise * normal(ke, x.shape[:-1]))
    return x[:, :N], y[:, :N], x[:, N], y[:, N]


@jax.jit
def heldout(key, sigma_sqrt, prior_sqrt, noise, omega_inv, eta, precond):
    def one(j):
        X, Y, xq, yq = sample(jax.random.fold_in(key, j), sigma_sqrt, prior_sqrt, noise)
        Xty = jnp.einsum("bnd,bn->bd", X, Y)
        zero = jnp.zeros_like(yq)
        ols = jnp.einsum("bd,bd->b", xq, jnp.einsum("bdn,bn->bd", jnp.linalg.pinv(X), Y))
        gram = jnp.einsum("bnd,bne->bde", X, X) + noise**2 * omega_inv
        ridge = jnp.einsum("bd,bd->b", xq, jnp.linalg.solve(gram, Xty[..., None])[..., 0])
        gd = jnp.einsum("bd,bd->b", xq, (Xty / N) @ (eta * precond).T)
        return jnp.stack([(p - yq) ** 2 for p in (zero, ols, ridge, gd)])

    errs = jax.lax.map(one, jnp.arange(CHUNKS))  # [CHUNKS, 4, B]
    return jnp.moveaxis(errs, 1, 0).reshape(errs.shape[1], -1)


if __name__ == "__main__":
    print("jax", jax.__version__, jax.devices(), flush=True)
    def f32(a):
        return jnp.asarray(a, jnp.float32)
    eye = np.eye(D)
    args = (jax.random.PRNGKey(0), f32(eye), f32(eye), f32(0.5), f32(eye), f32(0.76), f32(eye))
    t = time.time()
    for i in range(CALLS):
        e = np.asarray(heldout(*args))
        print(f"call {i} done at {time.time() - t:.2f}s, mean sq. errors {e.mean(axis=1)}", flush=True)
    print("ok")
