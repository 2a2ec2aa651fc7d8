//! Tests of the GGUF reader against files written by independent tools:
//! - `tests/fixtures/gguf/dequant.gguf` + `dequant_expected.safetensors`: written by gguf-py's GGUFWriter and
//!   dequantised by gguf-py (scripts/reference/gguf_dequant_fixture.py);
//! - SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh) against transformers' GGUF loading
//!   (scripts/reference/gguf_smollm2_reference.py → `smollm2_reference.{json,safetensors}`);
//! - corrupted / hostile variants of the fixture, each of which must be a clear error, never a panic.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::DType;
use safetensors::SafeTensors;

use super::reader::parse_header;
use super::*;
use crate::model::{Family, RopeScaling, TensorSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("dequant.gguf")).expect("fixture dequant.gguf")
}

fn f32s(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Fixture written by gguf-py
// ---------------------------------------------------------------------------------------------------------

#[test]
fn fixture_metadata_of_every_type() {
    use MetaValue as M;
    let f = GgufFile::open(&fixtures().join("dequant.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.architecture().unwrap(), "dequant-test");
    let s = |x: &str| M::String(x.to_string());
    let expect: Vec<(&str, MetaValue)> = vec![
        ("general.alignment", M::U32(64)),
        ("test.u8", M::U8(200)),
        ("test.i8", M::I8(-100)),
        ("test.u16", M::U16(60000)),
        ("test.i16", M::I16(-30000)),
        ("test.u32", M::U32(4_000_000_000)),
        ("test.i32", M::I32(-2_000_000_000)),
        ("test.u64", M::U64((1u64 << 63) + 5)),
        ("test.i64", M::I64(-(1i64 << 62))),
        ("test.f32", M::F32(0.1)),
        ("test.f64", M::F64(0.1)),
        ("test.bool", M::Bool(true)),
        ("test.string", s("héllo ✓")),
        (
            "test.array_i32",
            M::Array(vec![M::I32(1), M::I32(-2), M::I32(3)]),
        ),
        ("test.array_str", M::Array(vec![s("a"), s(""), s("ü")])),
        (
            "test.nested",
            M::Array(vec![M::Array(vec![s("x"), s("y")]), M::Array(vec![s("z")])]),
        ),
        (
            "test.nested_f32",
            M::Array(vec![
                M::Array(vec![M::F32(0.5)]),
                M::Array(vec![M::F32(1.5), M::F32(-2.0)]),
            ]),
        ),
    ];
    for (k, v) in &expect {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    assert_eq!(
        f.metadata().len(),
        expect.len() + 1,
        "plus general.architecture"
    );
    assert_eq!(f.tensor_infos().len(), 15);
}

#[test]
fn fixture_dequantisation_matches_gguf_py_bit_for_bit() {
    let f = GgufFile::open(&fixtures().join("dequant.gguf")).unwrap();
    let bytes = std::fs::read(fixtures().join("dequant_expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), f.tensor_infos().len());
    let mut types_seen = std::collections::BTreeSet::new();
    for info in f.tensor_infos() {
        let view = st.tensor(&info.name).unwrap();
        assert_eq!(info.shape(), view.shape().to_vec(), "{}", info.name);
        let want = f32s(&view);
        let got = f.dequantize(&info.name).unwrap();
        assert_eq!(got.len(), want.len(), "{}", info.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} [{i}]: {g} vs {w}", info.name);
        }
        types_seen.insert(info.ggml_type.name());
    }
    for t in super::types::DEQUANTISABLE {
        assert!(types_seen.contains(t.name()), "fixture lacks {t}");
    }
    // Row-range dequantisation returns the same rows.
    let info = f.tensor_info("q6_k_raw").unwrap();
    let all = f.dequantize("q6_k_raw").unwrap();
    let rows = f.dequantize_rows(info, 1, 3).unwrap();
    assert_eq!(rows, all[512..3 * 512].to_vec());
    assert!(f.dequantize_rows(info, 2, 4).is_err());
    // 1-D and 3-D shapes come back in torch order.
    assert_eq!(f.tensor_info("q8_0_1d").unwrap().shape(), vec![64]);
    assert_eq!(f.tensor_info("f32_3d").unwrap().shape(), vec![2, 3, 4]);
}

#[test]
fn unsupported_architecture_is_named() {
    let e = GgufSource::open(&fixtures().join("dequant.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unsupported GGUF architecture `dequant-test`"),
        "{e}"
    );
    assert!(
        e.contains("llama, qwen2, qwen3, phi3, gemma, gemma2"),
        "{e}"
    );
    assert!(e.contains("dequant.gguf"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// Real model: SmolLM2-135M-Instruct Q4_1, against transformers' GGUF loading
// ---------------------------------------------------------------------------------------------------------

fn smollm2() -> PathBuf {
    let p = std::env::var_os("LORATUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh (or set LORATUNE_SMOLLM2_GGUF to the file)",
        p.display()
    );
    p
}

#[test]
fn smollm2_config_matches_transformers() {
    let src = GgufSource::open(&smollm2()).unwrap();
    let c = src.config();
    let text = std::fs::read_to_string(fixtures().join("smollm2_reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str| r[k].as_u64().unwrap() as usize;
    assert_eq!(c.family, Family::Llama);
    assert_eq!(r["model_type"], "llama");
    assert_eq!(c.hidden_size, u("hidden_size"));
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_hidden_layers, u("num_hidden_layers"));
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (9, 3));
    assert_eq!(c.num_attention_heads, u("num_attention_heads"));
    assert_eq!(c.num_key_value_heads, u("num_key_value_heads"));
    assert_eq!(c.head_dim, u("head_dim"));
    assert_eq!(c.intermediate_size, u("intermediate_size"));
    assert_eq!(c.vocab_size, u("vocab_size"));
    assert_eq!(c.max_position_embeddings, u("max_position_embeddings"));
    assert_eq!(c.rope.theta, r["rope_theta"].as_f64().unwrap());
    assert_eq!(c.rope.theta, 100000.0);
    assert_eq!(c.rope.scaling, RopeScaling::Default);
    assert_eq!(c.rope.partial_rotary_factor, 1.0);
    // transformers widens the stored f32 directly (9.9999997e-6); we recover the decimal 1e-5.
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!((c.rms_norm_eps - r["rms_norm_eps"].as_f64().unwrap()).abs() < 1e-12);
    assert!(c.tie_word_embeddings);
    assert_eq!(r["tie_word_embeddings"], true);
    assert_eq!(
        c.bos_token_id,
        Some(r["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        c.eos_token_ids,
        vec![r["eos_token_id"].as_u64().unwrap() as u32]
    );
    assert_eq!(
        c.pad_token_id,
        Some(r["pad_token_id"].as_u64().unwrap() as u32)
    );
    assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm());
    assert!(c.layer_windows.iter().all(Option::is_none));
    assert!(c.raw.is_none());
    // Every weight is there under its HF name; transformers' state dict adds only the tied lm_head.
    let names = src.names();
    assert_eq!(names.len() + 1, u("num_tensors"));
    assert!(names.contains(&"model.layers.29.mlp.down_proj.weight".to_string()));
    assert!(!names.contains(&"lm_head.weight".to_string()));
    assert_eq!(
        src.shape("model.layers.0.self_attn.k_proj.weight"),
        Some(vec![192, 576])
    );
    assert_eq!(
        src.shape("model.embed_tokens.weight"),
        Some(vec![49152, 576])
    );
    assert_eq!(
        src.stored_dtype("model.layers.0.self_attn.q_proj.weight")
            .map(|d| d.to_string()),
        Some("Q4_1".to_string())
    );
    assert_eq!(
        src.stored_dtype("model.embed_tokens.weight")
            .map(|d| d.to_string()),
        Some("Q8_0".to_string())
    );
    // Metadata for the tokenizer is reachable.
    let md = src.file().metadata();
    assert_eq!(md["tokenizer.ggml.model"].as_str(), Some("gpt2"));
    assert_eq!(md["tokenizer.ggml.pre"].as_str(), Some("smollm"));
    assert_eq!(
        md["tokenizer.ggml.tokens"].as_array().map(<[_]>::len),
        Some(49152)
    );
    assert!(md["tokenizer.chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

#[test]
fn smollm2_tensors_match_transformers() {
    let src = GgufSource::open(&smollm2()).unwrap();
    let bytes = std::fs::read(fixtures().join("smollm2_reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    let mut max_diff = 0f32;
    for (key, view) in st.tensors() {
        if key.starts_with("__") {
            continue; // forward references, see smollm2_logits_match_transformers
        }
        let mut parts = key.split('|');
        let name = parts.next().unwrap();
        let range = |s: &str| {
            let (a, b) = s.split_once(':').unwrap();
            (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap())
        };
        let (r0, r1) = range(parts.next().unwrap());
        let cols = parts.next().map(range);
        let (data, shape) = src.load_f32(name).unwrap();
        let want = f32s(&view);
        let got: Vec<f32> = match cols {
            None => data[r0..r1].to_vec(),
            Some((c0, c1)) => {
                let w = shape[1];
                (r0..r1)
                    .flat_map(|r| data[r * w + c0..r * w + c1].to_vec())
                    .collect()
            }
        };
        assert_eq!(got.len(), want.len(), "{key}");
        for (g, w) in got.iter().zip(&want) {
            max_diff = max_diff.max((g - w).abs());
            assert!((g - w).abs() <= 1e-6, "{key}: {g} vs {w}");
        }
        checked += 1;
    }
    assert_eq!(checked, 14);
    eprintln!("smollm2: {checked} slices match transformers, max |Δ| = {max_diff:e}");

    // Without the un-permutation q_proj would differ: the check above is sensitive to it.
    let f = src.file();
    let raw = f.dequantize("blk.0.attn_q.weight").unwrap();
    let (hf, _) = src
        .load_f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_ne!(raw, hf);

    // TensorSource::load in f32 equals load_f32; bf16 rounds it.
    let t = src
        .load("model.layers.0.self_attn.k_proj.weight", DType::F32)
        .unwrap();
    assert_eq!(t.shape.to_vec(), vec![192, 576]);
    let (k, _) = src
        .load_f32("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), k);
    let tb = src.load("model.norm.weight", DType::BF16).unwrap();
    let (n, _) = src.load_f32("model.norm.weight").unwrap();
    let nb: Vec<half::bf16> = tb.to_vec().unwrap();
    assert_eq!(
        nb,
        n.iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect::<Vec<_>>()
    );
    let e = src
        .load("lm_head.weight", DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head.weight") && e.contains("SmolLM2"), "{e}");
}

/// Open + dequantise every tensor to f32 (what loading the model costs). Prints the time; run this test
/// alone under `/usr/bin/time -v` for the peak RSS.
#[test]
fn smollm2_dequantise_everything() {
    let t0 = Instant::now();
    let src = GgufSource::open(&smollm2()).unwrap();
    let opened = t0.elapsed();
    let mut loading = std::time::Duration::ZERO;
    let mut n = 0usize;
    let mut sum = 0f64;
    for name in src.names() {
        let t1 = Instant::now();
        let t = src.load(&name, DType::F32).unwrap();
        loading += t1.elapsed();
        let v: &[f32] = t.as_slice().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        sum += v.iter().map(|&x| x as f64).sum::<f64>();
        n += v.len();
    }
    assert_eq!(n, src.config().num_parameters());
    eprintln!(
        "smollm2: open {:.1} ms; dequantise {} tensors ({n} values) to f32: {:.0} ms; open + dequantise: {:.0} ms (checksum {sum:.3})",
        opened.as_secs_f64() * 1e3,
        src.names().len(),
        loading.as_secs_f64() * 1e3,
        (opened + loading).as_secs_f64() * 1e3
    );
}

// ---------------------------------------------------------------------------------------------------------
// Robustness: corrupted and hostile files
// ---------------------------------------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in fixture", String::from_utf8_lossy(needle)))
}

/// Byte position just after a length-prefixed string `s` in the header.
fn after_string(buf: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    find(buf, &needle) + needle.len()
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Parse in memory; the error text must name the file and contain every `needles` entry.
fn parse_err(buf: &[u8], needles: &[&str]) -> String {
    let path = Path::new("/data/hostile.gguf");
    let e = match parse_header(buf, path) {
        Ok(_) => panic!("parsed a corrupt file (expected an error with {needles:?})"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/data/hostile.gguf"), "{e}");
    for n in needles {
        assert!(e.contains(n), "expected `{n}` in: {e}");
    }
    e
}

/// Where a tensor's info fields start: (n_dims position).
fn tensor_info_pos(buf: &[u8], name: &str) -> usize {
    after_string(buf, name)
}

#[test]
fn truncated_files_are_errors_at_every_cut() {
    let buf = fixture_bytes();
    let h = parse_header(&buf, Path::new("x")).unwrap();
    let data_end = h
        .tensors
        .iter()
        .map(|t| h.data_offset + t.offset + t.n_bytes)
        .max()
        .unwrap() as usize;
    for cut in 0..data_end {
        let e = match parse_header(&buf[..cut], Path::new("/data/cut.gguf")) {
            Ok(_) => panic!("truncated at {cut} of {} parsed", buf.len()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("/data/cut.gguf"), "{e}");
        assert!(
            e.contains("truncated") || e.contains("cannot fit") || e.contains("exceeds"),
            "cut {cut}: {e}"
        );
    }
    // Padding after the last tensor is not needed.
    for cut in data_end..=buf.len() {
        parse_header(&buf[..cut], Path::new("x")).unwrap();
    }
    // Through the file API too, for a few cuts (including an empty file).
    let dir = tempfile::tempdir().unwrap();
    for cut in [0, 3, 23, 24, 100, h.data_offset as usize - 1, data_end - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &buf[..cut]).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains(&format!("cut{cut}.gguf")), "{e}");
        assert!(e.contains("truncated") || e.contains("cannot fit"), "{e}");
    }
}

#[test]
fn wrong_magic_version_and_endianness() {
    let buf = fixture_bytes();
    let mut b = buf.clone();
    b[..4].copy_from_slice(b"GGML");
    parse_err(&b, &["not a GGUF file"]);
    let mut b = buf.clone();
    b[..8].copy_from_slice(b"{\"__meta");
    parse_err(&b, &["not a GGUF file"]);
    let mut b = buf.clone();
    put_u32(&mut b, 4, 1);
    parse_err(&b, &["version 1 is not supported"]);
    let mut b = buf.clone();
    put_u32(&mut b, 4, 7);
    parse_err(&b, &["unsupported GGUF version 7"]);
    let mut b = buf.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    parse_err(&b, &["big-endian"]);
}

#[test]
fn absurd_counts_and_lengths() {
    let buf = fixture_bytes();
    let mut b = buf.clone();
    put_u64(&mut b, 8, 1 << 60);
    parse_err(&b, &["1152921504606846976 tensor infos cannot fit"]);
    let mut b = buf.clone();
    put_u64(&mut b, 16, u64::MAX);
    parse_err(&b, &["metadata entries cannot fit"]);
    // First key's length.
    let mut b = buf.clone();
    put_u64(&mut b, 24, 1 << 60);
    parse_err(
        &b,
        &[
            "string length 1152921504606846976",
            "key of metadata entry #0",
        ],
    );
    // A string value's length.
    let mut b = buf.clone();
    let at = after_string(&buf, "test.string") + 4;
    put_u64(&mut b, at, u64::MAX);
    parse_err(&b, &["string length", "test.string"]);
    // An array's element count.
    let mut b = buf.clone();
    let at = after_string(&buf, "test.array_i32") + 8;
    put_u64(&mut b, at, 1 << 40);
    parse_err(&b, &["array of 1099511627776 elements", "test.array_i32"]);
    // An unknown value type and array element type.
    let mut b = buf.clone();
    let at = after_string(&buf, "test.u8");
    put_u32(&mut b, at, 13);
    parse_err(&b, &["unknown value type 13", "test.u8"]);
    let mut b = buf.clone();
    let at = after_string(&buf, "test.array_i32") + 4;
    put_u32(&mut b, at, 99);
    parse_err(&b, &["unknown array element type 99", "test.array_i32"]);
    // A bool that is neither 0 nor 1.
    let mut b = buf.clone();
    let at = after_string(&buf, "test.bool") + 4;
    b[at] = 7;
    parse_err(&b, &["bool value must be 0 or 1", "test.bool"]);
    // Invalid UTF-8 in a string.
    let mut b = buf.clone();
    let at = after_string(&buf, "test.string") + 4 + 8;
    b[at] = 0xFF;
    parse_err(&b, &["not valid UTF-8", "test.string"]);
    // Bad alignment.
    let mut b = buf.clone();
    let at = after_string(&buf, "general.alignment") + 4;
    put_u32(&mut b, at, 48);
    parse_err(&b, &["general.alignment", "power of two"]);
    // Duplicate key: rename test.i8 to test.u8.
    let mut b = buf.clone();
    let at = after_string(&buf, "test.i8") - 2;
    b[at] = b'u';
    parse_err(&b, &["`test.u8` appears twice"]);
}

#[test]
fn hostile_tensor_infos() {
    let buf = fixture_bytes();
    let pos = tensor_info_pos(&buf, "q4_k_raw"); // n_dims u32, ne0 u64, ne1 u64, type u32, offset u64
    let (ne0, ne1, ty, off) = (pos + 4, pos + 12, pos + 20, pos + 24);
    // Offset beyond EOF, and an offset that overflows when added to the data start.
    for bad in [1u64 << 40, u64::MAX - 8] {
        let mut b = buf.clone();
        put_u64(&mut b, off, bad);
        parse_err(&b, &["tensor `q4_k_raw`", "runs past the end"]);
    }
    // Dims whose product overflows.
    let mut b = buf.clone();
    put_u64(&mut b, ne0, 1 << 40);
    put_u64(&mut b, ne1, 1 << 40);
    parse_err(&b, &["tensor `q4_k_raw`", "overflow"]);
    // Huge but non-overflowing dims: the size check catches them.
    let mut b = buf.clone();
    put_u64(&mut b, ne1, 1 << 30);
    parse_err(&b, &["tensor `q4_k_raw`", "runs past the end"]);
    // Row not a whole number of blocks.
    let mut b = buf.clone();
    put_u64(&mut b, ne0, 100);
    parse_err(
        &b,
        &[
            "tensor `q4_k_raw`",
            "not a multiple of the 256-element block",
        ],
    );
    // Too many dims.
    let mut b = buf.clone();
    put_u32(&mut b, pos, 5);
    parse_err(&b, &["tensor `q4_k_raw`", "5 dimensions"]);
    let mut b = buf.clone();
    put_u32(&mut b, pos, u32::MAX);
    parse_err(&b, &["tensor `q4_k_raw`", "dimensions"]);
    // Unknown ggml type id.
    let mut b = buf.clone();
    put_u32(&mut b, ty, 99);
    parse_err(&b, &["tensor `q4_k_raw`", "unknown ggml type id 99"]);
    // Duplicate tensor name: rename q4_0_raw to q4_1_raw.
    let mut b = buf.clone();
    let at = after_string(&buf, "q4_0_raw") - 5;
    b[at] = b'1';
    parse_err(&b, &["tensor `q4_1_raw` appears twice"]);
}

#[test]
fn tensor_offsets_must_tile_the_data_region() {
    // llama.cpp's rule: each tensor starts at the aligned running sum of the sizes before it. Take a tensor in
    // the middle (neither first nor last) and move its offset: onto the previous tensor, off the alignment, and
    // one alignment further (a gap). Each is an error naming the tensor.
    let buf = fixture_bytes();
    let h = parse_header(&buf, Path::new("/data/ok.gguf")).unwrap();
    assert!(h.tensors.len() >= 3);
    let t = &h.tensors[1];
    let pos = tensor_info_pos(&buf, &t.name) + 4 + 8 * t.dims.len() + 4;
    assert_eq!(
        u64::from_le_bytes(buf[pos..pos + 8].try_into().unwrap()),
        t.offset
    );
    let name = format!("tensor `{}`", t.name);
    for (off, why) in [
        (h.tensors[0].offset, "overlaps"),
        (t.offset + 1, "not a multiple of the 64-byte alignment"),
        (t.offset + h.alignment, "gap"),
    ] {
        let mut b = buf.clone();
        put_u64(&mut b, pos, off);
        parse_err(&b, &[&name, why]);
    }
}

#[test]
fn absurd_model_counts_in_metadata_are_refused_before_allocating() {
    // `{arch}.block_count` = 2^31 − 1 once asked for a 68 GB vector of per-layer settings.
    let path = fixtures().join("families/llama.gguf");
    let buf = std::fs::read(&path).unwrap();
    let at = after_string(&buf, "llama.block_count");
    assert_eq!(
        u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()),
        4,
        "u32 value"
    );
    for (n, needle) in [((1u32 << 31) - 1, "2147483647"), (513, "513")] {
        let mut b = buf.clone();
        put_u32(&mut b, at + 4, n);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, &b).unwrap();
        let e = GgufSource::open(&p).unwrap_err().to_string();
        for want in ["llama.block_count", needle, "512"] {
            assert!(e.contains(want), "expected `{want}` in: {e}");
        }
    }
    let at = after_string(&buf, "llama.embedding_length");
    let mut b = buf.clone();
    put_u32(&mut b, at + 4, u32::MAX);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, &b).unwrap();
    let e = GgufSource::open(&p).unwrap_err().to_string();
    assert!(e.contains("embedding_length") && e.contains("65536"), "{e}");
}

#[test]
fn known_but_unsupported_tensor_type_errors_at_load() {
    // Retag the Q4_0 tensor (18-byte blocks of 32) as IQ4_NL, which has the same block size but which we do
    // not dequantise: the file opens (metadata stays readable), loading names the tensor and the type.
    let buf = fixture_bytes();
    let mut b = buf.clone();
    let pos = tensor_info_pos(&buf, "q4_0_raw");
    put_u32(&mut b, pos + 20, GgmlType::IQ4_NL.id());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq4.gguf");
    std::fs::write(&p, &b).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let e = f.dequantize("q4_0_raw").unwrap_err().to_string();
    assert!(
        e.contains("q4_0_raw") && e.contains("IQ4_NL") && e.contains("iq4.gguf"),
        "{e}"
    );
    assert!(
        e.contains("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"),
        "{e}"
    );
    let e = f.dequantize("nope").unwrap_err().to_string();
    assert!(e.contains("no tensor named `nope`"), "{e}");
}

/// A minimal GGUF v3 header with one metadata entry whose value bytes are given.
fn one_kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(value);
    b
}

#[test]
fn deeply_nested_arrays_are_refused_without_overflowing_the_stack() {
    // 100 000 nested single-element arrays: without a depth limit the recursion would overflow the stack.
    let depth = 100_000;
    let mut v = Vec::with_capacity(depth * 12 + 1);
    for _ in 0..depth {
        v.extend_from_slice(&9u32.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    v.extend_from_slice(&0u32.to_le_bytes());
    let b = one_kv("deep", 9, &v);
    parse_err(&b, &["nested more than 16 deep", "deep"]);
    // Moderate nesting is fine.
    let mut v = Vec::new();
    for _ in 0..3 {
        v.extend_from_slice(&9u32.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    v.extend_from_slice(&0u32.to_le_bytes()); // innermost element type u8
    v.extend_from_slice(&1u64.to_le_bytes());
    v.push(42);
    let b = one_kv("ok", 9, &v);
    let h = parse_header(&b, Path::new("x")).unwrap();
    let mut x = &h.metadata["ok"];
    for _ in 0..3 {
        x = &x.as_array().unwrap()[0];
    }
    assert_eq!(x.as_array().unwrap(), &[MetaValue::U8(42)]);
}

#[test]
fn many_tiny_values_are_capped() {
    // An array of 20 M u8 values (20 MB) fits in the file but would cost ~640 MB as MetaValues: refused.
    let n = 20_000_000u64;
    let mut v = 0u32.to_le_bytes().to_vec();
    v.extend_from_slice(&n.to_le_bytes());
    v.resize(v.len() + n as usize, 1);
    let b = one_kv("big", 9, &v);
    parse_err(&b, &["array of 20000000 elements is larger than"]);
}

#[test]
fn random_corruption_never_panics() {
    // Flip random header bytes (deterministic LCG); any outcome but a panic is acceptable.
    let buf = fixture_bytes();
    let h = parse_header(&buf, Path::new("x")).unwrap();
    let header_len = h.data_offset as usize;
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut errors = 0;
    for _ in 0..3000 {
        let mut b = buf.clone();
        for _ in 0..1 + next() % 4 {
            let at = next() % header_len;
            b[at] = next() as u8;
        }
        match parse_header(&b, Path::new("x")) {
            Ok(h) => {
                // Whatever parsed must be readable within bounds.
                for t in &h.tensors {
                    assert!(h.data_offset + t.offset + t.n_bytes <= b.len() as u64);
                }
            }
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 100, "only {errors} corruptions detected");
}

// ---------------------------------------------------------------------------------------------------------
// Every family, converted by llama.cpp's own convert_hf_to_gguf.py from random HF models
// (scripts/reference/gguf_families_fixture.py)
// ---------------------------------------------------------------------------------------------------------

const VARIANTS: &[&str] = &[
    "llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
];

fn assert_same_config(variant: &str, g: &crate::model::ModelConfig, h: &crate::model::ModelConfig) {
    // GGUF has one `llama` architecture for Llama and Mistral.
    let want_family = if h.family == Family::Mistral {
        Family::Llama
    } else {
        h.family
    };
    assert_eq!(g.family, want_family, "{variant}");
    assert_eq!(g.vocab_size, h.vocab_size, "{variant} vocab_size");
    assert_eq!(g.hidden_size, h.hidden_size, "{variant} hidden_size");
    assert_eq!(
        g.intermediate_size, h.intermediate_size,
        "{variant} intermediate_size"
    );
    assert_eq!(g.num_hidden_layers, h.num_hidden_layers, "{variant} layers");
    assert_eq!(
        g.num_attention_heads, h.num_attention_heads,
        "{variant} heads"
    );
    assert_eq!(
        g.num_key_value_heads, h.num_key_value_heads,
        "{variant} kv heads"
    );
    assert_eq!(g.head_dim, h.head_dim, "{variant} head_dim");
    assert_eq!(
        g.max_position_embeddings, h.max_position_embeddings,
        "{variant} max_pos"
    );
    assert_eq!(g.rms_norm_eps, h.rms_norm_eps, "{variant} eps");
    assert_eq!(g.rope, h.rope, "{variant} rope");
    assert_eq!(g.rope_inv_freq(), h.rope_inv_freq(), "{variant} inv_freq");
    assert_eq!(g.hidden_act, h.hidden_act, "{variant} act");
    assert_eq!(
        g.tie_word_embeddings, h.tie_word_embeddings,
        "{variant} tie"
    );
    assert_eq!(
        (g.qkv_bias, g.o_bias, g.mlp_bias),
        (h.qkv_bias, h.o_bias, h.mlp_bias),
        "{variant} biases"
    );
    assert_eq!(g.qk_norm(), h.qk_norm(), "{variant} qk_norm");
    assert_eq!(g.layer_windows, h.layer_windows, "{variant} windows");
    assert_eq!(
        g.attn_logit_softcapping, h.attn_logit_softcapping,
        "{variant} attn softcap"
    );
    assert_eq!(
        g.final_logit_softcapping, h.final_logit_softcapping,
        "{variant} final softcap"
    );
    assert_eq!(
        g.query_pre_attn_scalar, h.query_pre_attn_scalar,
        "{variant} query_pre_attn_scalar"
    );
    assert_eq!(
        g.num_parameters(),
        h.num_parameters(),
        "{variant} parameter count"
    );
}

#[test]
fn families_config_matches_the_hf_config_json() {
    let dir = fixtures().join("families");
    for v in VARIANTS {
        let src =
            GgufSource::open(&dir.join(format!("{v}.gguf"))).unwrap_or_else(|e| panic!("{v}: {e}"));
        let hf =
            crate::model::ModelConfig::from_file(&dir.join(format!("{v}.config.json"))).unwrap();
        assert_same_config(v, src.config(), &hf);
    }
    // Spot checks that the comparison above is not vacuous.
    let cfg = |v: &str| {
        GgufSource::open(&dir.join(format!("{v}.gguf")))
            .unwrap()
            .config()
            .clone()
    };
    assert!(
        matches!(cfg("llama3").rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0)
    );
    assert_eq!(cfg("phi3").rope.partial_rotary_factor, 0.5);
    assert_eq!(cfg("phi3").layer_windows, vec![Some(256)]);
    assert_eq!(cfg("gemma2").layer_windows, vec![Some(128), None]);
    assert_eq!(cfg("gemma2").attn_logit_softcapping, Some(40.0));
    assert_eq!(cfg("qwen3").head_dim, 16);
    assert!(cfg("llama").qkv_bias && cfg("llama").mlp_bias);
}

#[test]
fn families_tensors_match_the_hf_weights() {
    let dir = fixtures().join("families");
    for v in VARIANTS {
        let src = GgufSource::open(&dir.join(format!("{v}.gguf"))).unwrap();
        let bytes = std::fs::read(dir.join(format!("{v}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut want_names: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !n.starts_with("__"))
            .map(str::to_string)
            .collect();
        want_names.sort();
        assert_eq!(src.names(), want_names, "{v}: tensor names");
        let (mut exact, mut close) = (0, 0);
        for name in &want_names {
            let view = st.tensor(name).unwrap();
            let want = f32s(&view);
            let (got, shape) = src.load_f32(name).unwrap();
            assert_eq!(shape, view.shape().to_vec(), "{v} {name}");
            if got == want {
                exact += 1;
                continue;
            }
            // Only Gemma norms ((w + 1) − 1 in f32) may differ, by rounding.
            assert!(
                src.config().family.rules().gemma_norms && name.ends_with("norm.weight"),
                "{v} {name} differs"
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 2e-7, "{v} {name}: {g} vs {w}");
            }
            close += 1;
        }
        eprintln!(
            "{v}: {} tensors, {exact} bit-exact, {close} within 2e-7",
            want_names.len()
        );
        // The fix-ups matter: without them these tensors would differ.
        let f = src.file();
        if v.starts_with("llama") || *v == "mistral" {
            let raw = f.dequantize("blk.0.attn_k.weight").unwrap();
            assert_ne!(
                raw,
                src.load_f32("model.layers.0.self_attn.k_proj.weight")
                    .unwrap()
                    .0,
                "{v}"
            );
        }
        if v.starts_with("gemma") {
            let raw = f.dequantize("output_norm.weight").unwrap();
            let (hf, _) = src.load_f32("model.norm.weight").unwrap();
            assert!(
                raw.iter().zip(&hf).all(|(r, h)| (r - h - 1.0).abs() < 1e-6),
                "{v}"
            );
        }
    }
}

#[test]
fn families_name_mapping_round_trips_on_real_files() {
    let dir = fixtures().join("families");
    for v in VARIANTS {
        let src = GgufSource::open(&dir.join(format!("{v}.gguf"))).unwrap();
        let fam = src.config().family;
        for info in src.file().tensor_infos() {
            if super::tensors::CONFIG_TENSORS.contains(&info.name.as_str()) {
                continue;
            }
            let hf = super::tensors::hf_name(fam, &info.name).unwrap();
            assert_eq!(
                super::tensors::gguf_name(fam, &hf).as_deref(),
                Some(info.name.as_str())
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// End to end: the decoder on GGUF-loaded weights against transformers' logits
// ---------------------------------------------------------------------------------------------------------

type Cpu = burn::backend::Flex;

fn ref_f32(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    f32s(&st.tensor(name).unwrap())
}

fn ref_ids(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::I64);
    v.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn logits_of(src: &GgufSource, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let model = crate::model::CausalLm::<Cpu>::load(src.config().clone(), src, &device, DType::F32)
        .unwrap_or_else(|e| panic!("{}: {e}", src.origin()));
    let batch = crate::model::TokenBatch::from_rows(&[ids.to_vec()], None);
    model
        .forward(&batch)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

#[test]
fn families_logits_match_transformers() {
    let dir = fixtures().join("families");
    for v in VARIANTS {
        let src = GgufSource::open(&dir.join(format!("{v}.gguf"))).unwrap();
        let bytes = std::fs::read(dir.join(format!("{v}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let ids = ref_ids(&st, "__input_ids");
        let want = ref_f32(&st, "__logits");
        let got = logits_of(&src, &ids);
        assert_eq!(got.len(), want.len(), "{v}");
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{v}: GGUF-loaded logits vs transformers: max |Δ| = {d:.2e}");
        assert!(d <= 1e-4, "{v}: max |Δlogit| = {d}");
    }
}

#[test]
fn smollm2_logits_match_transformers() {
    let src = GgufSource::open(&smollm2()).unwrap();
    let bytes = std::fs::read(fixtures().join("smollm2_reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = ref_ids(&st, "__input_ids");
    let argmax = ref_ids(&st, "__argmax");
    let head = ref_f32(&st, "__logits_head");
    let last = ref_f32(&st, "__logits_last");
    let lse = ref_f32(&st, "__logsumexp");
    let got = logits_of(&src, &ids);
    let v = src.config().vocab_size;
    let s = ids.len();
    assert_eq!(got.len(), s * v);
    let mut d = 0f32;
    for p in 0..s {
        let row = &got[p * v..(p + 1) * v];
        for (a, b) in row[..256].iter().zip(&head[p * 256..(p + 1) * 256]) {
            d = d.max((a - b).abs());
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let l = m as f64
            + row
                .iter()
                .map(|&x| ((x - m) as f64).exp())
                .sum::<f64>()
                .ln();
        d = d.max((l as f32 - lse[p]).abs());
        let am = row
            .iter()
            .enumerate()
            .fold(0, |best, (i, &x)| if x > row[best] { i } else { best });
        assert_eq!(am as u32, argmax[p], "position {p}: greedy token");
    }
    for (a, b) in got[(s - 1) * v..(s - 1) * v + 4096].iter().zip(&last) {
        d = d.max((a - b).abs());
    }
    eprintln!(
        "smollm2: {s}-token ChatML prompt, GGUF-loaded logits vs transformers: max |Δ| = {d:.2e}"
    );
    assert!(d <= 1e-3, "max |Δlogit| = {d}");
    // transformers' greedy answer starts with "The" (id 504 in SmolLM2's vocabulary).
    assert_eq!(argmax[s - 1], 504);
}
