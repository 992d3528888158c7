use super::*;
use crate::tensor::Tensor;

fn spec(kind: Kind, strategy: Strategy) -> Spec {
    Spec { kind, strategy }
}

fn packed(spec: &Spec, cols: usize) -> Packing {
    Packing {
        row_stride_bits: (cols * spec.code_bits() as usize).next_multiple_of(32),
        offset: true,
    }
}

#[test]
fn int4_symmetric_group_by_hand() {
    // One row, one group of 4: absmax 1.5, scale 1.5/7.5 = 0.2 (in f32).
    let s = spec(
        Kind::Int {
            bits: 4,
            symmetric: true,
        },
        Strategy::Group(4),
    );
    let t = Tensor::from_f32(DType::F32, &[1, 4], &[1.5, -0.3, 0.1, -1.5]).unwrap();
    let q = quantize(&Device::Cpu, &s, packed(&s, 4), &t.view(), 1.0).unwrap();
    let scale = 1.5f32 / 7.5;
    assert_eq!(q.groups[0].scale_raw, scale.to_bits());
    let codes: Vec<i32> = [1.5f32, -0.3, 0.1, -1.5]
        .iter()
        .map(|x| (x / scale).round_ties_even().clamp(-8.0, 7.0) as i32 + 8)
        .collect();
    let want = codes
        .iter()
        .enumerate()
        .fold(0u32, |w, (i, &c)| w | (c as u32) << (4 * i));
    assert_eq!(q.codes, want.to_le_bytes()[..4].to_vec());
}

#[test]
fn zero_groups_get_eps_scales_and_zero_codes() {
    for (kind, scale) in [
        (
            Kind::Int {
                bits: 8,
                symmetric: true,
            },
            reference::raw(DType::BF16, 2f32.powi(-7)),
        ),
        (Kind::Fp8, reference::raw(DType::BF16, 2f32.powi(-7))),
        (Kind::Nvfp4, 0x20),
        (Kind::Mxfp4, 0),
    ] {
        let s = spec(kind, Strategy::Group(16));
        let t = Tensor::from_f32(DType::BF16, &[2, 32], &[0.0; 64]).unwrap();
        let p = packed(&s, 32);
        let q = quantize(
            &Device::Cpu,
            &s,
            Packing { offset: false, ..p },
            &t.view(),
            1.0,
        )
        .unwrap();
        assert!(q.groups.iter().all(|g| g.scale_raw == scale), "{kind:?}");
        assert!(q.codes.iter().all(|&b| b == 0), "{kind:?}");
    }
}

#[test]
fn asymmetric_zero_group_has_zero_point_zero() {
    let s = spec(
        Kind::Int {
            bits: 4,
            symmetric: false,
        },
        Strategy::Group(8),
    );
    let mut v = vec![0.0f32; 16];
    v[8..].copy_from_slice(&[0.5, 0.25, 0.1, 0.0, 0.3, 0.2, 0.4, 0.45]);
    let t = Tensor::from_f32(DType::BF16, &[1, 16], &v).unwrap();
    let q = quantize(&Device::Cpu, &s, packed(&s, 16), &t.view(), 1.0).unwrap();
    assert_eq!(q.groups[0].zp, 0);
    // Only positive values: min clamps to 0, the zero point is qmin.
    assert_eq!(q.groups[1].zp, -8);
}

#[test]
fn refusals() {
    let s = spec(
        Kind::Int {
            bits: 4,
            symmetric: true,
        },
        Strategy::Group(128),
    );
    let t = Tensor::from_f32(DType::F32, &[2, 96], &[0.1; 192]).unwrap();
    let e = quantize(&Device::Cpu, &s, packed(&s, 96), &t.view(), 1.0).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a multiple of the group size 128"),
        "{e}"
    );
    let mut v = vec![0.1f32; 256];
    v[77] = f32::NAN;
    let t = Tensor::from_f32(DType::F32, &[2, 128], &v).unwrap();
    let e = quantize(&Device::Cpu, &s, packed(&s, 128), &t.view(), 1.0).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}
