"""The merge methods' rules in numpy (ops/merge, jobs/merge/params.rs): the
reference check_merge.py holds modelpress to, shared with the mergekit dev
check."""
import math

import numpy as np

M32 = 0xFFFFFFFF


# --- the counter-based generator (ops/merge/rng.rs), in uint32 arithmetic
def mix32(x):
    x = np.asarray(x, np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        x = x ^ (x >> np.uint32(16))
    return x


def name_hash(name):
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & M32
    return h


def stream_key(seed, name, model):
    s = mix32(np.uint32(seed & M32) ^ mix32(np.uint32((seed >> 32) ^ 0x9E3779B9)))
    inner = mix32(np.uint32(name_hash(name)) ^ mix32(np.uint32((model + 0x632BE5AB) & M32)))
    return mix32(s ^ inner)


def uniform(key, n):
    i = np.arange(n, dtype=np.uint64)
    lo, hi = (i & M32).astype(np.uint32), (i >> np.uint64(32)).astype(np.uint32)
    h = mix32(np.uint32(key) ^ mix32(lo ^ mix32(hi ^ np.uint32(0x85EBCA6B))))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


# --- parameters: gradients over layers, filters, precedence
def position(name, layers):
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            l = int(parts[i + 1])
            return l / (layers - 1) if layers > 1 else 1.0
    return 0.0


def resolve(v, name, t):
    if isinstance(v, list) and v and isinstance(v[0], dict):
        for e in v:
            f = e.get("filter")
            if f in (None, "*") or f in name:
                return resolve(e["value"], name, t)
        return None
    if isinstance(v, list):
        if len(v) == 1:
            return float(v[0])
        s = min(max(t, 0.0), 1.0) * (len(v) - 1)
        i = min(int(math.floor(s)), len(v) - 2)
        f = s - i
        return v[i] * (1.0 - f) + v[i + 1] * f
    return v


def param(scopes, key, name, t, default=None):
    for s in scopes:
        if key in s:
            r = resolve(s[key], name, t)
            if r is not None:
                return r
    return default


# --- the methods
def key(d):
    return d.view(np.uint32) & np.uint32(0x7FFFFFFF)


def ranks_between(d, lo, count):
    """Keep flags for ranks lo..lo+count of (|d| bits, index) ascending."""
    order = np.argsort(key(d), kind="stable")
    keep = np.zeros(d.size, bool)
    keep[order[lo : lo + count]] = True
    return keep


def gta(base, xs, terms, sparsify, consensus, normalize, rescale, lam, seed, name):
    n = base.size
    wd = []
    for i, (x, (w, dens, gamma)) in enumerate(zip(xs, terms)):
        d = (x - base).astype(np.float32)
        if sparsify == "none":
            keep = np.ones(n, bool)
        elif sparsify == "magnitude":
            k = n if dens >= 1.0 else min(max(1, math.floor(dens * n)), n)
            keep = ranks_between(d, n - k, k)
        elif sparsify == "random":
            keep = uniform(stream_key(seed, name, i + 1), n) < np.float32(dens)
        else:  # breadcrumbs
            k = math.floor(dens * n)
            bottom = max(n - k - math.floor(gamma * n), 0)
            keep = ranks_between(d, bottom, k)
        s = np.float32(1.0)
        if rescale and sparsify != "none":
            a = math.fsum(np.abs(d).astype(np.float64))
            b = math.fsum(np.abs(d[keep]).astype(np.float64))
            if a >= 1e-7 and b >= 1e-7:
                s = np.float32(a / b)
        wd.append(np.where(keep, np.float32(w) * (d * s), np.float32(0)).astype(np.float32))
    ws = [np.float32(t[0]) for t in terms]
    total = np.zeros(n, np.float32)
    if consensus:
        for v in wd:
            total = total + v
        pos = total >= 0
        acc = np.zeros(n, np.float32)
        div = np.zeros(n, np.float32)
        for v, w in zip(wd, ws):
            m = (v != 0) & ((v > 0) == pos)
            acc = np.where(m, acc + v, acc)
            div = np.where(m, div + w, div)
        div = np.where(div == 0, np.float32(1), div)
    else:
        acc = np.zeros(n, np.float32)
        for v in wd:
            acc = acc + v
        wsum = np.float32(0)
        for w in ws:
            wsum = np.float32(wsum + w)
        div = np.float32(1) if abs(wsum) < 1e-8 else wsum
    if normalize:
        acc = acc / div
    return base + np.float32(lam) * acc


def linear(xs, ws, normalize):
    acc = xs[0] * np.float32(ws[0])
    for x, w in zip(xs[1:], ws[1:]):
        acc = acc + np.float32(w) * x
    if normalize:
        wsum = np.float32(0)
        for w in ws:
            wsum = np.float32(wsum + np.float32(w))
        acc = acc / wsum
    return acc


def slerp(a, b, t):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = math.sqrt(np.dot(a64, a64)), math.sqrt(np.dot(b64, b64))
    unit = lambda x: x if x > 1e-8 else 1.0
    dot = np.dot(a64, b64) / (unit(na) * unit(nb))
    if abs(dot) > 0.9995:
        ca, cb = np.float32(1.0 - np.float32(t)), np.float32(t)
    else:
        th0 = math.acos(dot)
        s0 = math.sin(th0)
        tht = th0 * float(np.float32(t))
        ca, cb = np.float32(math.sin(th0 - tht) / s0), np.float32(math.sin(tht) / s0)
    return ca * a + cb * b
