//! The CubeCL kernels on wgpu (Mesa lavapipe in CI: `--features wgpu`), against the reference implementation on
//! the same backend: values and the gradients of q, k and v, for every mask variant, grouped heads, ragged
//! lengths, several head dims, f32 and f16.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor, TensorData};

use crate::kernels::check::{self, rand_vec, to_vec};
use crate::kernels::{reference, Attention, Kernels, Qkv};

/// The CubeCL backend on wgpu itself (not burn's `Wgpu` alias, which `--features fusion` makes burn-fusion's
/// decorator, under which these kernels do not run).
type W = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
type AD = Autodiff<W>;

/// The whole kernel suite ([`check::all`]: every fused kernel against the reference, values and gradients,
/// every mask variant, head dims 64/80/128/256, ragged sizes) in one dtype on wgpu.
fn suite(dtype: DType) {
    let checks = check::all::<AD>(&Default::default(), dtype);
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| {
            format!(
                "{}: value {:.2e}, grad {:.2e} (tolerance {:.0e})",
                c.case, c.value, c.grad, c.tol
            )
        })
        .collect();
    assert!(failed.is_empty(), "{dtype:?}:\n{}", failed.join("\n"));
    assert_eq!(
        checks.len(),
        24 + 2 * check::QUANT_CASES.len(),
        "the suite's cases"
    );
}

#[test]
fn cube_kernels_match_the_reference_f32() {
    suite(DType::F32);
}

#[test]
fn cube_kernels_match_the_reference_f16() {
    suite(DType::F16);
}

/// One whole training step's loss and LoRA gradients on wgpu (fused attention, reference elsewhere) against the
/// CPU step, on tiny parity fixtures: Llama (grouped heads), Gemma 2 (sliding window, soft-capping), Falcon's
/// new architecture (LayerNorm with bias, grouped query_key_value, parallel residual) and Mixtral (routed experts:
/// padding rows reach no expert, so the backends agree on every expert's rows), and DoRA on Llama (magnitudes, the
/// dropped-input pass), LoRA on every linear layer
/// with dropout, a padded two-row batch and a packed row, with and without layer recompute.
#[test]
fn cube_training_step_equals_the_cpu_step() {
    use crate::lora::adapter::{attach, set_trainable, LoraInit, LoraSettings};
    use crate::lora::TargetSpec;
    use crate::model::{CausalLm, ModelConfig, SafetensorsSource, TokenBatch};
    use crate::train::recompute::Checkpointing;
    use crate::train::step::{step_gradients, StepConfig};
    use burn::backend::Flex;

    fn grads<B: crate::kernels::TrainBackend>(
        family: &str,
        use_dora: bool,
        saved: bool,
        device: &B::Device,
        micro: &[(&TokenBatch, &[i64])],
        recompute: Checkpointing,
    ) -> (f64, Vec<Vec<f32>>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/models/{family}"));
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let src = SafetensorsSource::open(&dir).unwrap();
        let mut m = CausalLm::<B>::load(cfg, &src, device, DType::F32).unwrap();
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            use_rslora: false,
            targets: TargetSpec::AllLinear,
            layers: None,
            init: LoraInit::Gaussian,
            seed: 3,
            use_dora,
            modules_to_save: if saved {
                crate::lora::adapter::SavedModule::ALL.to_vec()
            } else {
                Vec::new()
            },
        };
        attach(&mut m, &settings).unwrap();
        // Non-zero B factors, so every gradient is non-trivial.
        for (_, l) in m.linears_mut() {
            if let Some(a) = &mut l.lora {
                let [o, r] = a.b.dims();
                let v: Vec<f32> = rand_vec(o * r, (o * 31 + r) as u64)
                    .iter()
                    .map(|x| x * 0.1)
                    .collect();
                a.b = Tensor::from_data(TensorData::new(v, [o, r]), (device, DType::F32));
            }
        }
        set_trainable(&mut m);
        let cfg = StepConfig {
            router_aux_loss_coef: 0.0,
            lr: 1e-3,
            max_grad_norm: 1.0,
            seed: 5,
            step: 0,
            recompute,
        };
        let g = step_gradients(&m, micro, cfg).unwrap();
        let v = g.grads.into_iter().flatten().map(to_vec).collect();
        (g.loss, v)
    }

    let vocab = 256u32;
    let ids = |n: usize, seed: u64| -> Vec<u32> {
        rand_vec(n, seed)
            .iter()
            .map(|x| ((x + 1.0) * 0.5 * (vocab - 1) as f32) as u32)
            .collect()
    };
    let (r0, r1) = (ids(23, 1), ids(15, 2));
    let padded = TokenBatch::from_rows(&[r0.clone(), r1.clone()], None);
    let labels: Vec<i64> = (0..2 * padded.seq)
        .map(|t| {
            let (r, i) = (t / padded.seq, t % padded.seq);
            if padded.attention_mask[t] && i > 2 {
                padded.input_ids[r * padded.seq + i] as i64
            } else {
                -100
            }
        })
        .collect();
    let mut packed = TokenBatch::from_rows(&[[r0.clone(), r1.clone()].concat()], None);
    packed.position_ids = (0..23).chain(0..15).collect();
    packed.segment_ids = Some([vec![0; 23], vec![1; 15]].concat());
    let packed_labels: Vec<i64> = packed
        .input_ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i == 0 || i == 23 { -100 } else { t as i64 })
        .collect();
    let micro: Vec<(&TokenBatch, &[i64])> = vec![(&padded, &labels), (&packed, &packed_labels)];
    // (family, DoRA, modules_to_save: embed_tokens and lm_head trained in full)
    for (family, dora, saved) in [
        ("llama", false, false),
        ("gemma2", false, false),
        ("falcon-new", false, false),
        ("mixtral", false, false),
        ("llama", true, false),
        ("llama", false, true),
        ("gemma2", false, true),
    ] {
        let (cpu_loss, cpu) = grads::<Autodiff<Flex>>(
            family,
            dora,
            saved,
            &Default::default(),
            &micro,
            Checkpointing::Off,
        );
        for recompute in [Checkpointing::Off, Checkpointing::Layers] {
            #[allow(unused_mut)]
            let mut runs = vec![(
                "wgpu",
                grads::<AD>(family, dora, saved, &Default::default(), &micro, recompute),
            )];
            // With `--features fusion` burn's `Wgpu` is burn-fusion's decorator: the same step through it.
            #[cfg(feature = "fusion")]
            runs.push((
                "wgpu with burn fusion",
                grads::<Autodiff<burn::backend::Wgpu<f32, i32>>>(
                    family,
                    dora,
                    saved,
                    &Default::default(),
                    &micro,
                    recompute,
                ),
            ));
            for (on, (loss, gpu)) in runs {
                assert!(
                    ((loss - cpu_loss) / cpu_loss).abs() < 1e-5,
                    "{family} dora={dora} saved={saved} {recompute}: loss {loss} on {on}, {cpu_loss} on the CPU"
                );
                assert_eq!(
                    gpu.len(),
                    cpu.len(),
                    "{family} dora={dora} {recompute} on {on}: gradients"
                );
                for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
                    let d = check::rel_diff(g, c);
                    assert!(
                        d < 1e-4,
                        "{family} dora={dora} saved={saved} {recompute} on {on}: gradient {i} differs by {d} (relative)"
                    );
                }
            }
        }
    }
}

/// The allocator's peak through the attention's forward and backward grows linearly with the sequence for both
/// GPU attentions (blockwise on the GEMMs, the default, and the unit-per-row tile kernels) and quadratically for
/// the reference. The device's bytes in use are read before the call, after the forward (graph alive), after the
/// backward (gradients alive), and inside the kernels after each of their own allocations and each step of a block
/// ([`crate::kernels::prof::peak_memory`]); the peak is the greatest reading less the first (inputs excluded).
/// At s = 2048 one `[heads, s, s]` f32 tensor is 64 MiB: a GPU attention's whole peak must stay below it. Runs
/// alone (scripts/test-gpu-kernels.sh passes --test-threads=1) so no other test shares the device's counters.
#[test]
fn cube_attention_allocator_peak_linear_in_the_sequence() {
    use crate::kernels::prof::{peak_memory, sample_memory};
    use crate::kernels::{blockwise, with_cube_attention, with_fused, CubeAttention};
    use burn::backend::wgpu::WgpuRuntime;
    use burn::tensor::backend::Backend;
    use cubecl::Runtime;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    let (nh, nkv, hd) = (4, 2, 64);
    // None: the reference.
    let peak = |s: usize, kernel: Option<CubeAttention>| -> u64 {
        let spec = check::case_spec(&check::AttnCase {
            batch: 1,
            seq: s,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window: None,
            packed: false,
            padded: false,
            softcap: None,
        });
        let width = (nh + 2 * nkv) * hd;
        let t = Tensor::<AD, 2>::from_data(
            TensorData::new(rand_vec(s * width, 3), [s, width]),
            (&dev, DType::F32),
        )
        .require_grad();
        W::sync(&dev).unwrap();
        let client = WgpuRuntime::client(&dev);
        let read = move || client.memory_usage().unwrap().bytes_in_use;
        let (_, peak) = peak_memory(read, || {
            let att =
                Attention::<AD>::new(spec, DType::F32, &dev, Attention::<AD>::shared_tables());
            let y = match kernel {
                Some(k) => with_fused(true, || {
                    with_cube_attention(k, || {
                        <AD as Kernels>::rope_attention(Qkv::Packed(t.clone()), &att)
                    })
                }),
                None => reference::attention(Qkv::Packed(t.clone()), &att),
            };
            sample_memory();
            let grads = y.sum().backward();
            let g = t.grad(&grads).expect("the input's gradient");
            sample_memory();
            assert_eq!(g.dims(), [s, width]);
        });
        peak
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let scores = (nh * 2048 * 2048 * 4) as u64;
    // The reference keeps its [s, s] scores and probabilities; one block of every row is the same arithmetic
    // inside the blockwise kernel, whose temporaries only the readings inside the kernel see. Both must show
    // quadratic growth: the measurement can tell.
    for (what, kernel) in [
        ("reference", None),
        (
            "blockwise in one block",
            Some(CubeAttention::Blockwise(1 << 20)),
        ),
    ] {
        let (q1, q2) = (peak(1024, kernel), peak(2048, kernel));
        let qr = q2 as f64 / q1 as f64;
        println!("{what}: {:.1} → {:.1} MiB (×{qr:.2})", mib(q1), mib(q2));
        assert!(
            q1 > 0 && qr > 3.2 && q2 > scores,
            "{what} attention peaked at {q1} B and {q2} B (×{qr:.2}): expected quadratic growth"
        );
    }
    for kernel in [
        CubeAttention::Blockwise(blockwise::BLOCK_ROWS),
        CubeAttention::Tile,
    ] {
        let (f1, f2) = (peak(1024, Some(kernel)), peak(2048, Some(kernel)));
        let fr = f2 as f64 / f1 as f64;
        println!("{kernel:?}: {:.1} → {:.1} MiB (×{fr:.2})", mib(f1), mib(f2));
        assert!(
            f1 > 0 && fr < 2.3 && f2 < scores,
            "{kernel:?} attention peaked at {f1} B (s=1024) and {f2} B (s=2048, ×{fr:.2}; one [heads, s, s] \
             f32 tensor is {scores} B): not linear"
        );
    }
}

/// The fused loss swept 4 rows at a time (six chunks, the last one short) equals the reference: the summed
/// loss and d(selected rows), with and without the soft-cap.
#[test]
fn cube_lm_head_cross_entropy_in_chunks() {
    use crate::kernels::{LinearRef, Targets};
    let dev = Default::default();
    let (n, d, vocab) = (23, 40, 1001);
    let rows: Vec<usize> = (0..n).filter(|r| r % 5 != 4).collect();
    let targets: Vec<usize> = rows.iter().map(|r| (r * 7919 + 13) % vocab).collect();
    let h: Vec<f32> = rand_vec(n * d, 31).iter().map(|v| v * 2.0).collect();
    let w = rand_vec(vocab * d, 32);
    for cap in [None, Some(3.0)] {
        let weight = crate::quant::Frozen::Dense(Tensor::<AD, 2>::from_data(
            TensorData::new(w.clone(), [vocab, d]),
            &dev,
        ));
        let head = LinearRef {
            weight: &weight,
            bias: None,
            adapter: None,
        };
        let x = Tensor::<AD, 2>::from_data(TensorData::new(h.clone(), [n, d]), &dev).require_grad();
        let t = Targets {
            rows: &rows,
            targets: &targets,
            softcap: cap,
        };
        let loss = reference::lm_head_cross_entropy(x.clone(), &head, &t);
        let g = x.grad(&loss.clone().backward()).expect("d hidden");
        let want: Vec<f32> = rows
            .iter()
            .flat_map(|&r| to_vec(g.clone().slice(r..r + 1)))
            .collect();
        let hw = Tensor::<W, 2>::from_data(TensorData::new(h.clone(), [n, d]), &dev);
        let idx = super::row_index::<W>(&rows, &dev);
        let ww = Tensor::<W, 2>::from_data(TensorData::new(w.clone(), [vocab, d]), &dev);
        let capf = cap.map_or(0.0, |c| c as f32);
        let (l4, dh4) = super::lm_xent(hw.select(0, idx), &ww, &targets, capf, true, 4);
        let dl = check::rel_diff(&to_vec(l4), &to_vec(loss));
        let dg = check::rel_diff(&to_vec(dh4.expect("gradient")), &want);
        assert!(dl <= 1e-5, "cap {cap:?}: chunked loss differs by {dl}");
        assert!(dg <= 1e-5, "cap {cap:?}: chunked gradient differs by {dg}");
    }
}

/// A random but valid `[rows, cols]` matrix of GGUF type `ty`; with `wild_scales`, every f16 scale field (d, dmin /
/// m) replaced by random finite f16 bits — signs, subnormals and zeros included — so the device's f16 widening is
/// exercised over the whole range.
fn quant_matrix(
    ty: crate::gguf::GgmlType,
    rows: usize,
    cols: usize,
    seed: u64,
    wild_scales: bool,
) -> crate::quant::QMatrix {
    use crate::gguf::GgmlType as G;
    use crate::quant::QMatrix;
    let q = QMatrix::random_ggml(ty, rows, cols, 0.05, seed).expect("random blocks");
    if !wild_scales {
        return q;
    }
    let (_, blocks) = q.ggml_blocks().expect("ggml");
    let mut blocks = blocks.to_vec();
    let fields: &[usize] = match ty {
        G::Q8_0 | G::Q4_0 => &[0],
        G::Q4_1 | G::Q4_K | G::Q5_K => &[0, 2],
        G::Q6_K => &[208],
        other => panic!("no scale fields for {other}"),
    };
    let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    for b in blocks.chunks_exact_mut(ty.type_size()) {
        for &off in fields {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mut h = (s >> 24) as u16;
            if (h >> 10) & 0x1F == 0x1F {
                h &= !(1 << 14); // no infinities / NaNs
            }
            b[off..off + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    QMatrix::ggml(ty, rows, cols, blocks).expect("same layout")
}

/// Every kept GGUF type dequantized on the device equals the host reference (`QMatrix::to_f32` /
/// `dequant_rows`) bit for bit in f32 — whole matrices and a row range starting mid-matrix, realistic and
/// full-range scales — and within f16 rounding in f16. The blocks are uploaded once per matrix and device.
#[test]
fn cube_dequantizes_every_gguf_type_bit_exactly() {
    use super::quant::{cached_copies, cached_matrices, dequant, device_blocks};
    use crate::quant::KEPT_GGML;
    use burn::backend::wgpu::WgpuRuntime;
    let dev = Default::default();
    let (rows, cols) = (6, 512);
    for &ty in KEPT_GGML {
        for wild in [false, true] {
            let q = Arc::new(quant_matrix(ty, rows, cols, 11, wild));
            let dq = device_blocks::<WgpuRuntime>(&q, &dev).expect("uploaded");
            let again = device_blocks::<WgpuRuntime>(&q, &dev).expect("cached");
            assert_eq!(cached_copies(&q), 1, "{ty}: uploaded once");
            assert_eq!(
                again.words.meta.shape().num_elements(),
                q.bytes().div_ceil(4),
                "{ty}: words"
            );
            let host = q.to_f32();
            let dev_vals = |r0: usize, r1: usize, dtype: DType| -> Vec<f32> {
                to_vec(Tensor::<W, 2>::from_primitive(
                    burn::tensor::TensorPrimitive::Float(dequant(&dq, r0, r1, dtype)),
                ))
            };
            for (r0, r1) in [(0, rows), (3, 5)] {
                let got = dev_vals(r0, r1, DType::F32);
                let want = &host[r0 * cols..r1 * cols];
                let bad: Vec<(usize, f32, f32)> = got
                    .iter()
                    .zip(want)
                    .enumerate()
                    .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
                    .map(|(i, (g, w))| (i, *g, *w))
                    .take(5)
                    .collect();
                assert!(
                    got.len() == want.len() && bad.is_empty(),
                    "{ty} (wild scales {wild}) rows {r0}..{r1}: {} values, first differences (index, device, host) {bad:?}",
                    got.len()
                );
            }
            let h16 = dev_vals(0, rows, DType::F16);
            let want16: Vec<f32> = host
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            if !wild {
                let d = check::rel_diff(&h16, &want16);
                assert!(d <= 1e-3, "{ty} in f16: {d}");
            }
        }
    }
    // A dropped matrix's copy is swept on the next upload.
    let before = cached_matrices();
    let q = Arc::new(quant_matrix(crate::gguf::GgmlType::Q8_0, 2, 64, 5, false));
    device_blocks::<WgpuRuntime>(&q, &dev).expect("uploaded");
    assert!(
        cached_matrices() <= 1,
        "stale copies kept: {before} before, {} after",
        cached_matrices()
    );
}

/// A `[rows, cols]` NF4 matrix (bitsandbytes, block 64, with or without double quantization) of random weights,
/// the first block all zeros (absmax 0: signed zeros on both sides).
fn nf4_matrix(rows: usize, cols: usize, seed: u64, double: bool) -> crate::quant::QMatrix {
    use crate::quant::{QMatrix, QuantScheme};
    let mut v: Vec<f32> = rand_vec(rows * cols, seed)
        .iter()
        .map(|x| x * 0.05)
        .collect();
    v[..64.min(rows * cols)].fill(0.0);
    QMatrix::quantize(&v, rows, cols, QuantScheme::Nf4 { double }).expect("NF4 matrix")
}

/// NF4 (plain and double-quantized absmax) dequantized on the device equals the host reference bit for bit in
/// f32 — whole matrices and row ranges starting off a block, off a byte (odd cols) — and within f16 rounding in
/// f16. The codes and the resolved absmax values are uploaded once per matrix and device.
#[test]
fn cube_dequantizes_nf4_bit_exactly() {
    use super::quant::{cached_copies, dequant, device_blocks, is_device_quant};
    use crate::quant::Frozen;
    use burn::backend::wgpu::WgpuRuntime;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    for double in [false, true] {
        for (rows, cols) in [(6, 512), (7, 200), (9, 77)] {
            let q = Arc::new(nf4_matrix(rows, cols, 61 + cols as u64, double));
            let label = format!("NF4 double {double} [{rows}, {cols}]");
            let w = Frozen::<W>::Quant {
                q: q.clone(),
                dtype: DType::F32,
                device: dev.clone(),
            };
            assert!(is_device_quant(&w), "{label}: device-decodable");
            let dq = device_blocks::<WgpuRuntime>(&q, &dev).expect("uploaded");
            let again = device_blocks::<WgpuRuntime>(&q, &dev).expect("cached");
            assert_eq!(cached_copies(&q), 1, "{label}: uploaded once");
            let nf4 = q.nf4_data().expect("nf4");
            assert_eq!(
                again.words.meta.shape().num_elements(),
                nf4.packed.len().div_ceil(4),
                "{label}: words"
            );
            assert_eq!(
                again.table.as_ref().map(|t| t.meta.shape().num_elements()),
                Some(16 + (rows * cols).div_ceil(64)),
                "{label}: table"
            );
            let host = q.to_f32();
            let dev_vals = |r0: usize, r1: usize, dtype: DType| -> Vec<f32> {
                to_vec(Tensor::<W, 2>::from_primitive(
                    burn::tensor::TensorPrimitive::Float(dequant(&dq, r0, r1, dtype)),
                ))
            };
            for (r0, r1) in [(0, rows), (3, 5), (1, 2), (rows - 1, rows), (2, 2)] {
                let got = dev_vals(r0, r1, DType::F32);
                let mut want = vec![0f32; (r1 - r0) * cols];
                q.dequant_rows(r0, r1, &mut want);
                assert_eq!(&want[..], &host[r0 * cols..r1 * cols]);
                let bad: Vec<(usize, f32, f32)> = got
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
                    .map(|(i, (g, w))| (i, *g, *w))
                    .take(5)
                    .collect();
                assert!(
                    got.len() == want.len() && bad.is_empty(),
                    "{label} rows {r0}..{r1}: {} values, first differences (index, device, host) {bad:?}",
                    got.len()
                );
            }
            let h16 = dev_vals(0, rows, DType::F16);
            let want16: Vec<f32> = host
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            let d = check::rel_diff(&h16, &want16);
            assert!(d <= 1e-3, "{label} in f16: {d}");
        }
    }
}

/// The matrices the quantized-path tests run on: every kept GGUF type `[rows, 256]`, and NF4 with and without
/// double quantization `[rows, 200]` (cols not a multiple of the block: rows and tiles start mid-block).
fn quant_cases(rows: usize, seed: u64) -> Vec<(String, Arc<crate::quant::QMatrix>)> {
    use crate::quant::KEPT_GGML;
    let mut v: Vec<(String, Arc<crate::quant::QMatrix>)> = KEPT_GGML
        .iter()
        .map(|&ty| {
            (
                ty.to_string(),
                Arc::new(quant_matrix(ty, rows, 256, seed, false)),
            )
        })
        .collect();
    for double in [false, true] {
        let q = nf4_matrix(rows, 200, seed, double);
        v.push((q.format(), Arc::new(q)));
    }
    v
}

/// `Σ y ∘ up` in f32.
fn dot2<B: burn::tensor::backend::Backend>(y: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 1> {
    (y.cast(DType::F32) * up.cast(DType::F32)).sum()
}

/// A linear group of two members — a quantized W `q` (`[40, d]`) with a LoRA adapter, a dense W with a bias —
/// through the fused path (device dequantization, the frozen-product op) and the reference (host dequantization):
/// (max relative difference of the output, of the gradients of x, A and B).
fn quant_group_case(
    ty: &str,
    q: &Arc<crate::quant::QMatrix>,
    dtype: DType,
    dropout: bool,
    tile: Option<usize>,
) -> (f32, f32) {
    use crate::kernels::{with_fused, AdapterRef, LinearRef};
    use crate::quant::Frozen;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    let (n, d, out0, out1, r) = (7, q.cols(), q.rows(), 24, 4);
    let xv = rand_vec(n * d, 22);
    let w1 = rand_vec(out1 * d, 23);
    let bias = rand_vec(out1, 24);
    let av = rand_vec(r * d, 25);
    let bv = rand_vec(out0 * r, 26);
    let mask: Vec<f32> = rand_vec(n * d, 27)
        .iter()
        .map(|v| if *v > 0.0 { 2.0 } else { 0.0 })
        .collect();
    let up = rand_vec(n * (out0 + out1), 28);
    let t = |v: &[f32], shape: [usize; 2], dtype: DType| {
        Tensor::<AD, 2>::from_data(TensorData::new(v.to_vec(), shape), (&dev, dtype))
    };
    let run = |fused: bool| {
        with_fused(fused, || {
            let x = t(&xv, [n, d], dtype).require_grad();
            let a = t(&av, [r, d], DType::F32).require_grad();
            let b = t(&bv, [out0, r], DType::F32).require_grad();
            let wq = Frozen::<AD>::Quant {
                q: q.clone(),
                dtype,
                device: dev.clone(),
            };
            let wd = Frozen::Dense(t(&w1, [out1, d], dtype));
            let bias =
                Tensor::<AD, 1>::from_data(TensorData::new(bias.clone(), [out1]), (&dev, dtype));
            let members = [
                LinearRef {
                    weight: &wq,
                    bias: None,
                    adapter: Some(AdapterRef {
                        a: &a,
                        b: &b,
                        scale: 2.0,
                        mask: dropout.then(|| t(&mask, [n, d], DType::F32)),
                    }),
                },
                LinearRef {
                    weight: &wd,
                    bias: Some(&bias),
                    adapter: None,
                },
            ];
            let y = if fused {
                let go = || <AD as Kernels>::lora_linear_group(x.clone(), &members);
                match tile {
                    Some(e) => super::quant::with_tile_elements(e, go),
                    None => go(),
                }
            } else {
                reference::linear_group(x.clone(), &members)
            };
            let g = dot2(y.clone(), t(&up, [n, out0 + out1], dtype)).backward();
            let mut grads = x.grad(&g).map(to_vec).unwrap_or_default();
            grads.extend(a.grad(&g).map(to_vec).unwrap_or_default());
            grads.extend(b.grad(&g).map(to_vec).unwrap_or_default());
            (to_vec(y), grads)
        })
    };
    let (yf, gf) = run(true);
    let (yr, gr) = run(false);
    assert!(
        yf.iter().chain(&gf).all(|v| v.is_finite()),
        "{ty} {dtype:?}: non-finite"
    );
    assert_eq!(gf.len(), gr.len(), "{ty} {dtype:?}: missing gradients");
    assert_eq!(gf.len(), n * d + r * d + out0 * r);
    (check::rel_diff(&yf, &yr), check::rel_diff(&gf, &gr))
}

/// The quantized linear group (device dequantization + the frozen-product op) equals the reference on the
/// host-dequantized weights for every kept GGUF type and NF4 (with and without double quantization): output and
/// the gradients of x, A and B, within 1e-5 in f32 and the suite's tolerance in f16; with dropout and with W split
/// into row tiles (the last one short; NF4 tiles start mid-block).
#[test]
fn cube_quantized_linear_group_equals_the_reference() {
    let mut report = Vec::new();
    for (ty, q) in quant_cases(40, 21) {
        for (dtype, tol) in [
            (DType::F32, 1e-5),
            (DType::F16, check::tolerance(DType::F16)),
        ] {
            for (dropout, tile) in [(false, None), (true, Some(16 * 256))] {
                let (v, g) = quant_group_case(&ty, &q, dtype, dropout, tile);
                report.push(format!(
                    "{ty} {dtype:?} dropout {dropout} tiles {tile:?}: value {v:.2e}, grad {g:.2e}"
                ));
                assert!(
                    v <= tol && g <= tol,
                    "{ty} {dtype:?} dropout {dropout} tile {tile:?}: value {v:.2e}, grad {g:.2e} (tolerance {tol:.0e})"
                );
            }
        }
    }
    println!("{}", report.join("\n"));
}

/// Dense frozen products through a GEMM strategy chosen by name (`LORATUNE_GEMM`): the group above, its dense
/// member through the chosen strategy's forward and backward op, equals the reference, and so does the fused
/// loss whose chunk GEMMs use it — with a strategy lavapipe runs (`simple_unit`) and with a tensor-core one it
/// cannot (`specialized_tma_mma`: burn's matmul takes over).
#[test]
fn cube_dense_product_with_a_chosen_gemm_equals_the_reference() {
    let (ty, q) = quant_cases(40, 21).remove(0);
    let unit = super::gemm::names().pop().expect("strategies");
    assert!(unit.starts_with("matmul_simple_unit"), "{unit}");
    for name in [unit.as_str(), "specialized_tma_mma"] {
        for dtype in [DType::F32, DType::F16] {
            let tol = if dtype == DType::F32 {
                1e-5
            } else {
                check::tolerance(dtype)
            };
            let (v, g) = super::gemm::with_gemm(Some(name), || {
                quant_group_case(&ty, &q, dtype, false, None)
            });
            assert!(
                v <= tol && g <= tol,
                "{name} {dtype:?}: value {v:.2e}, grad {g:.2e} (tolerance {tol:.0e})"
            );
            // The fused loss's chunk GEMMs take the same strategy.
            let c = super::gemm::with_gemm(Some(name), || {
                check::lm_head_xent::<AD>(&Default::default(), dtype, None)
            });
            assert!(c.passed(), "{name}: {c:?}");
        }
    }
}

/// The same group on the plain (non-autodiff) backend: the frozen product without a graph.
#[test]
fn cube_quantized_linear_group_forward_without_autodiff() {
    use crate::kernels::{with_fused, LinearRef};
    use crate::quant::Frozen;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    let (n, out) = (5, 33);
    for (ty, q) in quant_cases(out, 31) {
        let d = q.cols();
        let w = Frozen::<W>::Quant {
            q,
            dtype: DType::F32,
            device: dev.clone(),
        };
        let x = Tensor::<W, 2>::from_data(TensorData::new(rand_vec(n * d, 32), [n, d]), &dev);
        let m = [LinearRef {
            weight: &w,
            bias: None,
            adapter: None,
        }];
        let fused = super::quant::with_tile_elements(10 * d, || {
            with_fused(true, || <W as Kernels>::lora_linear_group(x.clone(), &m))
        });
        let want = reference::linear_group(x, &m);
        let diff = check::rel_diff(&to_vec(fused), &to_vec(want));
        assert!(diff <= 1e-5, "{ty}: {diff}");
    }
}

/// A quantized lm_head through the fused loss (head dequantized on the device) equals the reference (host
/// dequantization, log-softmax): the summed loss and d(hidden), every kept GGUF type and NF4, f32 and f16, with and
/// without the soft-cap.
#[test]
fn cube_quantized_lm_head_loss_equals_the_reference() {
    use crate::kernels::{with_fused, LinearRef, Targets};
    use crate::quant::Frozen;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    let (n, vocab) = (13, 301);
    let rows: Vec<usize> = (0..n).filter(|r| r % 4 != 3).collect();
    let targets: Vec<usize> = rows.iter().map(|r| (r * 7919 + 13) % vocab).collect();
    for (ty, q) in quant_cases(vocab, 42) {
        let d = q.cols();
        let h: Vec<f32> = rand_vec(n * d, 41).iter().map(|v| v * 4.0).collect();
        for (dtype, tol) in [
            (DType::F32, 1e-5),
            (DType::F16, check::tolerance(DType::F16)),
        ] {
            for cap in [None, Some(3.0)] {
                let t = Targets {
                    rows: &rows,
                    targets: &targets,
                    softcap: cap,
                };
                let run = |fused: bool| {
                    with_fused(fused, || {
                        let weight = Frozen::<AD>::Quant {
                            q: q.clone(),
                            dtype,
                            device: dev.clone(),
                        };
                        let head = LinearRef {
                            weight: &weight,
                            bias: None,
                            adapter: None,
                        };
                        let x = Tensor::<AD, 2>::from_data(
                            TensorData::new(h.clone(), [n, d]),
                            (&dev, dtype),
                        )
                        .require_grad();
                        let loss = if fused {
                            <AD as Kernels>::lm_head_cross_entropy(x.clone(), &head, &t)
                        } else {
                            reference::lm_head_cross_entropy(x.clone(), &head, &t)
                        };
                        let g = loss.clone().backward();
                        (to_vec(loss), x.grad(&g).map(to_vec).unwrap_or_default())
                    })
                };
                let (lf, gf) = run(true);
                let (lr, gr) = run(false);
                let (dl, dg) = (check::rel_diff(&lf, &lr), check::rel_diff(&gf, &gr));
                println!("{ty} {dtype:?} cap {cap:?}: loss {dl:.2e}, d hidden {dg:.2e}");
                assert!(
                    dl <= tol && dg <= tol && gf.len() == n * d,
                    "{ty} {dtype:?} cap {cap:?}: loss {lf:?} vs {lr:?} ({dl:.2e}), d hidden {dg:.2e}"
                );
            }
        }
    }
}

/// What a tracked quantized linear keeps on the device from its forward to its backward: the fused op saves only
/// the resident blocks' handle (nothing new after the first upload but its output), the reference a dense copy of
/// W. Runs alone (scripts/test-gpu-kernels.sh passes --test-threads=1) so no other test shares the counters.
#[test]
fn cube_quantized_linear_keeps_no_dense_weight() {
    use crate::kernels::{with_fused, LinearRef};
    use crate::quant::Frozen;
    use burn::backend::wgpu::WgpuRuntime;
    use burn::tensor::backend::Backend;
    use cubecl::Runtime;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    let client = WgpuRuntime::client(&dev);
    let (n, d, out) = (4, 1024, 2048);
    let q = Arc::new(quant_matrix(crate::gguf::GgmlType::Q4_K, out, d, 51, false));
    let w = Frozen::<AD>::Quant {
        q,
        dtype: DType::F32,
        device: dev.clone(),
    };
    let held = |fused: bool| -> u64 {
        with_fused(fused, || {
            let x = Tensor::<AD, 2>::from_data(TensorData::new(rand_vec(n * d, 52), [n, d]), &dev)
                .require_grad();
            let m = [LinearRef {
                weight: &w,
                bias: None,
                adapter: None,
            }];
            // Warm up: the device copy is uploaded once, outside the measurement.
            drop(<AD as Kernels>::lora_linear_group(x.clone(), &m));
            W::sync(&dev).unwrap();
            let before = client.memory_usage().unwrap().bytes_in_use;
            let y = if fused {
                <AD as Kernels>::lora_linear_group(x.clone(), &m)
            } else {
                reference::linear_group(x.clone(), &m)
            };
            W::sync(&dev).unwrap();
            let after = client.memory_usage().unwrap().bytes_in_use;
            let g = y.sum().backward();
            assert!(x.grad(&g).is_some());
            after.saturating_sub(before)
        })
    };
    let (f, r) = (held(true), held(false));
    let dense = (out * d * 4) as u64;
    println!("held after the forward: fused {f} B, reference {r} B (dense W {dense} B)");
    assert!(
        r >= dense,
        "the reference held {r} B: the measurement cannot see a dense W"
    );
    assert!(
        f < dense / 4,
        "the fused op held {f} B after its forward (dense W {dense} B)"
    );
}
