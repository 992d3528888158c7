//! Every GPU kernel, one registration line each: its entry point, the WGSL
//! file it lives in and its parameter block (a `kernel_params!` struct in
//! the op's module). The tests check each parameter block against the WGSL
//! struct of the same name, field for field.

use super::{
    ct, ggml, matmul, merge, mix, moe, prune, quantize, reduce, select, selfcheck, transfer,
    KernelParams,
};
use crate::device::KernelDef;

/// A WGSL file of kernels, with what is generated in front of it.
pub(crate) struct Shader {
    name: &'static str,
    source: &'static str,
    prelude: fn() -> String,
}

fn nothing() -> String {
    String::new()
}

const PRUNE: Shader = Shader {
    name: "prune",
    source: include_str!("../../shaders/prune.wgsl"),
    prelude: nothing,
};
const SELECT: Shader = Shader {
    name: "select",
    source: include_str!("../../shaders/select.wgsl"),
    prelude: nothing,
};
const REDUCE: Shader = Shader {
    name: "reduce",
    source: include_str!("../../shaders/reduce.wgsl"),
    prelude: nothing,
};
const QUANTIZE: Shader = Shader {
    name: "quantize",
    source: include_str!("../../shaders/quantize.wgsl"),
    prelude: nothing,
};
const TRANSFER: Shader = Shader {
    name: "transfer",
    source: include_str!("../../shaders/transfer.wgsl"),
    prelude: nothing,
};
const MIX: Shader = Shader {
    name: "mix",
    source: include_str!("../../shaders/mix.wgsl"),
    prelude: nothing,
};
const MERGE: Shader = Shader {
    name: "merge",
    source: include_str!("../../shaders/merge.wgsl"),
    prelude: nothing,
};
const SELFCHECK: Shader = Shader {
    name: "selfcheck",
    source: include_str!("../../shaders/selfcheck.wgsl"),
    prelude: nothing,
};
const GGML: Shader = Shader {
    name: "ggml",
    source: include_str!("../../shaders/ggml.wgsl"),
    prelude: ggml::wgsl_prelude,
};

const CT: Shader = Shader {
    name: "ct",
    source: include_str!("../../shaders/ct.wgsl"),
    prelude: ct_prelude,
};

const MOE: Shader = Shader {
    name: "moe",
    source: include_str!("../../shaders/moe.wgsl"),
    prelude: nothing,
};
const MATMUL: Shader = Shader {
    name: "matmul",
    source: include_str!("../../shaders/matmul.wgsl"),
    prelude: matmul_prelude,
};

fn matmul_prelude() -> String {
    format!("const MM_TILE: u32 = {}u;\n", matmul::MM_TILE)
}

fn ct_prelude() -> String {
    format!("const CT_WG: u32 = {}u;\n", ct::CT_WG)
}

macro_rules! kernels {
    ($($kernel:ident => $shader:ident, $entry:literal, $params:ty;)*) => {
        /// Every entry point of every shader file.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub(crate) enum Kernel {
            $(
                #[doc = concat!("`", $entry, "` in shaders/", stringify!($shader), ".wgsl")]
                $kernel,
            )*
        }

        impl Kernel {
            /// Every kernel.
            #[cfg(test)]
            const ALL: &'static [Kernel] = &[$(Kernel::$kernel),*];

            fn shader(self) -> &'static Shader {
                match self { $(Kernel::$kernel => &$shader,)* }
            }

            fn entry_name(self) -> &'static str {
                match self { $(Kernel::$kernel => $entry,)* }
            }

            /// (WGSL struct name, field names, bytes) of its parameters:
            /// what the tests compare with the shader.
            #[allow(dead_code)]
            fn params_layout(self) -> (&'static str, &'static [&'static str], usize) {
                match self {
                    $(Kernel::$kernel => (
                        <$params as KernelParams>::WGSL,
                        <$params as KernelParams>::FIELDS,
                        std::mem::size_of::<$params>(),
                    ),)*
                }
            }
        }
    };
}

kernels! {
    Threshold => PRUNE, "threshold", prune::ThresholdParams;
    ZeroRows => PRUNE, "zero_rows", prune::RowParams;
    RowStats => REDUCE, "row_stats", reduce::PieceParams;
    TensorStats => REDUCE, "tensor_stats", reduce::StatParams;
    ColStats => REDUCE, "col_stats", reduce::ColParams;
    QuantizeI8 => QUANTIZE, "quantize_i8", quantize::QuantParams;
    DequantizeI8 => QUANTIZE, "dequantize_i8", quantize::DequantParams;
    Convert => QUANTIZE, "convert", quantize::ConvertParams;
    OffsetScalar => TRANSFER, "offset_scalar", transfer::ScalarParams;
    OffsetTensor => TRANSFER, "offset_tensor", transfer::TensorParams;
    Mix => MIX, "mix", mix::MixParams;
    MixRows => MIX, "mix_rows", mix::RowMixParams;
    GtaCombine => MERGE, "gta_combine", merge::GtaParams;
    MergeSum => MERGE, "merge_sum", merge::SumParams;
    SceCombine => MERGE, "sce_combine", merge::SceParams;
    KeyHist => SELECT, "key_hist", select::HistParams;
    CutApply => SELECT, "cut_apply", select::CutParams;
    NmPrune => SELECT, "nm_prune", select::NmParams;
    RowCut => SELECT, "row_cut", select::RowCutParams;
    RowCutApply => SELECT, "row_cut_apply", select::RowApplyParams;
    DivCheck => SELFCHECK, "div_check", selfcheck::CheckParams;
    GgmlQuantize => GGML, "ggml_quantize", ggml::GgmlParams;
    CtQuantize => CT, "ct_quantize", ct::CtParams;
    Matmul => MATMUL, "matmul", matmul::MatmulParams;
    MoeRoute => MOE, "moe_route", moe::RouteParams;
    MoeCombine => MOE, "moe_combine", moe::CombineParams;
}

impl KernelDef for Kernel {
    fn entry(self) -> &'static str {
        self.entry_name()
    }

    fn file(self) -> &'static str {
        self.shader().name
    }

    fn source(self) -> String {
        let s = self.shader();
        format!("{}{}", (s.prelude)(), s.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, type) of each field of WGSL `struct NAME { ... }` in `src`.
    fn wgsl_struct(src: &str, name: &str) -> Option<Vec<(String, String)>> {
        let start = src.find(&format!("struct {name} {{"))?;
        let body = &src[start..];
        let body = &body[body.find('{')? + 1..body.find('}')?];
        Some(
            body.lines()
                .map(|l| l.split("//").next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (n, t) = l.trim_end_matches(',').split_once(':').unwrap_or((l, ""));
                    (n.trim().to_string(), t.trim().to_string())
                })
                .collect(),
        )
    }

    #[test]
    fn every_parameter_block_matches_its_wgsl_struct() {
        for &k in Kernel::ALL {
            let (name, fields, bytes) = k.params_layout();
            let src = k.shader().source;
            let wgsl = wgsl_struct(src, name)
                .unwrap_or_else(|| panic!("{k:?}: no struct {name} in {}.wgsl", k.shader().name));
            let names: Vec<&str> = wgsl.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, fields, "{k:?}: fields of {name}");
            assert!(
                wgsl.iter()
                    .all(|(_, t)| matches!(t.as_str(), "u32" | "i32" | "f32")),
                "{k:?}: {name} holds only 4-byte scalars"
            );
            assert_eq!(
                bytes,
                4 * fields.len(),
                "{k:?}: {name} has no padding of its own"
            );
            assert!(
                bytes <= 256 && bytes % 16 == 0,
                "{k:?}: {name} fits a uniform"
            );
            assert!(
                src.contains(&format!("fn {}(", k.entry_name())),
                "{k:?}: entry point"
            );
        }
    }
}
