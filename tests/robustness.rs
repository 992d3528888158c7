//! Bad input of every kind is an `Err`, never a panic, on every device.

mod common;
use common::*;
use modelpress::mix;
use modelpress::prune::{self, NeuronNorm};
use modelpress::quantize::{self, Granularity};
use modelpress::transfer::{self, Delta};
use modelpress::{DType, Device, Error, TensorRef};

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(gpu());
    d
}

/// Runs every public operation on `t` and returns their results' errors.
fn every_op(dev: &Device, t: &TensorRef) -> Vec<(&'static str, Option<Error>)> {
    vec![
        ("threshold", prune::threshold(dev, t, 0.1).err()),
        (
            "neurons",
            prune::prune_neurons(dev, t, 0.1, NeuronNorm::L2).err(),
        ),
        ("round", quantize::quantize_round(dev, t, 10.0).err()),
        (
            "absmax",
            quantize::quantize_absmax(dev, t, Granularity::PerRow).err(),
        ),
        ("convert", quantize::convert(dev, t, DType::F16).err()),
        (
            "offset",
            transfer::transfer(dev, t, Delta::Scalar(1.0), 1.0).err(),
        ),
        (
            "delta",
            transfer::transfer(dev, t, Delta::Tensor(*t), 1.0).err(),
        ),
        ("mix", mix::mix(dev, &[*t, *t], &[0.5, 0.5]).err()),
        ("rows", mix::mix_rows(dev, t, &[1.0; 2]).err()),
    ]
}

#[test]
fn views_whose_bytes_disagree_with_their_shape() {
    let data = vec![0u8; 10];
    for dev in devices() {
        for shape in [vec![2, 2], vec![3], vec![usize::MAX, 2]] {
            assert!(TensorRef::new(DType::F32, &shape, &data).is_err());
            // An owned tensor whose public fields disagree, viewed.
            let owned = modelpress::Tensor {
                dtype: DType::F32,
                shape: shape.clone(),
                data: data.clone(),
            };
            let t = owned.view();
            for (op, e) in every_op(&dev, &t) {
                assert!(matches!(e, Some(Error::Input(_))), "{op} {shape:?}: {e:?}");
            }
        }
    }
}

#[test]
fn unsupported_dtypes() {
    let data = vec![0u8; 16];
    let shape = [2, 2];
    for dev in devices() {
        for dtype in [DType::I32, DType::F64, DType::I8, DType::U8, DType::Bool] {
            let n = 16 / dtype.size();
            let shape = if n == 4 {
                shape.to_vec()
            } else {
                vec![2, n / 2]
            };
            let t = TensorRef::new(dtype, &shape, &data).unwrap();
            for (op, e) in every_op(&dev, &t) {
                assert!(
                    matches!(e, Some(Error::Unsupported(_))),
                    "{op} {dtype}: {e:?}"
                );
            }
        }
        let t = tensor(DType::F32, &[4], &[1.0; 4]);
        assert!(matches!(
            quantize::convert(&dev, &t.view(), DType::I8),
            Err(Error::Unsupported(_))
        ));
        let q = quantize::quantize_round(&dev, &t.view(), 1.0).unwrap().0;
        assert!(matches!(
            quantize::dequantize(&dev, &q, DType::I32),
            Err(Error::Unsupported(_))
        ));
    }
}

#[test]
fn chunks_too_small_for_a_kernel() {
    let Some(g) = gpu() else { return };
    assert!(matches!(
        g.clone().with_chunk_bytes(100),
        Err(Error::Limit { .. })
    ));
    // 16 f32 inputs need 16·64·4 bytes of binding for the smallest chunk.
    let dev = g.with_chunk_bytes(256).unwrap();
    let t = tensor(DType::F32, &[1000], &[1.0; 1000]);
    let views = vec![t.view(); 16];
    let e = mix::mix(&dev, &views, &[0.0625; 16]).unwrap_err();
    assert!(matches!(e, Error::Limit { .. }), "{e}");
    // The same device still works for what fits.
    prune::threshold(&dev, &t.view(), 0.5).unwrap();
}

#[test]
fn unknown_adapter_names() {
    let e = Device::choose("no-such-adapter-anywhere").unwrap_err();
    assert!(
        matches!(e, Error::NoAdapter(ref m) if m.contains("no-such-adapter-anywhere")),
        "{e}"
    );
    assert!(matches!(Device::choose("cpu"), Ok(Device::Cpu)));
    assert!(Device::choose("auto").is_ok());
}

#[test]
fn a_destroyed_device_returns_errors() {
    if gpu().is_none() {
        return;
    }
    // A device of its own: the shared one must survive.
    let dev = Device::choose("gpu").unwrap();
    let t = tensor(DType::F32, &[64, 64], &vec![0.5; 4096]);
    prune::threshold(&dev, &t.view(), 0.1).unwrap();
    let Device::Gpu(g) = &dev else { unreachable!() };
    g.context().destroy();
    for (op, e) in every_op(&dev, &t.view()) {
        if op == "rows" {
            continue; // 64 weights needed; the error is about the count.
        }
        assert!(
            matches!(e, Some(Error::DeviceLost(_)) | Some(Error::Gpu(_))),
            "{op}: {e:?}"
        );
    }
}
