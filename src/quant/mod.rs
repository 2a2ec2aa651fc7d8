//! Quantized frozen weights: a base model's linear and embedding matrices kept in their storage format
//! ([`QMatrix`]) and dequantized a tile of rows at a time where a kernel reads them, never cached dense.
//!
//! | format | where it comes from | block | bits/weight |
//! |---|---|---|---|
//! | GGUF `Q4_0`, `Q4_1`, `Q8_0`, `Q4_K`, `Q5_K`, `Q6_K` | a `.gguf` base, kept as stored (`base_quantization: keep`) | 32 / 256 along a row | 4.5–8.5 |
//! | NF4 (+ double quantization) | an HF folder with `load_in_4bit` / `adapter: qlora`, or a pre-quantized bitsandbytes checkpoint | 64 over the flat tensor ([`nf4`]) | 4.13 (4.5 without DQ) |
//! | `Q8_0` blocks | an HF folder with `load_in_8bit` | 32 | 8.5 |
//!
//! A weight is `[out, in]` in torch layout; every format stores it row-major (a GGUF row is a whole number of
//! blocks; NF4 blocks run over the flattened tensor), so rows `r0..r1` decode on their own
//! ([`QMatrix::dequant_rows`]). [`Frozen`] is what the model holds for a frozen matrix: dense on the backend, or
//! quantized on the host with the compute dtype and device it dequantizes to.

pub mod nf4;

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::gguf::dequant::dequantize_into;
use crate::gguf::GgmlType;
use crate::names::named_enum;

/// The GGUF block types a quantized base may keep.
pub const KEPT_GGML: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// What a dense (f32/f16/bf16) base matrix is quantized to when loaded (`load_in_4bit` / `load_in_8bit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantScheme {
    /// bitsandbytes NF4, block 64, with or without double quantization of the absmax values.
    Nf4 { double: bool },
    /// Int8 in `Q8_0` blocks (32 weights, one f16 scale).
    Int8,
}

impl std::fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantScheme::Nf4 { double: true } => write!(f, "NF4+DQ"),
            QuantScheme::Nf4 { double: false } => write!(f, "NF4"),
            QuantScheme::Int8 => write!(f, "Q8_0"),
        }
    }
}

named_enum! {
    /// `base_quantization`: what a base whose checkpoint stores quantized matrices (GGUF blocks, bitsandbytes NF4)
    /// is held as.
    pub enum BaseQuantization ("base quantization") {
        /// Keep the stored blocks; kernels dequantize a tile at a time (the default: it saves memory).
        Keep = "keep",
        /// Dequantize every matrix at load time to the compute dtype.
        Dequantize = "dequantize" | "dequantise",
    }
    reject {}
}

named_enum! {
    /// `bnb_4bit_quant_type`: the 4-bit code of `load_in_4bit`.
    pub enum Bnb4bitQuantType ("4-bit quant type") {
        /// bitsandbytes NF4 (QLoRA).
        Nf4 = "nf4",
    }
    reject {
        "fp4" => "FP4 is not implemented; use `bnb_4bit_quant_type: nf4` (QLoRA's format, the better of the two)",
    }
}

named_enum! {
    /// `bnb_4bit_compute_dtype`, accepted for Axolotl configs: the compute dtype is the run's (`bf16`).
    pub enum Bnb4bitComputeDtype ("compute dtype") {
        Float32 = "float32" | "fp32" | "f32",
        Bfloat16 = "bfloat16" | "bf16",
        Float16 = "float16" | "fp16" | "f16",
    }
    reject {}
}

/// How a run holds its frozen base: which matrices stay or become quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasePlan {
    /// Matrices the checkpoint stores quantized (GGUF blocks, bitsandbytes NF4) stay as stored
    /// (`base_quantization: keep`); otherwise they are dequantized to the compute dtype.
    pub keep_stored: bool,
    /// Dense decoder-layer linear weights are quantized to this when loaded (`load_in_4bit` / `load_in_8bit`).
    /// As in transformers + bitsandbytes, `lm_head` and the embeddings stay dense.
    pub quantize: Option<QuantScheme>,
}

impl BasePlan {
    /// Everything dense in the compute dtype.
    pub const DENSE: BasePlan = BasePlan {
        keep_stored: false,
        quantize: None,
    };
    /// Keep what the checkpoint stores quantized; quantize nothing else.
    pub const KEEP: BasePlan = BasePlan {
        keep_stored: true,
        quantize: None,
    };
}

enum Data {
    Ggml { ty: GgmlType, blocks: Vec<u8> },
    Nf4(nf4::Nf4),
}

/// A quantized `[rows, cols]` matrix on the host.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    data: Data,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({} [{}, {}], {} bytes)",
            self.format(),
            self.rows,
            self.cols,
            self.bytes()
        )
    }
}

/// NF4's block size (bitsandbytes' default, what transformers uses).
pub const NF4_BLOCK: usize = 64;

impl QMatrix {
    /// GGUF blocks as stored: `rows` rows of `cols` elements, each row a whole number of `ty` blocks.
    pub fn ggml(ty: GgmlType, rows: usize, cols: usize, blocks: Vec<u8>) -> Result<Self, String> {
        if !KEPT_GGML.contains(&ty) {
            return Err(format!(
                "{ty} cannot be kept quantized (kept: {}); use `base_quantization: dequantize`",
                KEPT_GGML
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(format!(
                "rows of {cols} elements are not a whole number of {ty} blocks ({})",
                ty.block_size()
            ));
        }
        let want = rows * cols / ty.block_size() * ty.type_size();
        if blocks.len() != want {
            return Err(format!(
                "{} bytes for a [{rows}, {cols}] {ty} matrix (expected {want})",
                blocks.len()
            ));
        }
        Ok(QMatrix {
            rows,
            cols,
            data: Data::Ggml { ty, blocks },
        })
    }

    /// An NF4 tensor holding a `[rows, cols]` matrix.
    pub fn nf4(rows: usize, cols: usize, q: nf4::Nf4) -> Result<Self, String> {
        if q.numel != rows * cols {
            return Err(format!(
                "NF4 data of {} elements for a [{rows}, {cols}] matrix",
                q.numel
            ));
        }
        Ok(QMatrix {
            rows,
            cols,
            data: Data::Nf4(q),
        })
    }

    /// Quantize a dense row-major `[rows, cols]` matrix.
    pub fn quantize(
        values: &[f32],
        rows: usize,
        cols: usize,
        scheme: QuantScheme,
    ) -> Result<Self, String> {
        if values.len() != rows * cols {
            return Err(format!(
                "{} values for a [{rows}, {cols}] matrix",
                values.len()
            ));
        }
        match scheme {
            QuantScheme::Nf4 { double } => {
                Self::nf4(rows, cols, nf4::Nf4::quantize(values, NF4_BLOCK, double))
            }
            QuantScheme::Int8 => {
                let blocks = crate::gguf::quant::quantize(GgmlType::Q8_0, values, cols)?;
                Self::ggml(GgmlType::Q8_0, rows, cols, blocks)
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format's name (`Q4_K`, `NF4+DQ`, …).
    pub fn format(&self) -> String {
        match &self.data {
            Data::Ggml { ty, .. } => ty.name().to_string(),
            Data::Nf4(q) => QuantScheme::Nf4 {
                double: matches!(q.absmax, nf4::Absmax::Double { .. }),
            }
            .to_string(),
        }
    }

    /// The GGUF type, when the matrix holds GGUF blocks (what a GGUF export can copy unchanged).
    pub fn ggml_type(&self) -> Option<GgmlType> {
        match &self.data {
            Data::Ggml { ty, .. } => Some(*ty),
            Data::Nf4(_) => None,
        }
    }

    /// The GGUF blocks as stored (`None` for NF4): what a device copy uploads.
    pub fn ggml_blocks(&self) -> Option<(GgmlType, &[u8])> {
        match &self.data {
            Data::Ggml { ty, blocks } => Some((*ty, blocks)),
            Data::Nf4(_) => None,
        }
    }

    /// The NF4 data, if the matrix is NF4.
    pub fn nf4_data(&self) -> Option<&nf4::Nf4> {
        match &self.data {
            Data::Ggml { .. } => None,
            Data::Nf4(q) => Some(q),
        }
    }

    /// Resident bytes of the quantized data.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Ggml { blocks, .. } => blocks.len(),
            Data::Nf4(q) => q.bytes(),
        }
    }

    /// Rows `r0..r1` as f32 into `out` (`(r1 − r0)·cols` values), exactly as the format's reference decodes them.
    pub fn dequant_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        assert!(
            r0 <= r1 && r1 <= self.rows && out.len() == (r1 - r0) * self.cols,
            "dequant_rows: rows {r0}..{r1} of {} into {} values",
            self.rows,
            out.len()
        );
        match &self.data {
            Data::Ggml { ty, blocks } => {
                let rb = self.cols / ty.block_size() * ty.type_size();
                // Sizes were checked when the matrix was made, and every kept type decodes.
                if let Err(e) = dequantize_into(*ty, &blocks[r0 * rb..r1 * rb], out) {
                    unreachable!("checked {ty} matrix failed to decode: {e}");
                }
            }
            Data::Nf4(q) => q.dequant_range(r0 * self.cols, out),
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequant_rows(0, self.rows, &mut out);
        out
    }

    /// The same GGUF blocks with the rows reordered: row `i` of the result is row `src(i)` of `self` (GGUF's q/k
    /// rows are stored in llama.cpp's interleaved RoPE order; blocks never straddle rows, so they move as they are).
    pub fn permute_rows(self, src: impl Fn(usize) -> usize) -> Result<Self, String> {
        let Data::Ggml { ty, blocks } = &self.data else {
            return Err("only GGUF blocks can be permuted by rows".into());
        };
        let rb = self.cols / ty.block_size() * ty.type_size();
        let mut out = Vec::with_capacity(blocks.len());
        for i in 0..self.rows {
            let s = src(i);
            out.extend_from_slice(&blocks[s * rb..(s + 1) * rb]);
        }
        Self::ggml(*ty, self.rows, self.cols, out)
    }

    /// Random but valid blocks of a GGUF type (benchmarks and tests: weights of the right format and spread without
    /// a dense copy): random codes, block scales chosen so the values have a spread of about ±`spread`.
    pub fn random_ggml(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        spread: f32,
        seed: u64,
    ) -> Result<Self, String> {
        let (bs, ts) = (ty.block_size(), ty.type_size());
        let n_blocks = rows * cols / bs.max(1);
        let mut blocks = vec![0u8; n_blocks * ts];
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for chunk in blocks.chunks_mut(8) {
            let v = next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        let h = |x: f32| half::f16::from_f32(x).to_bits().to_le_bytes();
        // Scale fields: (byte offset, value) per block, so codes times scales spread about ±spread.
        let fields: Vec<(usize, f32)> = match ty {
            GgmlType::Q8_0 => vec![(0, spread / 127.0)],
            GgmlType::Q4_0 => vec![(0, spread / 8.0)],
            GgmlType::Q4_1 => vec![(0, 2.0 * spread / 15.0), (2, -spread)],
            // d·sc·q − dmin·m with 6-bit sc, m and 4/5-bit q.
            GgmlType::Q4_K => vec![(0, 2.0 * spread / (15.0 * 48.0)), (2, spread / 48.0)],
            GgmlType::Q5_K => vec![(0, 2.0 * spread / (31.0 * 48.0)), (2, spread / 48.0)],
            // d·sc·(q − 32) with signed 8-bit sc.
            GgmlType::Q6_K => vec![(208, spread / (32.0 * 64.0))],
            other => return Err(format!("no random blocks for {other}")),
        };
        for b in blocks.chunks_exact_mut(ts) {
            for &(off, v) in &fields {
                b[off..off + 2].copy_from_slice(&h(v));
            }
            if ty == GgmlType::Q6_K {
                // Signed scales in [−64, 63].
                for sc in &mut b[192..208] {
                    *sc = ((*sc as i8) / 2) as u8;
                }
            }
        }
        Self::ggml(ty, rows, cols, blocks)
    }
}

/// A frozen matrix as the model holds it: a dense backend tensor, or a quantized host matrix that dequantizes to
/// `dtype` on `device` where it is read.
#[derive(Debug, Clone)]
pub enum Frozen<B: Backend> {
    Dense(Tensor<B, 2>),
    Quant {
        q: Arc<QMatrix>,
        dtype: DType,
        device: B::Device,
    },
}

impl<B: Backend> Frozen<B> {
    /// `[rows, cols]` (`[out, in]` for a linear weight, `[vocab, hidden]` for an embedding).
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Frozen::Dense(t) => t.dims(),
            Frozen::Quant { q, .. } => [q.rows, q.cols],
        }
    }

    /// The dtype the matrix is computed in.
    pub fn dtype(&self) -> DType {
        match self {
            Frozen::Dense(t) => t.dtype(),
            Frozen::Quant { dtype, .. } => *dtype,
        }
    }

    /// The dense tensor, if the weight is dense.
    pub fn as_dense(&self) -> Option<&Tensor<B, 2>> {
        match self {
            Frozen::Dense(t) => Some(t),
            Frozen::Quant { .. } => None,
        }
    }

    /// The quantized matrix, if the weight is quantized.
    pub fn quant(&self) -> Option<&Arc<QMatrix>> {
        match self {
            Frozen::Dense(_) => None,
            Frozen::Quant { q, .. } => Some(q),
        }
    }

    /// The dense tensor: the stored one, or a fresh dequantized copy (transient: the caller drops it).
    pub fn dense(&self) -> Tensor<B, 2> {
        match self {
            Frozen::Dense(t) => t.clone(),
            Frozen::Quant { q, dtype, device } => {
                let data = TensorData::new(q.to_f32(), [q.rows, q.cols]);
                let t = Tensor::<B, 2>::from_data(data, (device, DType::F32));
                crate::lora::linear::round_to_dtype(t, *dtype)
            }
        }
    }

    /// The dense matrix in f32 (merges and exports).
    pub fn dense_f32(&self) -> Tensor<B, 2> {
        self.dense().cast(DType::F32)
    }

    /// Rows `ids` of the matrix, `[ids.len(), cols]` (an embedding lookup): only those rows are dequantized.
    pub fn gather_rows(&self, ids: &[u32]) -> Tensor<B, 2> {
        match self {
            Frozen::Dense(t) => {
                let idx: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
                let idx =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [ids.len()]), &t.device());
                t.clone().select(0, idx)
            }
            Frozen::Quant { q, dtype, device } => {
                let c = q.cols;
                let mut out = vec![0f32; ids.len() * c];
                for (row, &id) in out.chunks_exact_mut(c.max(1)).zip(ids) {
                    let id = id as usize;
                    q.dequant_rows(id, id + 1, row);
                }
                let t = Tensor::<B, 2>::from_data(
                    TensorData::new(out, [ids.len(), c]),
                    (device, DType::F32),
                );
                crate::lora::linear::round_to_dtype(t, *dtype)
            }
        }
    }

    /// Bytes the matrix holds resident.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Frozen::Dense(t) => t.shape().num_elements() * t.dtype().size(),
            Frozen::Quant { q, .. } => q.bytes(),
        }
    }

    /// The same matrix on another backend sharing the device type (autodiff ↔ inner), shared, never copied.
    pub fn map<C: Backend<Device = B::Device>>(
        &self,
        dense: impl FnOnce(Tensor<B, 2>) -> Tensor<C, 2>,
    ) -> Frozen<C> {
        match self {
            Frozen::Dense(t) => Frozen::Dense(dense(t.clone())),
            Frozen::Quant { q, dtype, device } => Frozen::Quant {
                q: q.clone(),
                dtype: *dtype,
                device: device.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kept GGUF type: rows decode on their own exactly as the whole tensor does, and random blocks have the
    /// asked-for spread (finite, not all zero).
    #[test]
    fn rows_decode_alone_and_random_blocks_are_sane() {
        for &ty in KEPT_GGML {
            let (rows, cols) = (6, 512);
            let q = QMatrix::random_ggml(ty, rows, cols, 0.05, 7).expect("random");
            let all = q.to_f32();
            let max = all.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(all.iter().all(|v| v.is_finite()), "{ty}");
            assert!(max > 0.005 && max < 0.5, "{ty}: max |w| = {max}");
            let mut part = vec![0f32; 2 * cols];
            q.dequant_rows(3, 5, &mut part);
            assert_eq!(&part[..], &all[3 * cols..5 * cols], "{ty}");
            let perm = QMatrix::random_ggml(ty, rows, cols, 0.05, 7)
                .and_then(|m| m.permute_rows(|i| rows - 1 - i))
                .expect("permute");
            let p = perm.to_f32();
            assert_eq!(&p[..cols], &all[(rows - 1) * cols..], "{ty} permuted");
        }
    }

    #[test]
    fn bad_shapes_and_types_are_refused_with_the_reason() {
        let e = QMatrix::ggml(GgmlType::Q4_K, 2, 100, vec![0; 10]).unwrap_err();
        assert!(e.contains("whole number of Q4_K blocks"), "{e}");
        let e = QMatrix::ggml(GgmlType::Q8_0, 2, 64, vec![0; 10]).unwrap_err();
        assert!(e.contains("expected 136"), "{e}");
        let e = QMatrix::ggml(GgmlType::Q5_0, 2, 64, vec![0; 88]).unwrap_err();
        assert!(e.contains("base_quantization: dequantize"), "{e}");
    }

    /// load_in_8bit: Q8_0 blocks decode to within half a quantization step of the input.
    #[test]
    fn int8_quantization_round_trips_within_half_a_step() {
        let (rows, cols) = (4, 96);
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
            .collect();
        let q = QMatrix::quantize(&v, rows, cols, QuantScheme::Int8).expect("q8");
        assert_eq!(q.format(), "Q8_0");
        assert_eq!(q.bytes(), rows * cols / 32 * 34);
        for (blk, (a, b)) in v.chunks(32).zip(q.to_f32().chunks(32)).enumerate() {
            let step = a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 0.5 * step * 1.01,
                    "block {blk}: {x} vs {y}"
                );
            }
        }
    }
}
