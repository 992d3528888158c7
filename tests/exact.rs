//! The exact-arithmetic helpers the GGML quantizers will stand on: the
//! GPU's integer-emulated division equals the CPU's IEEE division bit for
//! bit (NaN for NaN), including subnormal results, infinities and zeros.

mod common;
use common::*;
use modelpress::tools::sample::Rng;
use modelpress::Device;

#[test]
fn division_is_correctly_rounded_on_the_gpu() {
    let Some(Device::Gpu(g)) = gpu() else { return };
    let mut rng = Rng::new(seed("div"));
    let special = [
        0u32,
        0x8000_0000,
        1,
        0x7f_ffff,
        0x80_0000,
        0x7f7f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x3f80_0000,
        0x42fe_0000,
        0x4100_0000,
        0xc100_0000,
        3,
        0x3400_0000,
    ];
    let mut pairs: Vec<(u32, u32)> = special
        .iter()
        .flat_map(|&a| special.iter().map(move |&b| (a, b)))
        .collect();
    for i in 0..400_000u32 {
        let r = rng.next_u64();
        let (mut a, mut b) = (r as u32, (r >> 32) as u32);
        match i % 4 {
            0 => {}
            // Small exponents: subnormal quotients.
            1 => a = (a & 0x807f_ffff) | ((rng.next_u64() as u32) & 0x0f80_0000),
            // The quantizers' divisions: amax/127, max/-8, 1/d.
            2 => b = [0x42fe_0000, 0xc100_0000, 0x4170_0000, 0x41f8_0000][(i / 4 % 4) as usize],
            _ => {
                a = 0x3f80_0000;
                b &= 0x7fff_ffff;
            }
        }
        pairs.push((a, b));
    }
    let got = g.divide_exactly(&pairs).unwrap();
    for (&(a, b), &q) in pairs.iter().zip(&got) {
        let want = (f32::from_bits(a) / f32::from_bits(b)).to_bits();
        if f32::from_bits(want).is_nan() {
            assert!(
                f32::from_bits(q).is_nan(),
                "{a:#x}/{b:#x}: got {q:#x}, want NaN"
            );
        } else {
            assert_eq!(
                q,
                want,
                "{a:#x}/{b:#x}: got {:e}, want {:e}",
                f32::from_bits(q),
                f32::from_bits(want)
            );
        }
    }
}
