//! Small dense linear algebra on the CPU in f64, for the randomized SVD of
//! `lora extract`: orthonormal bases of tall matrices and the symmetric
//! eigenproblem of a small Gram matrix. The large products go through
//! `ops::matmul` on the device.

/// A row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row-major values.
    pub v: Vec<f64>,
}

impl Mat {
    /// Zeros.
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            v: vec![0.0; rows * cols],
        }
    }

    /// Element (i, j).
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.cols + j]
    }

    /// The transpose.
    pub fn t(&self) -> Mat {
        let mut o = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                o.v[j * self.rows + i] = self.at(i, j);
            }
        }
        o
    }

    /// self · other.
    pub fn mul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "shapes");
        let mut o = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let orow = &mut o.v[i * other.cols..(i + 1) * other.cols];
            for k in 0..self.cols {
                let a = self.at(i, k);
                if a == 0.0 {
                    continue;
                }
                for (x, &b) in orow
                    .iter_mut()
                    .zip(&other.v[k * other.cols..(k + 1) * other.cols])
                {
                    *x += a * b;
                }
            }
        }
        o
    }
}

/// An orthonormal basis of the columns of `y` (m × l, m ≥ l), by modified
/// Gram–Schmidt applied twice (stable to working precision); a column
/// that vanishes becomes zero, so the basis may be narrower in effect.
pub fn orth(y: &Mat) -> Mat {
    let (m, l) = (y.rows, y.cols);
    // Columns as contiguous vectors.
    let mut q: Vec<Vec<f64>> = (0..l)
        .map(|j| (0..m).map(|i| y.at(i, j)).collect())
        .collect();
    let scale = q
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    for j in 0..l {
        for _ in 0..2 {
            for k in 0..j {
                let d: f64 = q[j].iter().zip(&q[k]).map(|(a, b)| a * b).sum();
                let (head, tail) = q.split_at_mut(j);
                for (a, b) in tail[0].iter_mut().zip(&head[k]) {
                    *a -= d * b;
                }
            }
        }
        let n = q[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-12 * scale && n > 0.0 {
            q[j].iter_mut().for_each(|x| *x /= n);
        } else {
            q[j].iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let mut o = Mat::zeros(m, l);
    for (j, c) in q.iter().enumerate() {
        for (i, &x) in c.iter().enumerate() {
            o.v[i * l + j] = x;
        }
    }
    o
}

/// Eigenvalues (descending) and eigenvectors (columns, same order) of the
/// symmetric matrix `a`, by cyclic Jacobi rotations until the off-diagonal
/// mass is negligible.
pub fn sym_eig(a: &Mat) -> (Vec<f64>, Mat) {
    let n = a.rows;
    let mut a = a.clone();
    let mut v = Mat::zeros(n, n);
    for i in 0..n {
        v.v[i * n + i] = 1.0;
    }
    let norm: f64 = a.v.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..60 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a.at(i, j) * a.at(i, j))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * norm || norm == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a.at(p, q);
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let (app, aqq) = (a.at(p, p), a.at(q, q));
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a.at(k, p), a.at(k, q));
                    a.v[k * n + p] = c * akp - s * akq;
                    a.v[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a.at(p, k), a.at(q, k));
                    a.v[p * n + k] = c * apk - s * aqk;
                    a.v[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.v[k * n + p] = c * vkp - s * vkq;
                    v.v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a.at(j, j).total_cmp(&a.at(i, i)));
    let vals = order.iter().map(|&i| a.at(i, i)).collect();
    let mut vs = Mat::zeros(n, n);
    for (c, &i) in order.iter().enumerate() {
        for k in 0..n {
            vs.v[k * n + c] = v.at(k, i);
        }
    }
    (vals, vs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orth_and_eig_reconstruct() {
        let mut rng = crate::tools::sample::Rng::new(3);
        let y = Mat {
            rows: 30,
            cols: 6,
            v: (0..180).map(|_| rng.normal()).collect(),
        };
        let q = orth(&y);
        let qtq = q.t().mul(&q);
        for i in 0..6 {
            for j in 0..6 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((qtq.at(i, j) - want).abs() < 1e-12);
            }
        }
        let g = y.t().mul(&y);
        let (vals, v) = sym_eig(&g);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        // G·v = λ·v for each pair.
        let gv = g.mul(&v);
        for c in 0..6 {
            for k in 0..6 {
                assert!((gv.at(k, c) - vals[c] * v.at(k, c)).abs() < 1e-9 * vals[0]);
            }
        }
    }
}
