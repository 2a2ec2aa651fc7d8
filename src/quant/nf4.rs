//! NF4 (4-bit NormalFloat) quantization exactly as bitsandbytes defines it — the format of QLoRA and of the
//! pre-quantized `*-bnb-4bit` checkpoints on the Hub — with or without double quantization (DQ) of the block
//! scales.
//!
//! Bit-for-bit reproduction of bitsandbytes 0.50.2 on the CPU with f32 data (`quantize_4bit` /
//! `dequantize_4bit`, which on the CPU run `backends/default/ops.py` and the native `csrc/cpu_ops.cpp`):
//!
//! | step | bitsandbytes | here |
//! |---|---|---|
//! | blocks | `blocksize` consecutive elements of the flattened tensor; the last block may be partial | same |
//! | absmax | `max|x|` per block (a partial last block stores `max(max|x|, 1e-38)`) | same |
//! | scale | full blocks: `x · (1 / max(absmax, 1e-38))`; the partial last block: `x / max(absmax, 1e-38)`; then `clamp(−1, 1)` | same |
//! | code | `bucketize(scaled, (c[i] + c[i+1]) / 2)`: the number of midpoints below the value (a tie takes the lower code) | same |
//! | packing | element `2i` in the high nibble of byte `i`, `2i + 1` in the low one; an odd count pads a zero (code 7) | same |
//! | DQ offset | `absmax.mean()`: torch's f32 cascade sum (AVX2 lanes, single-threaded order), then `/ n` | `torch_mean_f32` |
//! | DQ codes | `quantize_blockwise(absmax − offset, 256)` with the signed dynamic map: per-256 absmax, then a 65536-entry lookup table indexed by `(int) fma((v + 1) / 2, 65535, 0.5)` | same |
//! | dequant | `NF4[nibble] · absmax[block]`, absmax = `code[q] · nested_absmax[block / 256] + offset` (two roundings) | [`Nf4::dequant_range`] |
//!
//! What is platform-specific in bitsandbytes itself (and pinned here to what an x86-64 AVX2 host does):
//! - The DQ offset is torch's `mean`, whose summation order depends on torch's CPU capability (8 lanes with AVX2,
//!   16 with AVX-512 kernels) and, from 32768 blocks on, on torch's thread count (this port is the
//!   single-threaded order). A fresh quantization's offset, and through it rarely an absmax code, can differ by an
//!   ulp elsewhere; a checkpoint stores its offset, so [`Nf4::from_bnb`] is exact whatever made it.
//! - The dynamic map comes from `torch.linspace`, which (FMA-contracted) is reproduced by [`dynamic_map`];
//!   checkpoints carry their own map (`nested_quant_map`), which [`Nf4::from_bnb`] keeps.
//! - The native blockwise quantizer computes its table index unfused on ARM and fused on x86 (this port); over
//!   every f32 in [−1, 1] the two give the same index.

use std::sync::OnceLock;

/// bitsandbytes' NF4 code (16 values, index = 4-bit code), the literals of `get_4bit_type("nf4")` and of
/// `nf4_lut` in `csrc/cpu_ops.cpp`.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// `torch.clamp(absmax, min=1e-38)`: the Python float rounded to f32 (a subnormal).
const MIN_ABSMAX: f32 = 1e-38_f64 as f32;

/// The block size of the second-level (DQ) quantization of the absmax values in `quantize_4bit`.
const NESTED_BLOCK: usize = 256;

/// The entries of bitsandbytes' blockwise-quantization lookup table (`kLUTSize`).
const LUT_SIZE: usize = 65536;

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), the code that double quantization
/// uses for the absmax values, bit for bit.
///
/// bitsandbytes builds it from `torch.linspace(0.1, 1, 2^i + 1)` (f32; torch computes element `j` as
/// `start + step·j` below the midpoint and `end − step·(n − 1 − j)` above it, FMA-contracted), the means of
/// neighbouring boundaries times `±10^(i − 6)` for `i` in `0..7`, plus 0 and 1, sorted.
pub fn dynamic_map() -> [f32; 256] {
    // Python's `10 ** (i - 6)`, then torch's cast of the scalar to f32.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let bounds = linspace_f32(0.1_f64 as f32, 1.0, (1 << i) + 1);
        let scale = scale as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| scale * m));
        data.extend(means.iter().map(|&m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into()
        .unwrap_or_else(|d: Vec<f32>| unreachable!("dynamic map has {} entries", d.len()))
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|j| {
            if j < half {
                step.mul_add(j as f32, start)
            } else {
                (-step).mul_add((steps - 1 - j) as f32, end)
            }
        })
        .collect()
}

/// The scale of each block of a [`Nf4`] tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// Double quantization: block `b`'s absmax is `code[q[b]] · nested_absmax[b / nested_blocksize] + offset`.
    Double {
        /// The 8-bit code of each block's absmax.
        q: Vec<u8>,
        /// The mean of the absmax values, subtracted before their quantization.
        offset: f32,
        /// The absmax of each group of `nested_blocksize` (shifted) absmax values.
        nested_absmax: Vec<f32>,
        nested_blocksize: usize,
        /// The 256-entry 8-bit code ([`dynamic_map`] when quantized here; a checkpoint's `nested_quant_map`).
        code: Vec<f32>,
    },
}

/// A tensor in bitsandbytes' NF4 format: `numel` elements of the flattened tensor, blocks of `blocksize`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    pub numel: usize,
    pub blocksize: usize,
    /// Two codes per byte, element `2i` in the high nibble of byte `i` (`numel.div_ceil(2)` bytes).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// One tensor of a safetensors file as [`Nf4::from_bnb`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// The safetensors dtype name: `"U8"`, `"F32"`, …
    pub dtype: &'a str,
    /// The raw (little-endian) bytes.
    pub data: &'a [u8],
}

impl Nf4 {
    /// Quantize a flat f32 tensor as `bitsandbytes.functional.quantize_4bit(x, blocksize,
    /// compress_statistics=double, quant_type="nf4")` does (on the CPU, f32 input), bit for bit. A bf16/f16
    /// weight is quantized the same way from its exact f32 values.
    ///
    /// `blocksize` must be even and positive (bitsandbytes accepts 32, 64, …, 4096).
    pub fn quantize(x: &[f32], blocksize: usize, double: bool) -> Nf4 {
        assert!(
            blocksize > 0 && blocksize.is_multiple_of(2),
            "NF4 block size {blocksize} is not a positive even number"
        );
        let bounds = nf4_bounds();
        let n = x.len();
        let full = n / blocksize;
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
        let mut codes = vec![0u8; blocksize];
        for (b, (blk, out)) in x
            .chunks(blocksize)
            .zip(packed.chunks_mut(blocksize / 2))
            .enumerate()
        {
            let am = blk.iter().fold(0f32, |m, v| nan_max(m, v.abs()));
            let clamped = if am < MIN_ABSMAX { MIN_ABSMAX } else { am };
            let codes = &mut codes[..blk.len()];
            if b < full {
                // `A * (1.0 / absmax)`: torch's `__rtruediv__` is a reciprocal, then a product.
                absmax.push(am);
                let r = 1.0 / clamped;
                for (c, &v) in codes.iter_mut().zip(blk) {
                    *c = nf4_code(&bounds, (v * r).clamp(-1.0, 1.0));
                }
            } else {
                // The partial last block divides, and stores the clamped absmax.
                absmax.push(clamped);
                for (c, &v) in codes.iter_mut().zip(blk) {
                    *c = nf4_code(&bounds, (v / clamped).clamp(-1.0, 1.0));
                }
            }
            for (byte, pair) in out.iter_mut().zip(codes.chunks(2)) {
                // An odd count pads with a quantized zero (code 7).
                let lo = pair.get(1).copied().unwrap_or(7);
                *byte = (pair[0] << 4) | lo;
            }
        }
        let absmax = if double {
            double_quantize(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Nf4 {
            numel: n,
            blocksize,
            packed,
            absmax,
        }
    }

    /// The f32 values of elements `start..start + out.len()` exactly as `dequantize_4bit` gives them (f32 output),
    /// bit for bit. Allocation-free; each block's absmax is resolved once per call.
    pub fn dequant_range(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(
            end <= self.numel,
            "NF4 dequant_range: elements {start}..{end} of {}",
            self.numel
        );
        let bs = self.blocksize;
        let mut pos = start;
        let mut rest = out;
        while !rest.is_empty() {
            let b = pos / bs;
            let len = ((b + 1) * bs).min(end) - pos;
            let (seg, tail) = rest.split_at_mut(len);
            let scale = self.block_absmax(b);
            let table = NF4_CODE.map(|c| c * scale);
            decode_nibbles(&self.packed, pos, &table, seg);
            pos += len;
            rest = tail;
        }
    }

    /// The absmax of block `b`, resolved from the double quantization where there is one (what `dequant_range`
    /// scales the block by; a device copy uploads it once per block).
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::Plain(a) => a[b],
            // bitsandbytes: `dequantize_blockwise` (code · nested absmax), then `absmax += offset`.
            Absmax::Double {
                q,
                offset,
                nested_absmax,
                nested_blocksize,
                code,
            } => code[q[b] as usize] * nested_absmax[b / nested_blocksize] + offset,
        }
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => a.len() * f,
                Absmax::Double {
                    q,
                    nested_absmax,
                    code,
                    ..
                } => q.len() + (nested_absmax.len() + code.len() + 1) * f,
            }
    }

    /// Build from a pre-quantized bitsandbytes checkpoint as published on the Hub (what
    /// `Linear4bit.state_dict()` / transformers save). `weight_key` is the weight's name (e.g.
    /// `model.layers.0.mlp.down_proj.weight`); `get` returns a tensor of the file by name. Reads:
    ///
    /// | key | dtype | content |
    /// |---|---|---|
    /// | `{w}` | `U8` (or any `quant_storage` dtype: only its bytes count) | packed codes, `numel.div_ceil(2)` bytes |
    /// | `{w}.quant_state.bitsandbytes__nf4` | `U8` | JSON: `quant_type`, `blocksize`, `shape`, `dtype`, and with DQ `nested_blocksize`, `nested_offset` |
    /// | `{w}.absmax` | `U8` with DQ, else `F32` | one per block |
    /// | `{w}.quant_map` | `F32` ×16 | must be [`NF4_CODE`] |
    /// | `{w}.nested_absmax` | `F32` | with DQ (its presence means DQ, as in bitsandbytes' `QuantState.from_dict`) |
    /// | `{w}.nested_quant_map` | `F32` ×256 | with DQ |
    ///
    /// Returns the tensor and its original shape (`[out, in]` for a linear weight). The dequantized values are the
    /// f32 ones bitsandbytes computes before casting to the checkpoint's `dtype`.
    pub fn from_bnb<'a>(
        weight_key: &str,
        get: impl Fn(&str) -> Option<RawTensor<'a>>,
    ) -> Result<(Nf4, Vec<usize>), String> {
        let key = |suffix: &str| format!("{weight_key}{suffix}");
        let need = |suffix: &str, what: &str| {
            let k = key(suffix);
            get(&k).map(|t| (k.clone(), t)).ok_or_else(|| {
                format!("bitsandbytes NF4 weight {weight_key}: missing tensor {k} ({what})")
            })
        };

        let qs_key = key(".quant_state.bitsandbytes__nf4");
        let Some(qs) = get(&qs_key) else {
            let fp4 = key(".quant_state.bitsandbytes__fp4");
            return Err(if get(&fp4).is_some() {
                format!(
                    "{fp4}: bitsandbytes FP4 is not supported, only NF4 (bnb_4bit_quant_type: nf4)"
                )
            } else {
                format!(
                    "bitsandbytes NF4 weight {weight_key}: missing tensor {qs_key} (the quant state: U8 bytes of a \
                     JSON dict)"
                )
            });
        };
        expect_dtype(&qs_key, qs, &["U8"])?;
        let meta: serde_json::Value = serde_json::from_slice(qs.data)
            .map_err(|e| format!("{qs_key}: not a JSON quant state ({e})"))?;
        let field = |name: &str| {
            meta.get(name)
                .ok_or_else(|| format!("{qs_key}: the quant state has no `{name}`"))
        };
        let uint = |name: &str| {
            field(name)?
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{qs_key}: `{name}` is not a positive integer"))
        };
        match field("quant_type")?.as_str() {
            Some("nf4") => {}
            Some("fp4") => {
                return Err(format!(
                    "{qs_key}: quant_type \"fp4\": bitsandbytes FP4 is not supported, only NF4"
                ))
            }
            other => return Err(format!("{qs_key}: quant_type {other:?}, expected \"nf4\"")),
        }
        let blocksize = uint("blocksize")?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            })
            .ok_or_else(|| format!("{qs_key}: `shape` is not a list of dimensions"))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("{qs_key}: shape {shape:?} overflows"))?;
        let blocks = numel.div_ceil(blocksize);

        let (wk, w) = need("", "the packed 4-bit codes")?;
        let want = numel.div_ceil(2);
        if w.data.len() != want {
            return Err(format!(
                "{wk}: {} bytes of packed codes for shape {shape:?} (expected {want})",
                w.data.len()
            ));
        }

        let (mk, map) = need(".quant_map", "the 16-value NF4 code")?;
        let map = f32s(&mk, map, 16)?;
        if map
            .iter()
            .zip(&NF4_CODE)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(format!(
                "{mk}: not bitsandbytes' NF4 code ({map:?}, expected {NF4_CODE:?})"
            ));
        }

        let (ak, am) = need(".absmax", "the block scales")?;
        let nested_key = key(".nested_absmax");
        let absmax = if let Some(nested) = get(&nested_key) {
            expect_dtype(&ak, am, &["U8"])?;
            if am.data.len() != blocks {
                return Err(format!(
                    "{ak}: {} quantized absmax values for {blocks} blocks of {blocksize} (shape {shape:?})",
                    am.data.len()
                ));
            }
            let nested_blocksize = uint("nested_blocksize")?;
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| format!("{qs_key}: `nested_offset` is not a number"))?
                as f32;
            let nested_absmax = f32s(&nested_key, nested, blocks.div_ceil(nested_blocksize))?;
            let (ck, code) = need(
                ".nested_quant_map",
                "the 256-value 8-bit code of the absmax values",
            )?;
            let code = f32s(&ck, code, 256)?;
            Absmax::Double {
                q: am.data.to_vec(),
                offset,
                nested_absmax,
                nested_blocksize,
                code,
            }
        } else {
            if am.dtype == "U8" {
                return Err(format!(
                    "{ak} is U8 (double-quantized) but {nested_key} is missing"
                ));
            }
            Absmax::Plain(f32s(&ak, am, blocks)?)
        };
        let q = Nf4 {
            numel,
            blocksize,
            packed: w.data.to_vec(),
            absmax,
        };
        Ok((q, shape))
    }
}

/// `dtype` is one of `allowed`.
fn expect_dtype(key: &str, t: RawTensor<'_>, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&t.dtype) {
        Ok(())
    } else {
        Err(format!(
            "{key}: dtype {}, expected {}",
            t.dtype,
            allowed.join(" or ")
        ))
    }
}

/// `len` little-endian f32 values.
fn f32s(key: &str, t: RawTensor<'_>, len: usize) -> Result<Vec<f32>, String> {
    expect_dtype(key, t, &["F32"])?;
    if t.data.len() != len * 4 {
        return Err(format!(
            "{key}: {} F32 values, expected {len}",
            t.data.len() / 4
        ));
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The 15 midpoints between neighbouring NF4 values (`(code[:-1] + code[1:]) / 2` in f32).
fn nf4_bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// `torch.bucketize(v, bounds)` (right=False): the number of midpoints below `v`, so a tie takes the lower code
/// (and NaN, which torch's binary search sends past every bound, code 15).
#[inline]
fn nf4_code(bounds: &[f32; 15], v: f32) -> u8 {
    bounds.iter().map(|&b| u8::from(b < v || v.is_nan())).sum()
}

/// torch's `max` reduction: NaN wins.
#[inline]
fn nan_max(m: f32, a: f32) -> f32 {
    if m.is_nan() || a <= m {
        m
    } else {
        a
    }
}

/// Codes `start..start + out.len()` of the packed nibbles through the 16-entry table `t`.
#[inline]
fn decode_nibbles(packed: &[u8], start: usize, t: &[f32; 16], out: &mut [f32]) {
    let mut out = out;
    let mut i = start;
    if i % 2 == 1 {
        if let Some((first, rest)) = std::mem::take(&mut out).split_first_mut() {
            *first = t[usize::from(packed[i / 2] & 0x0F)];
            out = rest;
            i += 1;
        }
    }
    let (pairs, tail) = out.split_at_mut(out.len() & !1);
    let bytes = &packed[i / 2..i / 2 + pairs.len() / 2];
    for (o, &b) in pairs.chunks_exact_mut(2).zip(bytes) {
        o[0] = t[usize::from(b >> 4)];
        o[1] = t[usize::from(b & 0x0F)];
    }
    if let [last] = tail {
        *last = t[usize::from(packed[(i + pairs.len()) / 2] >> 4)];
    }
}

/// `quantize_4bit`'s `compress_statistics`: the absmax values minus their mean, quantized in blocks of 256 with
/// the signed dynamic map.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let shifted: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (q, nested_absmax) = quantize_blockwise_dynamic(&shifted, NESTED_BLOCK);
    Absmax::Double {
        q,
        offset,
        nested_absmax,
        nested_blocksize: NESTED_BLOCK,
        code: dynamic_map().to_vec(),
    }
}

/// `quantize_blockwise(x, blocksize)` with the dynamic map on the CPU (bitsandbytes' native `quantize_cpu_impl`):
/// per block `absmax = max|x|`; an all-zero block gets code 0 throughout; otherwise each value's code is the lookup
/// table's entry for `x · (1 / absmax)` (not an exact nearest-code search: the table has 65536 bins over [−1, 1]).
/// Returns the codes and the block absmax values.
fn quantize_blockwise_dynamic(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for blk in x.chunks(blocksize) {
        // `std::max(acc, fabs(v))` from 0.
        let am = blk
            .iter()
            .fold(0f32, |m, v| if m < v.abs() { v.abs() } else { m });
        absmax.push(am);
        if am == 0.0 {
            q.extend(std::iter::repeat_n(0u8, blk.len()));
            continue;
        }
        let inv = 1.0 / am;
        q.extend(blk.iter().map(|&v| lut[lut_index(v * inv)]));
    }
    (q, absmax)
}

/// bitsandbytes' `norm_to_lut_index`: `(uint16_t)((clamp(v, −1, 1) + 1) · 0.5 · 65535 + 0.5)`, the last multiply
/// and add fused as GCC compiles it on x86 (an exhaustive search found no f32 input whose index the fusing changes;
/// it is kept for fidelity). NaN maps to 0, as `cvttss2si`'s low 16 bits do.
#[inline]
fn lut_index(v: f32) -> usize {
    // f32::clamp keeps NaN.
    let v = v.clamp(-1.0, 1.0);
    usize::from(((v + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5) as u16)
}

/// bitsandbytes' `build_quantize_lut` for the dynamic map: for each of 65536 points `−1 + 2i / 65535` in
/// [−1, 1], the first code whose upper midpoint `0.5 · (c[k] + c[k+1])` is not below it.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map();
        let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut k = 0;
        (0..LUT_SIZE)
            .map(|i| {
                let val = (2.0 * i as f32) / (LUT_SIZE - 1) as f32 - 1.0;
                while k < mids.len() && mids[k] < val {
                    k += 1;
                }
                k as u8
            })
            .collect()
    })
}

/// torch's `Tensor.mean()` of a contiguous f32 vector on an AVX2 CPU, single-threaded (any length below 32768,
/// or any length with `torch.set_num_threads(1)`): `cascade_sum` then a division by `n`.
///
/// The sum (`aten/src/ATen/native/cpu/SumKernel.cpp`): the vector is read as 8-lane vectors, four at a time
/// (`row_sum` with `ilp_factor` 4) into `multi_row_sum`'s four levels of accumulators (a level is flushed into the
/// next every `2^level_power` rows); leftover vectors go into the first partial sum, the four partials are added,
/// then the scalar tail and finally the eight lanes in order. Fewer than 8 values take the same path on scalars.
fn torch_mean_f32(xs: &[f32]) -> f32 {
    torch_sum_f32(xs) / xs.len() as f32
}

const LANES: usize = 8;

/// An accumulator of torch's cascade sum: a scalar or an 8-lane vector.
trait Acc: Copy {
    const ZERO: Self;
    fn add(self, other: Self) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Acc for [f32; LANES] {
    const ZERO: Self = [0.0; LANES];
    fn add(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] + other[l])
    }
}

fn torch_sum_f32(xs: &[f32]) -> f32 {
    if xs.len() < LANES {
        return row_sum(xs.len(), |i| xs[i]);
    }
    let vecs = xs.len() / LANES;
    let lanes = row_sum(vecs, |v| -> [f32; LANES] {
        std::array::from_fn(|l| xs[v * LANES + l])
    });
    let tail = xs[vecs * LANES..].iter().fold(0f32, |s, &x| s + x);
    lanes.iter().fold(tail, |s, &x| s + x)
}

/// torch's `row_sum`: `size` items as `size / 4` rows of 4 through `multi_row_sum`, the rest into the first.
fn row_sum<T: Acc>(size: usize, load: impl Fn(usize) -> T) -> T {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<T, ILP>(rows, |r, k| load(r * ILP + k));
    for i in rows * ILP..size {
        partial[0] = partial[0].add(load(i));
    }
    partial[1..].iter().fold(partial[0], |s, &p| s.add(p))
}

/// torch's `multi_row_sum`: sums `size` rows of `N` columns with four levels of accumulators.
fn multi_row_sum<T: Acc, const N: usize>(size: usize, load: impl Fn(usize, usize) -> T) -> [T; N] {
    const LEVELS: usize = 4;
    // utils::CeilLog2: 1 up to 2, else the bit length of size − 1.
    let ceil_log2 = if size <= 2 {
        1
    } else {
        (usize::BITS - (size - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[T::ZERO; N]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = a.add(load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (a, b) in upper[0].iter_mut().zip(&mut lower[j - 1]) {
                *a = a.add(*b);
                *b = T::ZERO;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for r in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = a.add(load(r, k));
        }
    }
    let [mut sum, upper @ ..] = acc;
    for level in upper {
        for (a, b) in sum.iter_mut().zip(level) {
            *a = a.add(b);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;
    use std::collections::HashMap;
    use std::path::PathBuf;

    const PREFIX: &str = "model.layers.0.mlp.down_proj.weight";

    fn fixture(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/nf4")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The tensors of a safetensors file by name: (dtype, shape, bytes).
    fn tensors(bytes: &[u8]) -> HashMap<String, (String, Vec<usize>, Vec<u8>)> {
        let st = SafeTensors::deserialize(bytes).expect("safetensors");
        st.tensors()
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    (
                        format!("{:?}", v.dtype()),
                        v.shape().to_vec(),
                        v.data().to_vec(),
                    ),
                )
            })
            .collect()
    }

    struct Fixture(HashMap<String, (String, Vec<usize>, Vec<u8>)>);

    impl Fixture {
        fn load() -> Self {
            Fixture(tensors(&fixture("nf4.safetensors")))
        }
        fn raw(&self, k: &str) -> &(String, Vec<usize>, Vec<u8>) {
            self.0
                .get(k)
                .unwrap_or_else(|| panic!("fixture has no {k}"))
        }
        fn f32(&self, k: &str) -> Vec<f32> {
            let (dtype, _, data) = self.raw(k);
            assert_eq!(dtype, "F32", "{k}");
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        fn u8(&self, k: &str) -> Vec<u8> {
            let (dtype, _, data) = self.raw(k);
            assert_eq!(dtype, "U8", "{k}");
            data.clone()
        }
    }

    fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let bad: Vec<_> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .take(5)
            .collect();
        assert!(bad.is_empty(), "{what}: (index, (got, bnb)) {bad:?}");
    }

    /// The quantization cases of the fixture: (case, input, blocksize, double).
    const CASES: [(&str, &str, usize, bool); 5] = [
        ("plain64", "x", 64, false),
        ("double64", "x", 64, true),
        ("double32", "x", 32, true),
        ("zplain", "z", 64, false),
        ("zdouble", "z", 64, true),
    ];

    #[test]
    fn dynamic_map_and_code_match_bitsandbytes() {
        let fx = Fixture::load();
        assert_bits_eq("dynamic map", &dynamic_map(), &fx.f32("dynamic_map"));
        let st = fixture("bnb_linear.safetensors");
        let lin = tensors(&st);
        let (_, _, map) = &lin[&format!("{PREFIX}.quant_map")];
        let map: Vec<f32> = map
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_bits_eq("NF4 code", &NF4_CODE, &map);
    }

    #[test]
    fn blockwise_8bit_matches_bitsandbytes() {
        let fx = Fixture::load();
        let (q, absmax) = quantize_blockwise_dynamic(&fx.f32("bw.input"), 256);
        assert_eq!(q, fx.u8("bw.q"));
        assert_bits_eq("blockwise absmax", &absmax, &fx.f32("bw.absmax"));
    }

    #[test]
    fn mean_matches_torch() {
        let fx = Fixture::load();
        let (_, _, lens) = fx.raw("mean.len");
        let lens: Vec<usize> = lens
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .collect();
        let max = *lens.iter().max().expect("lengths");
        // The fixture's sequence: ((i·2654435761 mod 2^32) >> 8) · 2^-24, exact in f32.
        let seq: Vec<f32> = (0..max as u64)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761) % (1 << 32)) >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect();
        let got: Vec<f32> = lens.iter().map(|&n| torch_mean_f32(&seq[..n])).collect();
        assert_bits_eq("torch mean", &got, &fx.f32("mean.value"));
    }

    #[test]
    fn quantize_matches_bitsandbytes_bit_for_bit() {
        let fx = Fixture::load();
        for (case, input, bs, double) in CASES {
            let x = fx.f32(input);
            let q = Nf4::quantize(&x, bs, double);
            assert_eq!((q.numel, q.blocksize), (x.len(), bs), "{case}");
            assert_eq!(q.packed, fx.u8(&format!("{case}.packed")), "{case}: packed");
            match &q.absmax {
                Absmax::Plain(a) => {
                    assert!(!double);
                    assert_bits_eq(case, a, &fx.f32(&format!("{case}.absmax")));
                }
                Absmax::Double {
                    q: qa,
                    offset,
                    nested_absmax,
                    nested_blocksize,
                    code,
                } => {
                    assert!(double);
                    assert_eq!(*nested_blocksize, 256);
                    assert_eq!(
                        qa,
                        &fx.u8(&format!("{case}.absmax")),
                        "{case}: absmax codes"
                    );
                    assert_bits_eq(case, &[*offset], &fx.f32(&format!("{case}.offset")));
                    assert_bits_eq(
                        case,
                        nested_absmax,
                        &fx.f32(&format!("{case}.nested_absmax")),
                    );
                    assert_bits_eq(case, code, &fx.f32(&format!("{case}.code")));
                }
            }
            let per_block = if double { 1 } else { 4 };
            let blocks = x.len().div_ceil(bs);
            let nested = if double {
                blocks.div_ceil(256) * 4 + 1024 + 4
            } else {
                0
            };
            assert_eq!(
                q.bytes(),
                x.len().div_ceil(2) + blocks * per_block + nested,
                "{case}"
            );
        }
    }

    #[test]
    fn dequant_range_matches_bitsandbytes_bit_for_bit() {
        let fx = Fixture::load();
        for (case, input, bs, double) in CASES {
            let key = format!("{case}.dequant");
            if !fx.0.contains_key(&key) {
                continue;
            }
            let want = fx.f32(&key);
            let q = Nf4::quantize(&fx.f32(input), bs, double);
            let mut all = vec![f32::NAN; q.numel];
            q.dequant_range(0, &mut all);
            assert_bits_eq(&key, &all, &want);
            // Unaligned sub-ranges: odd and even starts and ends, inside a block, across blocks, empty, the end.
            let n = q.numel;
            let mut ranges = vec![
                (0, 1),
                (1, 2),
                (3, 3),
                (5, 70),
                (63, 130),
                (64, 64),
                (n - 1, n),
                (n - 9, n),
            ];
            let mut s = 12345u64;
            for _ in 0..200 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let a = (s >> 33) as usize % n;
                let len = (s >> 17) as usize % 300;
                ranges.push((a, (a + len).min(n)));
            }
            for (a, b) in ranges {
                let mut part = vec![f32::NAN; b - a];
                q.dequant_range(a, &mut part);
                assert_bits_eq(&format!("{key}[{a}..{b}]"), &part, &want[a..b]);
            }
        }
    }

    fn linear() -> HashMap<String, (String, Vec<usize>, Vec<u8>)> {
        tensors(&fixture("bnb_linear.safetensors"))
    }

    fn load(
        t: &HashMap<String, (String, Vec<usize>, Vec<u8>)>,
    ) -> Result<(Nf4, Vec<usize>), String> {
        Nf4::from_bnb(PREFIX, |k| {
            t.get(k).map(|(dtype, _, data)| RawTensor {
                dtype: dtype.as_str(),
                data: data.as_slice(),
            })
        })
    }

    #[test]
    fn from_bnb_reproduces_the_checkpoint_bit_for_bit() {
        let fx = Fixture::load();
        let lin = linear();
        let (q, shape) = load(&lin).expect("from_bnb");
        assert_eq!(shape, vec![16, 200]);
        assert!(matches!(q.absmax, Absmax::Double { .. }));
        let mut out = vec![f32::NAN; q.numel];
        q.dequant_range(0, &mut out);
        assert_bits_eq("linear", &out, &fx.f32("linear.expected"));
        // bitsandbytes' own output casts to the checkpoint's dtype (bfloat16, round to nearest even).
        let (dtype, _, bf) = fx.raw("linear.expected_bf16");
        assert_eq!(dtype, "BF16");
        let bf: Vec<u16> = bf
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let ours: Vec<u16> = out
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        assert_eq!(ours, bf, "bf16 output");
        // Quantizing the same bf16 weight here gives the checkpoint's tensors (offset and nested absmax included).
        let (dtype, _, w) = fx.raw("linear.input");
        assert_eq!(dtype, "BF16");
        let w: Vec<f32> = w
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect();
        assert_eq!(Nf4::quantize(&w, 64, true), q);
    }

    #[test]
    fn from_bnb_errors_name_the_key() {
        let base = linear();
        let qs_key = format!("{PREFIX}.quant_state.bitsandbytes__nf4");
        for (suffix, what) in [
            (".absmax", "block scales"),
            (".quant_map", "NF4 code"),
            (".nested_quant_map", "8-bit code"),
            ("", "packed"),
            (".quant_state.bitsandbytes__nf4", "quant state"),
        ] {
            let mut t = base.clone();
            let k = format!("{PREFIX}{suffix}");
            t.remove(&k);
            let e = load(&t).expect_err(&k);
            assert!(
                e.contains(&format!("missing tensor {k}")) && e.contains(what),
                "{e}"
            );
        }

        // Without nested_absmax the U8 absmax cannot be read.
        let mut t = base.clone();
        t.remove(&format!("{PREFIX}.nested_absmax"));
        let e = load(&t).expect_err("no nested");
        assert!(
            e.contains(&format!("{PREFIX}.absmax is U8")) && e.contains("nested_absmax"),
            "{e}"
        );

        // FP4: a quant state under the fp4 key, or quant_type "fp4" in the nf4 one.
        let mut t = base.clone();
        let qs = t.remove(&qs_key).expect("quant state");
        t.insert(
            format!("{PREFIX}.quant_state.bitsandbytes__fp4"),
            qs.clone(),
        );
        let e = load(&t).expect_err("fp4 key");
        assert!(
            e.contains("bitsandbytes__fp4") && e.contains("FP4 is not supported"),
            "{e}"
        );
        let mut t = base.clone();
        let json = String::from_utf8(qs.2.clone()).expect("utf-8");
        let fp4 = json.replace("\"nf4\"", "\"fp4\"");
        assert_ne!(fp4, json);
        t.insert(
            qs_key.clone(),
            (qs.0.clone(), vec![fp4.len()], fp4.into_bytes()),
        );
        let e = load(&t).expect_err("fp4 type");
        assert!(e.contains(&qs_key) && e.contains("fp4"), "{e}");

        // Wrong sizes and dtypes.
        let mut t = base.clone();
        t.get_mut(&format!("{PREFIX}.absmax"))
            .expect("absmax")
            .2
            .pop();
        let e = load(&t).expect_err("short absmax");
        assert!(
            e.contains(&format!("{PREFIX}.absmax")) && e.contains("for 50 blocks"),
            "{e}"
        );
        let mut t = base.clone();
        t.get_mut(PREFIX).expect("weight").2.truncate(10);
        let e = load(&t).expect_err("short weight");
        assert!(e.contains(PREFIX) && e.contains("expected 1600"), "{e}");
        let mut t = base.clone();
        t.get_mut(&format!("{PREFIX}.nested_absmax"))
            .expect("nested")
            .0 = "BF16".into();
        let e = load(&t).expect_err("bf16 nested");
        assert!(e.contains("nested_absmax: dtype BF16, expected F32"), "{e}");
        let mut t = base.clone();
        let json = json.replace("\"blocksize\"", "\"block_size\"");
        t.insert(
            qs_key.clone(),
            (qs.0.clone(), vec![json.len()], json.into_bytes()),
        );
        let e = load(&t).expect_err("no blocksize");
        assert!(e.contains(&qs_key) && e.contains("`blocksize`"), "{e}");
    }
}
