//! The CubeCL kernels on wgpu (Mesa lavapipe in CI: `--features wgpu`), against the reference implementation on
//! the same backend: values and the gradients of q, k and v, for every mask variant, grouped heads, ragged
//! lengths, several head dims, f32 and f16.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor, TensorData};
use rand::{Rng, SeedableRng};

use crate::kernels::{reference, Attention, AttnSpec, Kernels, Masking, Qkv, Rope};

type W = burn::backend::Wgpu<f32, i32>;
type AD = Autodiff<W>;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn to_vec<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    packed: bool,
    padded: bool,
    softcap: Option<f64>,
    dtype: DType,
}

/// Max |a − b| relative to max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn check(c: Case) {
    let dev = Default::default();
    let (b, s, nh, nkv, hd) = (c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
    let n = b * s;
    let half = hd / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
        .collect();
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    let mut key_valid = vec![vec![true; s]; b];
    if c.padded {
        for v in key_valid[b - 1][s - s / 5..].iter_mut() {
            *v = false;
        }
    }
    let segments: Option<Vec<u32>> = c
        .packed
        .then(|| (0..n).map(|p| u32::from(p % s >= s / 3)).collect());
    let masking = Masking {
        key_valid: key_valid.concat(),
        segments,
        window: c.window,
    };
    let spec = AttnSpec {
        batch: b,
        seq: s,
        keys: s,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        softcap: c.softcap,
        rope: Arc::new(Rope::new(&inv_freq, &positions)),
        masking: Arc::new(masking),
    };
    let width = (nh + 2 * nkv) * hd;
    // Scores of a few units: the softmax is neither flat nor one-hot.
    let x: Vec<f32> = rand_vec(n * width, 7).iter().map(|v| v * 2.0).collect();
    // The upstream gradient of padding rows is zero, as in a model (padding never reaches the loss): a padding
    // row with no open key (its window holds only padding) attends to itself in the reference mask and to
    // nothing in the kernel, a difference no gradient can see.
    let dy: Vec<f32> = rand_vec(n * nh * hd, 8)
        .chunks(nh * hd)
        .enumerate()
        .flat_map(|(t, r)| {
            let real = key_valid[t / s][t % s];
            r.iter().map(move |&v| if real { v } else { 0.0 })
        })
        .collect();
    let run = |fused: bool| {
        crate::kernels::with_fused(fused, || {
            let att = Attention::<AD>::new(
                spec.clone(),
                c.dtype,
                &dev,
                Attention::<AD>::shared_tables(),
            );
            let t =
                Tensor::<AD, 2>::from_data(TensorData::new(x.clone(), [n, width]), (&dev, c.dtype))
                    .require_grad();
            let y = if fused {
                <AD as Kernels>::rope_attention(Qkv::Packed(t.clone()), &att)
            } else {
                reference::attention(Qkv::Packed(t.clone()), &att)
            };
            let up = Tensor::<AD, 2>::from_data(
                TensorData::new(dy.clone(), [n, nh * hd]),
                (&dev, c.dtype),
            );
            let g = (y.clone().cast(DType::F32) * up.cast(DType::F32))
                .sum()
                .backward();
            (to_vec(y), to_vec(t.grad(&g).expect("dqkv")))
        })
    };
    let (yf, gf) = run(true);
    let (yr, gr) = run(false);
    // Padded query rows are never used; compare real rows.
    let real = |v: &[f32], w: usize| -> Vec<f32> {
        v.chunks(w)
            .enumerate()
            .filter(|(t, _)| key_valid[t / s][t % s])
            .flat_map(|(_, r)| r.to_vec())
            .collect()
    };
    let tol = if c.dtype == DType::F32 { 1e-4 } else { 1e-2 };
    assert!(
        yf.iter().chain(&gf).all(|v| v.is_finite()),
        "{c:?}: non-finite values"
    );
    let dy_ = rel_diff(&real(&yf, nh * hd), &real(&yr, nh * hd));
    let dg = rel_diff(&gf, &gr);
    assert!(dy_ <= tol, "{c:?}: output differs by {dy_} (relative)");
    assert!(dg <= tol, "{c:?}: d(q|k|v) differs by {dg} (relative)");
}

const BASE: Case = Case {
    batch: 2,
    seq: 70,
    heads: 4,
    kv_heads: 2,
    head_dim: 64,
    window: None,
    packed: false,
    padded: true,
    softcap: None,
    dtype: DType::F32,
};

#[test]
fn cube_attention_causal_padded_gqa() {
    check(BASE);
}

#[test]
fn cube_attention_window_packing_softcap() {
    check(Case {
        window: Some(17),
        packed: true,
        ..BASE
    });
    check(Case {
        softcap: Some(50.0),
        ..BASE
    });
    check(Case {
        window: Some(9),
        softcap: Some(20.0),
        packed: true,
        kv_heads: 1,
        ..BASE
    });
}

#[test]
fn cube_attention_head_dims_and_ragged_lengths() {
    for (hd, seq) in [(80, 33), (128, 65), (256, 19)] {
        check(Case {
            head_dim: hd,
            seq,
            heads: 2,
            kv_heads: 2,
            ..BASE
        });
    }
}

#[test]
fn cube_attention_f16() {
    check(Case {
        dtype: DType::F16,
        ..BASE
    });
    check(Case {
        dtype: DType::F16,
        window: Some(17),
        packed: true,
        ..BASE
    });
}

/// One whole training step's loss and LoRA gradients on wgpu (fused attention, reference elsewhere) against the
/// CPU step, on tiny parity fixtures: Llama (grouped heads) and Gemma 2 (sliding window, soft-capping), LoRA on
/// every linear layer with dropout, a padded two-row batch and a packed row, with and without layer recompute.
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
            lr: 1e-3,
            max_grad_norm: 1.0,
            seed: 5,
            step: 0,
            recompute,
        };
        let g = step_gradients(&m, micro, cfg).unwrap();
        let v = g.grads.into_iter().map(to_vec).collect();
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
    for family in ["llama", "gemma2"] {
        let (cpu_loss, cpu) =
            grads::<Autodiff<Flex>>(family, &Default::default(), &micro, Checkpointing::Off);
        for recompute in [Checkpointing::Off, Checkpointing::Layers] {
            let (loss, gpu) = grads::<AD>(family, &Default::default(), &micro, recompute);
            assert!(
                ((loss - cpu_loss) / cpu_loss).abs() < 1e-5,
                "{family} {recompute}: loss {loss} on wgpu, {cpu_loss} on the CPU"
            );
            for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
                let d = rel_diff(g, c);
                assert!(
                    d < 1e-4,
                    "{family} {recompute}: gradient {i} differs by {d} (relative)"
                );
            }
        }
    }
}

/// What the attention keeps on the device from its forward to its backward grows linearly with the sequence for
/// the kernel (inputs, output, one float per row) and quadratically for the reference (its `[s, s]` scores and
/// probabilities, and the mask): device bytes in use after the forward, graph alive, at s and 2s. Runs alone
/// (scripts/test-gpu-kernels.sh passes --test-threads=1) so no other test shares the device's counters.
#[test]
fn cube_attention_holds_memory_linear_in_the_sequence() {
    use burn::backend::wgpu::WgpuRuntime;
    use burn::tensor::backend::Backend;
    use cubecl::Runtime;
    let dev: <W as burn::tensor::backend::BackendTypes>::Device = Default::default();
    let client = WgpuRuntime::client(&dev);
    let (nh, nkv, hd) = (4, 2, 64);
    let held = |s: usize, fused: bool| -> u64 {
        crate::kernels::with_fused(fused, || {
            let positions: Vec<u32> = (0..s as u32).collect();
            let masking = Masking {
                key_valid: vec![true; s],
                segments: None,
                window: None,
            };
            let spec = AttnSpec {
                batch: 1,
                seq: s,
                keys: s,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale: 0.125,
                softcap: None,
                rope: Arc::new(Rope::new(&[1.0, 0.1], &positions)),
                masking: Arc::new(masking),
            };
            let width = (nh + 2 * nkv) * hd;
            let t = Tensor::<AD, 2>::from_data(
                TensorData::new(rand_vec(s * width, 3), [s, width]),
                (&dev, DType::F32),
            )
            .require_grad();
            let att =
                Attention::<AD>::new(spec, DType::F32, &dev, Attention::<AD>::shared_tables());
            W::sync(&dev).unwrap();
            let before = client.memory_usage().unwrap().bytes_in_use;
            let y = if fused {
                <AD as Kernels>::rope_attention(Qkv::Packed(t.clone()), &att)
            } else {
                reference::attention(Qkv::Packed(t.clone()), &att)
            };
            W::sync(&dev).unwrap();
            let after = client.memory_usage().unwrap().bytes_in_use;
            drop((y, att, t));
            after.saturating_sub(before)
        })
    };
    let (f1, f2) = (held(512, true), held(1024, true));
    let (r1, r2) = (held(512, false), held(1024, false));
    let (fr, rr) = (f2 as f64 / f1 as f64, r2 as f64 / r1 as f64);
    println!("held after the forward: fused {f1} B → {f2} B (×{fr:.2}), reference {r1} B → {r2} B (×{rr:.2})");
    assert!(f1 > 0 && r1 > 0, "no device memory measured ({f1}, {r1})");
    assert!(
        fr < 2.3,
        "fused attention held {f1} B at s=512 and {f2} B at s=1024 (×{fr:.2}): not linear"
    );
    // The reference keeps [s, s] tensors: the measurement can tell the two apart.
    assert!(
        rr > 3.0,
        "reference attention held {r1} B and {r2} B (×{rr:.2}): expected quadratic growth"
    );
}

/// The fused act(gate)·up against the reference on the same backend, for each activation (SiLU, GELU tanh, GELU
/// erf): values and the packed input's gradient, f32 and f16, a size that is not a multiple of any workgroup.
#[test]
fn cube_glu_matches_the_reference() {
    use crate::kernels::Activation;
    let dev = Default::default();
    let (n, i) = (37, 50);
    let x: Vec<f32> = rand_vec(n * 2 * i, 11).iter().map(|v| v * 4.0).collect();
    let dy = rand_vec(n * i, 12);
    for (act, dtype) in [Activation::Silu, Activation::GeluTanh, Activation::Gelu]
        .into_iter()
        .flat_map(|a| [(a, DType::F32), (a, DType::F16)])
    {
        let run = |fused: bool| {
            crate::kernels::with_fused(fused, || {
                let t = Tensor::<AD, 2>::from_data(
                    TensorData::new(x.clone(), [n, 2 * i]),
                    (&dev, dtype),
                )
                .require_grad();
                let y = if fused {
                    <AD as Kernels>::glu(t.clone(), act)
                } else {
                    reference::glu(t.clone(), act)
                };
                let up =
                    Tensor::<AD, 2>::from_data(TensorData::new(dy.clone(), [n, i]), (&dev, dtype));
                let g = (y.clone().cast(DType::F32) * up.cast(DType::F32))
                    .sum()
                    .backward();
                (to_vec(y), to_vec(t.grad(&g).expect("d(gate|up)")))
            })
        };
        let ((yf, gf), (yr, gr)) = (run(true), run(false));
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        assert!(
            rel_diff(&yf, &yr) <= tol,
            "{act:?} {dtype:?}: output differs by {}",
            rel_diff(&yf, &yr)
        );
        assert!(
            rel_diff(&gf, &gr) <= tol,
            "{act:?} {dtype:?}: gradient differs by {}",
            rel_diff(&gf, &gr)
        );
    }
}

/// The fused RMSNorm against the reference on the same backend: values and the input's gradient, a plain and a
/// Gemma-style (1 + w) weight, a hidden size that is not a multiple of the cube, token rows and per-head rows
/// (q/k norms over head_dim), f32 and f16.
#[test]
fn cube_rms_norm_matches_the_reference() {
    use crate::kernels::NormRef;
    let dev = Default::default();
    for (dims, offset, dtype) in [
        (vec![37usize, 300usize], 0.0f32, DType::F32),
        (vec![37, 300], 1.0, DType::F32),
        (vec![2, 5, 3, 64], 0.0, DType::F32),
        (vec![37, 300], 0.0, DType::F16),
    ] {
        let n: usize = dims.iter().product();
        let h = *dims.last().unwrap();
        let x: Vec<f32> = rand_vec(n, 21).iter().map(|v| v * 3.0).collect();
        let w = rand_vec(h, 22);
        let dy = rand_vec(n, 23);
        let run = |fused: bool| {
            crate::kernels::with_fused(fused, || {
                let weight =
                    Tensor::<AD, 1>::from_data(TensorData::new(w.clone(), [h]), (&dev, dtype));
                let norm = NormRef {
                    weight: &weight,
                    eps: 1e-6,
                    offset,
                };
                let t = Tensor::<AD, 1>::from_data(TensorData::new(x.clone(), [n]), (&dev, dtype))
                    .require_grad();
                let shaped = |t: Tensor<AD, 1>| -> Tensor<AD, 4> {
                    let d4 = if dims.len() == 4 {
                        [dims[0], dims[1], dims[2], dims[3]]
                    } else {
                        [1, 1, dims[0], dims[1]]
                    };
                    t.reshape(d4)
                };
                let xin = shaped(t.clone());
                let y = if fused {
                    <AD as Kernels>::rms_norm(xin, &norm)
                } else {
                    reference::rms_norm(xin, &norm)
                };
                let up = shaped(Tensor::<AD, 1>::from_data(
                    TensorData::new(dy.clone(), [n]),
                    (&dev, dtype),
                ));
                let g = (y.clone().cast(DType::F32) * up.cast(DType::F32))
                    .sum()
                    .backward();
                (to_vec(y), to_vec(t.grad(&g).expect("dx")))
            })
        };
        let ((yf, gf), (yr, gr)) = (run(true), run(false));
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let (dyv, dg) = (rel_diff(&yf, &yr), rel_diff(&gf, &gr));
        assert!(
            dyv <= tol,
            "{dims:?} offset {offset} {dtype:?}: output differs by {dyv}"
        );
        assert!(
            dg <= tol,
            "{dims:?} offset {offset} {dtype:?}: gradient differs by {dg}"
        );
    }
}

/// The fused `lm_head` + cross-entropy against the reference on the same backend: the summed loss and the hidden
/// states' gradient (under an incoming gradient of 0.5, so the backward's scaling is checked), a vocabulary that is
/// not a multiple of the cube, unselected rows (their gradient must be zero), with and without Gemma 2's final
/// soft-cap, f32 and f16; and the chunked sweep (4 rows at a time) equal to one chunk.
#[test]
fn cube_lm_head_cross_entropy_matches_the_reference() {
    use crate::kernels::{LinearRef, Targets};
    let dev = Default::default();
    let (n, d, vocab) = (23, 40, 1001);
    let rows: Vec<usize> = (0..n).filter(|r| r % 5 != 4).collect();
    let targets: Vec<usize> = rows.iter().map(|r| (r * 7919 + 13) % vocab).collect();
    let h: Vec<f32> = rand_vec(n * d, 31).iter().map(|v| v * 2.0).collect();
    let w = rand_vec(vocab * d, 32);
    for (cap, dtype) in [
        (None, DType::F32),
        (Some(3.0), DType::F32),
        (None, DType::F16),
        (Some(3.0), DType::F16),
    ] {
        let t = Targets {
            rows: &rows,
            targets: &targets,
            softcap: cap,
        };
        let run = |fused: bool| {
            crate::kernels::with_fused(fused, || {
                let weight = Tensor::<AD, 2>::from_data(
                    TensorData::new(w.clone(), [vocab, d]),
                    (&dev, dtype),
                );
                let head = LinearRef {
                    weight: &weight,
                    bias: None,
                    adapter: None,
                };
                let x =
                    Tensor::<AD, 2>::from_data(TensorData::new(h.clone(), [n, d]), (&dev, dtype))
                        .require_grad();
                let loss = if fused {
                    <AD as Kernels>::lm_head_cross_entropy(x.clone(), &head, &t)
                } else {
                    reference::lm_head_cross_entropy(x.clone(), &head, &t)
                };
                let g = loss.clone().mul_scalar(0.5).backward();
                (to_vec(loss), to_vec(x.grad(&g).expect("d hidden")))
            })
        };
        let ((lf, gf), (lr, gr)) = (run(true), run(false));
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let (dl, dg) = (rel_diff(&lf, &lr), rel_diff(&gf, &gr));
        assert!(dl <= tol, "cap {cap:?} {dtype:?}: loss {lf:?} vs {lr:?}");
        assert!(dg <= tol, "cap {cap:?} {dtype:?}: gradient differs by {dg}");
        for r in (0..n).filter(|r| !rows.contains(r)) {
            assert!(
                gf[r * d..(r + 1) * d].iter().all(|&v| v == 0.0),
                "row {r} has no target but got a gradient"
            );
        }
        if dtype == DType::F32 {
            let hw = Tensor::<W, 2>::from_data(TensorData::new(h.clone(), [n, d]), &dev);
            let idx = super::row_index::<W>(&rows, &dev);
            let ww = Tensor::<W, 2>::from_data(TensorData::new(w.clone(), [vocab, d]), &dev);
            let capf = cap.map_or(0.0, |c| c as f32);
            let (l4, dh4) = super::lm_xent(hw.select(0, idx), &ww, &targets, capf, true, 4);
            let dh4 = to_vec(dh4.expect("gradient").mul_scalar(0.5));
            let want: Vec<f32> = rows
                .iter()
                .flat_map(|&r| gf[r * d..(r + 1) * d].to_vec())
                .collect();
            assert!(rel_diff(&to_vec(l4), &lf) <= 1e-6, "chunked loss differs");
            assert!(rel_diff(&dh4, &want) <= 1e-6, "chunked gradient differs");
        }
    }
}
