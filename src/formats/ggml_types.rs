//! The one table of GGML tensor types (ggml-common.h): id, name, values
//! and bytes per block, and whether modelpress quantizes to it (a CPU
//! reference and an exact GPU kernel). Everything else is derived from it:
//! [`GgmlType`] for the GGUF reader and writer, [`BlockType`] (the types
//! with quantizers) for the kernels and llama-quantize's rules, and the
//! `T_*` constants the GGML shader switches on (`wgsl_constants`).

macro_rules! ggml_types {
    ($($name:ident = $id:literal, $block:literal, $bytes:literal, $quant:ident;)*) => {
        /// A ggml tensor type whose layout is fixed (others are refused).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $(
                #[doc = concat!("ggml type ", stringify!($id), ": ", stringify!($block),
                    " values in ", stringify!($bytes), " bytes.")]
                $name,
            )*
        }

        impl GgmlType {
            /// Every type, in id order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$name),*];

            /// ggml's `enum ggml_type` value.
            pub const fn id(self) -> u32 {
                match self { $(GgmlType::$name => $id,)* }
            }

            /// ggml's name ("Q4_K").
            pub const fn name(self) -> &'static str {
                match self { $(GgmlType::$name => stringify!($name),)* }
            }

            /// Values per block (1 for plain types).
            pub const fn block(self) -> u64 {
                match self { $(GgmlType::$name => $block,)* }
            }

            /// Bytes per block.
            pub const fn bytes(self) -> u64 {
                match self { $(GgmlType::$name => $bytes,)* }
            }

            /// The block type modelpress quantizes to, if this is one.
            pub const fn block_type(self) -> Option<BlockType> {
                match self {
                    $(GgmlType::$name => ggml_types!(@block $quant $name),)*
                }
            }
        }
    };
    (@block yes $name:ident) => { Some(BlockType::$name) };
    (@block no $name:ident) => { None };
}

ggml_types! {
    F32 = 0, 1, 4, no;
    F16 = 1, 1, 2, no;
    Q4_0 = 2, 32, 18, yes;
    Q4_1 = 3, 32, 20, yes;
    Q5_0 = 6, 32, 22, yes;
    Q5_1 = 7, 32, 24, yes;
    Q8_0 = 8, 32, 34, yes;
    Q8_1 = 9, 32, 36, no;
    Q2_K = 10, 256, 84, yes;
    Q3_K = 11, 256, 110, yes;
    Q4_K = 12, 256, 144, yes;
    Q5_K = 13, 256, 176, yes;
    Q6_K = 14, 256, 210, yes;
    Q8_K = 15, 256, 292, no;
    IQ2_XXS = 16, 256, 66, no;
    IQ2_XS = 17, 256, 74, no;
    IQ3_XXS = 18, 256, 98, no;
    IQ1_S = 19, 256, 50, no;
    IQ4_NL = 20, 32, 18, no;
    IQ3_S = 21, 256, 110, no;
    IQ2_S = 22, 256, 82, no;
    IQ4_XS = 23, 256, 136, no;
    I8 = 24, 1, 1, no;
    I16 = 25, 1, 2, no;
    I32 = 26, 1, 4, no;
    I64 = 27, 1, 8, no;
    F64 = 28, 1, 8, no;
    IQ1_M = 29, 256, 56, no;
    BF16 = 30, 1, 2, no;
    TQ1_0 = 34, 256, 54, no;
    TQ2_0 = 35, 256, 66, no;
    MXFP4 = 39, 32, 17, no;
}

impl GgmlType {
    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The type named `name` (any case).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Bytes of `n` values, or None if n is not a whole number of blocks.
    pub fn size_of(self, n: u64) -> Option<u64> {
        n.is_multiple_of(self.block())
            .then(|| n / self.block())
            .and_then(|b| b.checked_mul(self.bytes()))
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! block_types {
    ($($name:ident),* $(,)?) => {
        /// The GGML block types modelpress quantizes to: the rows of the
        /// table marked `yes`, each with a CPU reference and an exact GPU
        /// kernel.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum BlockType {
            $(
                #[doc = concat!("ggml's ", stringify!($name), ".")]
                $name,
            )*
        }

        impl BlockType {
            /// Every block type.
            pub const ALL: &'static [BlockType] = &[$(BlockType::$name),*];

            /// Its GGUF type.
            pub const fn ggml(self) -> GgmlType {
                match self { $(BlockType::$name => GgmlType::$name,)* }
            }
        }
    };
}

block_types!(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K);

impl BlockType {
    /// ggml's name.
    pub const fn name(self) -> &'static str {
        self.ggml().name()
    }

    /// The type named `name` (any case).
    pub fn from_name(name: &str) -> Option<BlockType> {
        GgmlType::from_name(name).and_then(GgmlType::block_type)
    }

    /// The block type of a GGUF type, if modelpress quantizes to it.
    pub const fn from_ggml(t: GgmlType) -> Option<BlockType> {
        t.block_type()
    }

    /// Values per block.
    pub const fn block_values(self) -> usize {
        self.ggml().block() as usize
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        self.ggml().bytes() as usize
    }
}

/// WGSL declarations of the `T_*` constants the GGML kernel switches on:
/// each block type's ggml id, which the host passes as `DTYPE2`.
pub(crate) fn wgsl_constants() -> String {
    BlockType::ALL
        .iter()
        .map(|t| format!("const T_{}: u32 = {}u;\n", t.name(), t.ggml().id()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_enums_agree_with_the_table() {
        for &t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()), Some(t));
            if let Some(b) = t.block_type() {
                assert_eq!(b.ggml(), t);
            }
        }
        assert_eq!(
            GgmlType::ALL
                .iter()
                .filter(|t| t.block_type().is_some())
                .count(),
            BlockType::ALL.len(),
            "every `yes` row is a BlockType and every BlockType a `yes` row"
        );
        let ids: std::collections::HashSet<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
        assert_eq!(ids.len(), GgmlType::ALL.len(), "ids are unique");
    }

    #[test]
    fn the_ggml_shader_switches_on_exactly_the_block_types() {
        let src = include_str!("../../shaders/ggml.wgsl");
        let mut cases: Vec<&str> = src
            .split("case T_")
            .skip(1)
            .filter_map(|s| s.split(':').next())
            .collect();
        cases.sort_unstable();
        let mut want: Vec<&str> = BlockType::ALL.iter().map(|t| t.name()).collect();
        want.sort_unstable();
        assert_eq!(cases, want);
        assert!(
            !src.contains("const T_"),
            "the T_* constants come from the table, not the shader"
        );
        assert_eq!(wgsl_constants().lines().count(), BlockType::ALL.len());
    }
}
