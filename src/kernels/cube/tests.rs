//! The CubeCL kernels on wgpu (Mesa lavapipe in CI: `--features wgpu`), against the reference implementation on
//! the same backend: values and the gradients of q, k and v, for every mask variant, grouped heads, ragged
//! lengths, several head dims, f32 and f16.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor, TensorData};

use crate::kernels::check::{self, rand_vec, to_vec};
use crate::kernels::{reference, Attention, AttnSpec, Kernels, Masking, Qkv, Rope};

type W = burn::backend::Wgpu<f32, i32>;
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
    assert_eq!(checks.len(), 17, "the suite's cases");
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
                let d = check::rel_diff(g, c);
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
        let weight = Tensor::<AD, 2>::from_data(TensorData::new(w.clone(), [vocab, d]), &dev);
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
