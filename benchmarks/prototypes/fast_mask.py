"""Prototype for the lead (NOT used by rora_fast): a faster torch implementation of rora_fast.reference.weight_keep_mask,
bit-identical to it (same Philox4x32-10 stream, same 16-bit lanes, same threshold).

What changes against the reference (rora_fast/reference.py):
1. mulhilo32 with ONE int64 multiply: a, b < 2**32, so a*b < 2**64; int64 arithmetic
   wraps modulo 2**64 (two's complement, as torch's CPU and CUDA kernels do), so
   lo = p & 0xFFFFFFFF and hi = (p >> 32) & 0xFFFFFFFF are exact even when p "overflows"
   (the arithmetic shift's sign bits are masked off). 4 ops instead of 9.
2. Constant folding: the counter words c1..c3 start at 0 and the key is a Python int,
   so round 1 and half of round 2 are computed on Python ints, not tensors.
3. In-place ops (>>=, &=, ^=) instead of fresh temporaries.
4. Chunks of 2**17 counters (1 MiB int64 temporaries: stay in L2, and glibc reuses them
   instead of mmap/munmap + page faults for every 16 MiB temporary).
5. Lanes are compared in place: high lane kept <=> word >= thr << 16 (word < 2**32);
   low lane kept <=> (word & 0xFFFF) >= thr; written straight into the bool output
   (no int32 'halves' buffer of 4 bytes per weight element, no stack).
"""
import torch

M32 = 0xFFFFFFFF
KA, KB = 0x9E3779B9, 0xBB67AE85
RA, RB = 0xD2511F53, 0xCD9E8D57
CHUNK = 1 << 17


def _mulhilo(a, c):
    """(hi, lo) of a*c; c a Python int or an int64 tensor of uint32 values."""
    if isinstance(c, int):
        p = a * c
        return (p >> 32) & M32, p & M32
    p = c * a  # wraps modulo 2**64
    lo = p & M32
    p >>= 32
    p &= M32
    return p, lo


def _xor(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a ^ b
    if isinstance(a, int):
        a, b = b, a
    if a._base is None and a.is_contiguous():  # we own the temporaries
        a ^= b
        return a
    return a ^ b


def philox_words(seed: int, c0, rounds: int = 10):
    k0, k1 = seed & M32, (seed >> 32) & M32
    c1 = c2 = c3 = 0
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(RB, c2)
        hi_a, lo_a = _mulhilo(RA, c0)
        c0, c1, c2, c3 = _xor(_xor(hi_b, c1), k0), lo_b, _xor(_xor(hi_a, c3), k1), lo_a
        k0 = (k0 + KA) & M32
        k1 = (k1 + KB) & M32
    return c0, c1, c2, c3


def weight_keep_mask_fast(seed: int, out_features: int, in_features: int, p: float,
                          device=None, chunk: int = CHUNK) -> torch.Tensor:
    from rora_fast.reference import keep_threshold, MASK_LANES

    thr = keep_threshold(p)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if thr == 0:
        return torch.ones(out_features, in_features, dtype=torch.bool, device=device)
    groups = -(-in_features // MASK_LANES)
    total = out_features * groups
    if total - 1 > 2**31 - 1:
        raise ValueError("too large for the int32 mask counter")
    out = torch.empty(total, 4, 2, dtype=torch.bool, device=device)
    hi_thr = thr << 16
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        g = torch.arange(start, stop, dtype=torch.int64, device=device)
        words = philox_words(seed, g)
        o = out[start:stop]
        for j, w in enumerate(words):
            torch.ge(w, hi_thr, out=o[:, j, 1])
            w &= 0xFFFF
            torch.ge(w, thr, out=o[:, j, 0])
    m = out.view(out_features, groups * MASK_LANES)
    if groups * MASK_LANES != in_features:
        m = m[:, :in_features].contiguous()
    return m


def masked_weight_fast(weight, seed, p):
    """Bit-identical to reference.masked_weight: where(keep, W, 0) * scale gives
    W*scale for kept and 0*scale = +0 for dropped, with one temporary less."""
    from rora_fast.reference import keep_threshold, effective_drop_prob

    if keep_threshold(p) == 0:
        return weight
    keep = weight_keep_mask_fast(seed, weight.shape[0], weight.shape[1], p, weight.device)
    scale = 1.0 / (1.0 - effective_drop_prob(p))
    return torch.where(keep, weight, 0.0).mul_(scale)


# Names with the reference's signatures, for ``python -m benchmarks.profile_rora --patch``.
weight_keep_mask = weight_keep_mask_fast
masked_weight = masked_weight_fast


# ----------------------------------------------------------------------------- compiled
# Optional second step: the same stream through torch.compile (Inductor turns the ~130
# elementwise passes into one vectorised C++ loop). The key schedule and threshold are
# tensors so that a new seed does not recompile; chunks have a fixed size (the last one
# is padded) so that one graph serves every call.
_COMPILED = None


def _philox_lanes(g, keys, thr):
    c0 = g
    c1 = torch.zeros_like(g)
    c2 = torch.zeros_like(g)
    c3 = torch.zeros_like(g)
    for r in range(10):
        pb = c2 * RB
        pa = c0 * RA
        c0, c1, c2, c3 = (((pb >> 32) & M32) ^ c1 ^ keys[r, 0], pb & M32,
                          ((pa >> 32) & M32) ^ c3 ^ keys[r, 1], pa & M32)
    w = torch.stack([c0, c1, c2, c3], -1)
    return torch.stack([(w & 0xFFFF) >= thr, w >= (thr << 16)], -1)


def weight_keep_mask_compiled(seed: int, out_features: int, in_features: int, p: float,
                              device=None, chunk: int = 1 << 20) -> torch.Tensor:
    global _COMPILED
    from rora_fast.reference import keep_threshold, MASK_LANES

    thr = keep_threshold(p)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if thr == 0:
        return torch.ones(out_features, in_features, dtype=torch.bool, device=device)
    if _COMPILED is None:
        _COMPILED = torch.compile(_philox_lanes, dynamic=False)
    groups = -(-in_features // MASK_LANES)
    total = out_features * groups
    k0, k1 = seed & M32, (seed >> 32) & M32
    ks = []
    for _ in range(10):
        ks.append((k0, k1))
        k0, k1 = (k0 + KA) & M32, (k1 + KB) & M32
    keys = torch.tensor(ks, dtype=torch.int64, device=device)
    t = torch.tensor(thr, dtype=torch.int64, device=device)
    out = torch.empty(total, 4, 2, dtype=torch.bool, device=device)
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        g = torch.arange(start, start + chunk, dtype=torch.int64, device=device)
        out[start:stop] = _COMPILED(g, keys, t)[: stop - start]
    m = out.view(out_features, groups * MASK_LANES)
    if groups * MASK_LANES != in_features:
        m = m[:, :in_features].contiguous()
    return m
