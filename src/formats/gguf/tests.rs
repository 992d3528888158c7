//! Round trips, bad files and mutations: the reader never panics.

use super::read::parse;
use super::write::put_string;
use super::*;

fn sample_meta() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.alignment".into(), Value::U32(64)),
        ("a.u8".into(), Value::U8(7)),
        ("a.i8".into(), Value::I8(-7)),
        ("a.u16".into(), Value::U16(65535)),
        ("a.i16".into(), Value::I16(-300)),
        ("a.i32".into(), Value::I32(-70000)),
        ("a.f32".into(), Value::F32(1.5)),
        ("a.bool".into(), Value::Bool(true)),
        ("a.u64".into(), Value::U64(1 << 40)),
        ("a.i64".into(), Value::I64(-(1 << 40))),
        ("a.f64".into(), Value::F64(-2.25)),
        ("a.empty".into(), Value::Array(8, vec![])),
        (
            "a.nested".into(),
            Value::Array(
                9,
                vec![
                    Value::Array(4, vec![Value::U32(1), Value::U32(2)]),
                    Value::Array(4, vec![]),
                ],
            ),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                8,
                vec![Value::String("<s>".into()), Value::String("é".into())],
            ),
        ),
    ]
}

/// A small valid file: an F32 [2, 3] tensor and a Q8_0 [2, 64] one.
fn sample_file(path: &Path) -> Vec<u8> {
    let q8 = GgmlType::from_name("Q8_0").unwrap();
    let f32t = GgmlType::from_name("F32").unwrap();
    let mut w = GgufWriter::create(
        path,
        &sample_meta(),
        vec![
            GgufOut {
                name: "a.weight".into(),
                dims: vec![3, 2],
                ty: f32t,
            },
            GgufOut {
                name: "b.weight".into(),
                dims: vec![64, 2],
                ty: q8,
            },
        ],
    )
    .unwrap();
    let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.write("a.weight", &a).unwrap();
    w.write("b.weight", &(0..136).map(|i| i as u8).collect::<Vec<_>>())
        .unwrap();
    w.finish().unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn round_trip_keeps_every_value_and_tensor() {
    let dir = tempfile_dir();
    let p = dir.path().join("x.gguf");
    let bytes = sample_file(&p);
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.metadata, sample_meta());
    assert_eq!(f.alignment, 64);
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensors[0].shape(), vec![2, 3]);
    assert_eq!(f.tensors[1].bytes, 136);
    assert_eq!(f.tensors[1].offset, 64, "offsets padded to the alignment");
    assert_eq!(f.data(&f.tensors[0])[4..8], 1f32.to_le_bytes());
    assert_eq!(f.data(&f.tensors[1])[135], 135);
    assert_eq!(bytes.len() as u64 % 64, 0, "data padded to the alignment");
    assert!(GgufFile::sniff(&p));
}

/// A directory removed when the test ends.
fn tempfile_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn err(bytes: &[u8]) -> String {
    match parse_bytes(bytes) {
        Ok(_) => panic!("accepted a bad file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_errors_never_panics() {
    let good = sample_file(&tempfile_dir().path().join("g.gguf"));
    assert!(parse_bytes(&good).is_ok());
    // Wrong magic, wrong version.
    let mut b = good.clone();
    b[0] = b'X';
    assert!(err(&b).contains("magic"));
    let mut b = good.clone();
    b[4] = 9;
    assert!(err(&b).contains("version"));
    // Truncated anywhere before the last tensor's data ends (only the
    // trailing padding may go missing).
    let h = parse(Path::new("g"), &good).unwrap();
    let t = h.tensors.last().unwrap();
    let end = (h.data_start + t.offset + t.bytes) as usize;
    for n in 0..good.len() {
        assert_eq!(
            parse_bytes(&good[..n]).is_ok(),
            n >= end,
            "prefix of {n} bytes (data ends at {end})"
        );
    }
    // Counts that lie.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(&b).contains("cannot fit"));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err(&b).contains("cannot fit"));
    // A string length that lies.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(err(&b).contains("truncated"));
}

/// Builds a header by hand with one tensor whose fields we choose.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    put_string(&mut b, name);
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.resize(align(b.len() as u64, 32).unwrap() as usize + data, 0);
    b
}

#[test]
fn tensor_infos_that_lie_are_errors() {
    assert!(parse_bytes(&one_tensor("w", &[4, 2], 0, 0, 32)).is_ok());
    assert!(err(&one_tensor("w", &[4, 2], 0, 0, 31)).contains("truncated"));
    assert!(err(&one_tensor("w", &[4, 2], 99, 0, 32)).contains("unknown ggml type 99"));
    assert!(err(&one_tensor("w", &[4, 2], 0, 32, 64)).contains("offset 32, expected 0"));
    assert!(err(&one_tensor("w", &[33, 1], 8, 0, 64)).contains("not a multiple"));
    assert!(err(&one_tensor("w", &[1, 1, 1, 1, 1], 0, 0, 4)).contains("dimensions"));
    assert!(err(&one_tensor("w", &[u64::MAX, 4], 0, 0, 4)).contains("overflow"));
    assert!(err(&one_tensor(&"n".repeat(64), &[1], 0, 0, 4)).contains("name"));
    // A bool that is neither 0 nor 1, and arrays nested too deep.
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    put_string(&mut b, "k");
    let mut bad_bool = b.clone();
    bad_bool.extend_from_slice(&7u32.to_le_bytes());
    bad_bool.push(2);
    bad_bool.resize(64, 0);
    assert!(err(&bad_bool).contains("bool"));
    let mut deep = b.clone();
    deep.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..20 {
        deep.extend_from_slice(&9u32.to_le_bytes());
        deep.extend_from_slice(&1u64.to_le_bytes());
    }
    deep.resize(deep.len() + 64, 0);
    assert!(err(&deep).contains("deep"));
}

#[test]
fn random_mutations_never_panic() {
    let good = sample_file(&tempfile_dir().path().join("m.gguf"));
    let mut rng = crate::tools::sample::Rng::new(12345);
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] = rng.next_u64() as u8;
        }
        if rng.below(4) == 0 {
            b.truncate(rng.below(b.len()));
        }
        let _ = parse_bytes(&b);
    }
}

#[test]
fn writer_refuses_what_readers_would() {
    let dir = tempfile_dir();
    let p = dir.path().join("w.gguf");
    let q8 = GgmlType::from_name("Q8_0").unwrap();
    assert!(GgufWriter::create(
        &p,
        &[],
        vec![GgufOut {
            name: "x".into(),
            dims: vec![33],
            ty: q8
        }]
    )
    .is_err());
    assert!(GgufWriter::create(
        &p,
        &[],
        vec![GgufOut {
            name: "n".repeat(64),
            dims: vec![32],
            ty: q8
        }]
    )
    .is_err());
    let mut w = GgufWriter::create(
        &p,
        &[],
        vec![GgufOut {
            name: "x".into(),
            dims: vec![32],
            ty: q8,
        }],
    )
    .unwrap();
    assert!(w.write("x", &[0; 33]).is_err());
    drop(w);
    assert!(!p.exists(), "an unfinished writer leaves nothing");
}
