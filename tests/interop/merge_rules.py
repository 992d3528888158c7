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


BLOCK = 32768


def seqsum(v):
    """f64 sum as ops/merge sums: sequentially within blocks of 32768, then
    the blocks in order (so that the bits agree)."""
    total = 0.0
    for b in range(0, v.size, BLOCK):
        total += float(np.cumsum(np.asarray(v[b : b + BLOCK], np.float64))[-1])
    return total


def lanesum(v):
    """f64 sum as the rescaling sums it (ops/merge l1_sums): within each
    block of 32768, element e into lane e % 8 in order, the eight lanes
    then added in order; then the blocks in order."""
    total = 0.0
    for b in range(0, v.size, BLOCK):
        x = np.asarray(v[b : b + BLOCK], np.float64)
        x = np.concatenate([x, np.zeros(-x.size % 8)]).reshape(-1, 8)
        lanes = np.cumsum(x, axis=0)[-1] if x.size else np.zeros(8)
        part = 0.0
        for lane in lanes:
            part += float(lane)
        total += part
    return total


def rowlanesum(v, row_len):
    """f64 sum as DELLA's masks take it (ops/merge/della row_l1): within
    each row, element e into lane e % 8 in order, the lanes then added in
    order; then the rows in order."""
    x = np.asarray(v, np.float64).reshape(-1, row_len)
    x = np.concatenate([x, np.zeros((x.shape[0], -row_len % 8))], axis=1).reshape(x.shape[0], -1, 8)
    lanes = np.cumsum(x, axis=1)[:, -1, :]
    rows = np.zeros(x.shape[0])
    for lane in range(8):
        rows = rows + lanes[:, lane]
    total = 0.0
    for r in rows:
        total += float(r)
    return total


def della_keep(d, row_len, dens, eps, key_):
    rows = d.reshape(-1, row_len)
    order = np.argsort(key(rows), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(row_len), rows.shape).copy(), axis=1)
    last = np.float32(max(row_len - 1, 1))
    p = np.float32(dens - eps) + (ranks.astype(np.float32) / last) * np.float32(2 * eps)
    return (uniform(key_, d.size).reshape(rows.shape) < p).ravel()


def gta(base, xs, terms, sparsify, consensus, normalize, rescale, lam, seed, name, row_len=None):
    n = base.size
    wd = []
    for i, (x, (w, dens, gamma, eps)) in enumerate(zip(xs, terms)):
        d = (x - base).astype(np.float32)
        if sparsify == "none":
            keep = np.ones(n, bool)
        elif sparsify == "magnitude":
            k = n if dens >= 1.0 else min(max(1, math.floor(dens * n)), n)
            keep = ranks_between(d, n - k, k)
        elif sparsify == "random":
            keep = uniform(stream_key(seed, name, i + 1), n) < np.float32(dens)
        elif sparsify == "della":
            keep = np.ones(n, bool) if dens >= 1 else della_keep(d, row_len, dens, eps, stream_key(seed, name, i + 1))
        else:  # breadcrumbs
            k = math.floor(dens * n)
            bottom = max(n - k - math.floor(gamma * n), 0)
            keep = ranks_between(d, bottom, k)
        s = np.float32(1.0)
        if rescale and sparsify != "none":
            total = (lambda v: rowlanesum(v, row_len)) if sparsify == "della" and dens < 1 else lanesum
            a = total(np.abs(d))
            b = total(np.where(keep, np.abs(d), np.float32(0)))
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


def vec_sums(vs, row_len, stride=None, lanes=False):
    """Per vector (the whole tensor, rows of row_len, or with `stride` the
    vectors along dimension 0), the f64 sums of the products of each pair
    (i, j) of `vs`, as ops/merge sums them (over eight lanes: `lanes`)."""
    n = vs[0].size
    if stride is not None:
        # Blocks of whole rows, each summed row by row, then the blocks.
        rows, per = n // stride, max(BLOCK // stride, 1)
        out = [{} for _ in range(stride)]
        for i in range(len(vs)):
            for j in range(i, len(vs)):
                p = (vs[i].astype(np.float64) * vs[j].astype(np.float64)).reshape(rows, stride)
                total = np.zeros(stride)
                for b in range(0, rows, per):
                    total = total + np.cumsum(p[b : b + per], axis=0)[-1]
                for c in range(stride):
                    out[c][i, j] = float(total[c])
        return out
    def one(idx):
        total = lanesum if lanes else seqsum
        return {(i, j): (total(vs[i][idx].astype(np.float64) * vs[j][idx].astype(np.float64)))
                for i in range(len(vs)) for j in range(i, len(vs))}
    if row_len is None:
        return [one(slice(0, n))]
    return [one(slice(r * row_len, (r + 1) * row_len)) for r in range(n // row_len)]


def per_element(coef, n, row_len, stride=None):
    """A per-vector coefficient spread over the elements."""
    c = np.asarray(coef, np.float32)
    if stride is not None:
        return np.tile(c, n // stride)
    return np.full(n, c[0], np.float32) if row_len is None else np.repeat(c, row_len)


def slerp(a, b, t):
    s = vec_sums([a, b], None, lanes=True)[0]
    na, nb = math.sqrt(s[0, 0]), math.sqrt(s[1, 1])
    unit = lambda x: x if x > 1e-8 else 1.0
    dot = s[0, 1] / (unit(na) * unit(nb))
    if abs(dot) > 0.9995:
        ca, cb = np.float32(1.0 - np.float32(t)), np.float32(t)
    else:
        th0 = math.acos(dot)
        s0 = math.sin(th0)
        tht = th0 * float(np.float32(t))
        ca, cb = np.float32(math.sin(th0 - tht) / s0), np.float32(math.sin(tht) / s0)
    return ca * a + cb * b


def nearswap(a, b, t):
    w = np.clip(np.float32(t) / np.maximum(np.abs(a - b), np.float32(1e-6)), 0, 1).astype(np.float32)
    return w * b + (np.float32(1) - w) * a


def model_stock(base, xs, row_len):
    m = len(xs)
    ds = [x - base for x in xs]
    ts = []
    for s in vec_sums(ds, row_len):
        pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        cos = sum(min(max(s[i, j] / max(math.sqrt(s[i, i]) * math.sqrt(s[j, j]), 1e-6), -1.0), 1.0) for i, j in pairs) / len(pairs)
        den = 1.0 + (m - 1.0) * cos
        ts.append(0.0 if abs(den) < 1e-6 else m * cos / den)
    t = per_element(ts, base.size, row_len)
    avg = xs[0].copy()
    for x in xs[1:]:
        avg = avg + x
    return t * (avg / np.float32(m)) + (np.float32(1) - t) * base


def nuslerp(base, a, b, t, row_len, stride=None):
    if base is not None:
        a, b = a - base, b - base
    ca, cb = [], []
    for s in vec_sums([a, b], row_len, stride):
        na, nb = max(math.sqrt(s[0, 0]), 1e-7), max(math.sqrt(s[1, 1]), 1e-7)
        cos = min(max(s[0, 1] / (na * nb), -1.0), 1.0)
        if 1.0 - cos * cos <= 1e-16:
            ca.append(np.float32(1) - np.float32(t)); cb.append(np.float32(t))
        else:
            th = math.acos(cos)
            sn = math.sin(th)
            ca.append(math.sin((1.0 - float(np.float32(t))) * th) / sn)
            cb.append(math.sin(float(np.float32(t)) * th) / sn)
    y = per_element(ca, a.size, row_len, stride) * a + per_element(cb, a.size, row_len, stride) * b
    start = base if base is not None else np.zeros(a.size, np.float32)
    return start + y


def sce(base, xs, topk):
    m, n = len(xs), base.size
    ds = [x - base for x in xs]
    if topk < 1:
        mean = ds[0].copy()
        for d in ds[1:]:
            mean = mean + d
        mean = mean / np.float32(m)
        var = (ds[0] - mean) ** 2
        for d in ds[1:]:
            var = var + (d - mean) ** 2
        var = var / np.float32(m)
        keep_n = math.floor(int(np.count_nonzero(key(var))) * topk)
        keep = ranks_between(var, n - keep_n, keep_n)
        ds = [np.where(keep, d, np.float32(0)) for d in ds]
    means = [seqsum(d.astype(np.float64) ** 2) / max(n, 1) for d in ds]
    total = sum(means)
    w = [np.float32(1.0 / m)] * m if abs(total) < 1e-6 else [np.float32(v / total) for v in means]
    tot = ds[0].copy()
    for d in ds[1:]:
        tot = tot + d
    pos = tot >= 0
    acc = np.zeros(n, np.float32)
    div = np.zeros(n, np.float32)
    for d, wi in zip(ds, w):
        mk = (d != 0) & ((d > 0) == pos)
        acc = np.where(mk, acc + d * wi, acc)
        div = np.where(mk, div + wi, div)
    return base + acc / np.maximum(div, np.float32(1e-6))


# --- means on the sphere (ops/merge/sphere.rs): the Gram matrix in f64, the
# iteration on coefficients, in the same order of operations.
def gram(xs):
    m = len(xs)
    g = [[0.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(i, m):
            g[i][j] = g[j][i] = seqsum(xs[i].astype(np.float64) * xs[j].astype(np.float64))
    return g


def _form(u, c, d):
    s = 0.0
    for i in range(len(c)):
        for j in range(len(d)):
            s += c[i] * u[i][j] * d[j]
    return s


def _norm(u, c):
    return math.sqrt(max(_form(u, c, c), 0.0))


def _dots(u, c):
    out = []
    for row in u:
        s = 0.0
        for a, b in zip(row, c):
            s += a * b
        out.append(s)
    return out


def _combine(xs, c, base=None):
    y = np.zeros(xs[0].size, np.float32)
    for x, ci in zip(xs, c):
        y = y + np.float32(ci) * x
    return y if base is None else y + base


def karcher(xs, max_iter, tol):
    m = len(xs)
    if m == 1:
        return xs[0]
    g = gram(xs)
    norms = [math.sqrt(g[i][i]) for i in range(m)]
    inv = [0.0 if n == 0.0 else 1.0 / n for n in norms]
    u = [[g[i][j] * inv[i] * inv[j] for j in range(m)] for i in range(m)]
    valid = [n > tol for n in norms]
    count = sum(valid)
    if count == 0:
        return _combine(xs, [0.0] * m)
    a = [1.0 / count if v else 0.0 for v in valid]
    beta = list(a)
    mn = _norm(u, beta)
    if mn < tol:
        beta = [0.0] * m
        beta[valid.index(True)] = 1.0
    else:
        beta = [b / mn for b in beta]
    for _ in range(max_iter):
        d = _dots(u, beta)
        tangent = [0.0] * m
        for i in range(m):
            if not valid[i]:
                continue
            dot = min(max(d[i], -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            s = a[i] * theta / math.sin(theta)
            tangent[i] += s
            tangent = [t - s * dot * b for t, b in zip(tangent, beta)]
        tn = _norm(u, tangent)
        if tn < tol:
            break
        beta = [math.cos(tn) * b + math.sin(tn) * t / tn for b, t in zip(beta, tangent)]
        un = _norm(u, beta)
        if un > tol:
            beta = [b / un for b in beta]
    scale = 0.0
    for n in norms:
        scale += n
    scale = scale / m
    return _combine(xs, [scale * beta[i] * inv[i] for i in range(m)])


def multislerp(base, xs, weights, normalize, eps):
    if len(xs) == 1:
        return xs[0]
    m = len(xs)
    w = [float(np.float32(v)) for v in weights]
    if normalize:
        s = 0.0
        for v in w:
            s += v
        w = [v / s for v in w]
    ds = xs if base is None else [x - base for x in xs]
    g = gram(ds)
    norms = [math.sqrt(g[i][i]) for i in range(m)]
    u = [[g[i][j] / ((norms[i] + eps) * (norms[j] + eps)) for j in range(m)] for i in range(m)]
    if all(n == 0.0 for n in norms):
        return _combine(ds, [0.0] * m, base)
    mn = _norm(u, w)
    if mn < eps:
        assert m == 2, "multislerp: zero mean"
        return _combine(ds, w, base)
    beta = [v / mn for v in w]
    d = _dots(u, beta)
    along = 0.0
    for a, b in zip(w, d):
        along += a * b
    tangent = [a - along * b for a, b in zip(w, beta)]
    tn = _norm(u, tangent) + eps
    avg = 0.0
    for n, v in zip(norms, w):
        avg += n * v
    c = [avg * (math.cos(tn) * beta[i] + tangent[i] * math.sin(tn) / tn) / (norms[i] + eps) for i in range(m)]
    return _combine(ds, c, base)
