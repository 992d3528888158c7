import numpy as np, sys
rng = np.random.default_rng(int(sys.argv[1]))
parts = []
n = 256
# gaussian at several scales
for s in [0.02, 1.0, 300.0, 1e-3]:
    parts.append(rng.standard_normal(n*8) * s)
# tie-heavy grid k/16
parts.append(rng.integers(-64, 64, n*8) / 16.0)
parts.append(rng.integers(-8, 8, n*8) / 4.0)
# equal-value blocks, zero blocks, single nonzero
parts.append(np.full(n*2, 0.75)); parts.append(np.full(n*2, -0.3)); parts.append(np.zeros(n*2))
z = np.zeros(n*2); z[5] = 1.5; z[300] = -2e-3; parts.append(z)
# huge and tiny magnitudes, subnormals
parts.append(rng.standard_normal(n*2) * 1e30)
parts.append(rng.standard_normal(n*2) * 1e-30)
parts.append(rng.standard_normal(n*2) * 1e-40)
mix = rng.standard_normal(n*4) * 0.05; mix[rng.integers(0, n*4, 50)] *= 1e-35; parts.append(mix)
mix = rng.standard_normal(n*4); mix[rng.integers(0, n*4, 20)] = 60000.0; parts.append(mix)
# bf16- and f16-representable values
parts.append((rng.standard_normal(n*8) * 0.05).astype(np.float16).astype(np.float64))
x = np.concatenate(parts).astype(np.float32)
x.tofile(sys.stdout.buffer)
