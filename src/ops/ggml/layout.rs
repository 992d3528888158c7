//! Byte ranges of each GGML block's fields, as ggml-common.h's `block_*`
//! structs lay them out (`layouts_tile_their_blocks` checks that each
//! tiles its block).

use std::ops::Range;

/// `block_q4_0`: f16 scale, 16 bytes of 4-bit levels.
pub mod q4_0 {
    use super::Range;
    /// Scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Levels, two per byte.
    pub const QS: Range<usize> = 2..18;
}
/// `block_q4_1`: f16 scale and minimum, 4-bit levels.
pub mod q4_1 {
    use super::Range;
    /// Scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Minimum (f16).
    pub const M: Range<usize> = 2..4;
    /// Levels, two per byte.
    pub const QS: Range<usize> = 4..20;
}
/// `block_q5_0`: f16 scale, fifth bits, low nibbles.
pub mod q5_0 {
    use super::Range;
    /// Scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Bit 4 of each level (u32).
    pub const QH: Range<usize> = 2..6;
    /// Low nibbles, two per byte.
    pub const QS: Range<usize> = 6..22;
}
/// `block_q5_1`: f16 scale and minimum, fifth bits, low nibbles.
pub mod q5_1 {
    use super::Range;
    /// Scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Minimum (f16).
    pub const M: Range<usize> = 2..4;
    /// Bit 4 of each level (u32).
    pub const QH: Range<usize> = 4..8;
    /// Low nibbles, two per byte.
    pub const QS: Range<usize> = 8..24;
}
/// `block_q8_0`: f16 scale, 32 signed bytes.
pub mod q8_0 {
    use super::Range;
    /// Scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Levels (i8).
    pub const QS: Range<usize> = 2..34;
}
/// `block_q2_K`: 4-bit scales and minimums, 2-bit levels, f16 d, dmin.
pub mod q2_k {
    use super::Range;
    /// Scale (low nibble) and minimum (high nibble) per sub-block.
    pub const SCALES: Range<usize> = 0..16;
    /// Levels, four per byte.
    pub const QS: Range<usize> = 16..80;
    /// Super-block scale (f16).
    pub const D: Range<usize> = 80..82;
    /// Super-block scale of the minimums (f16).
    pub const DMIN: Range<usize> = 82..84;
}
/// `block_q3_K`: high bits, 2-bit low levels, 6-bit scales, f16 d.
pub mod q3_k {
    use super::Range;
    /// Bit 2 of each level.
    pub const HMASK: Range<usize> = 0..32;
    /// Low two bits, four per byte.
    pub const QS: Range<usize> = 32..96;
    /// 6-bit scales, packed.
    pub const SCALES: Range<usize> = 96..108;
    /// Super-block scale (f16).
    pub const D: Range<usize> = 108..110;
}
/// `block_q4_K`: f16 d and dmin, 6-bit scales and minimums, 4-bit levels.
pub mod q4_k {
    use super::Range;
    /// Super-block scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Super-block scale of the minimums (f16).
    pub const DMIN: Range<usize> = 2..4;
    /// 6-bit scales and minimums, packed.
    pub const SCALES: Range<usize> = 4..16;
    /// Levels, two per byte.
    pub const QS: Range<usize> = 16..144;
}
/// `block_q5_K`: as Q4_K, plus the fifth bits.
pub mod q5_k {
    use super::Range;
    /// Super-block scale (f16).
    pub const D: Range<usize> = 0..2;
    /// Super-block scale of the minimums (f16).
    pub const DMIN: Range<usize> = 2..4;
    /// 6-bit scales and minimums, packed.
    pub const SCALES: Range<usize> = 4..16;
    /// Bit 4 of each level.
    pub const QH: Range<usize> = 16..48;
    /// Low nibbles, two per byte.
    pub const QS: Range<usize> = 48..176;
}
/// `block_q6_K`: low nibbles, high bit pairs, 8-bit scales, f16 d.
pub mod q6_k {
    use super::Range;
    /// Low nibbles, two per byte.
    pub const QL: Range<usize> = 0..128;
    /// Bits 4 and 5, four per byte.
    pub const QH: Range<usize> = 128..192;
    /// Sub-block scales (i8).
    pub const SCALES: Range<usize> = 192..208;
    /// Super-block scale (f16).
    pub const D: Range<usize> = 208..210;
}

/// Each type's fields, in order (for the tiling test).
#[cfg(test)]
pub fn all() -> Vec<(super::BlockType, Vec<Range<usize>>)> {
    use super::BlockType as B;
    vec![
        (B::Q4_0, vec![q4_0::D, q4_0::QS]),
        (B::Q4_1, vec![q4_1::D, q4_1::M, q4_1::QS]),
        (B::Q5_0, vec![q5_0::D, q5_0::QH, q5_0::QS]),
        (B::Q5_1, vec![q5_1::D, q5_1::M, q5_1::QH, q5_1::QS]),
        (B::Q8_0, vec![q8_0::D, q8_0::QS]),
        (B::Q2_K, vec![q2_k::SCALES, q2_k::QS, q2_k::D, q2_k::DMIN]),
        (B::Q3_K, vec![q3_k::HMASK, q3_k::QS, q3_k::SCALES, q3_k::D]),
        (B::Q4_K, vec![q4_k::D, q4_k::DMIN, q4_k::SCALES, q4_k::QS]),
        (
            B::Q5_K,
            vec![q5_k::D, q5_k::DMIN, q5_k::SCALES, q5_k::QH, q5_k::QS],
        ),
        (B::Q6_K, vec![q6_k::QL, q6_k::QH, q6_k::SCALES, q6_k::D]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::ggml::BlockType;

    #[test]
    fn layouts_tile_their_blocks() {
        let all = all();
        assert_eq!(all.len(), BlockType::ALL.len());
        for (ty, fields) in all {
            let mut at = 0;
            for f in &fields {
                assert_eq!(f.start, at, "{ty:?}: fields are contiguous");
                at = f.end;
            }
            assert_eq!(at, ty.block_bytes(), "{ty:?}: fields fill the block");
        }
    }
}
