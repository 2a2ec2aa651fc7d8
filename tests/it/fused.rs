//! The fused CPU kernels (src/fast) against the burn implementation on whole models: every fixture architecture
//! (its PEFT fixture adapter where there is one, else an all-linear adapter with random A and B), LoRA dropout
//! on, one forward + backward through `lm_loss_sum` — the loss and every lora_A / lora_B gradient must agree.

use burn::tensor::{Distribution, Tensor};
use loratune::kernels::with_fused;
use loratune::lora::adapter::{lora_params, set_trainable};
use loratune::lora::peft::load_adapter;
use loratune::lora::{attach, LoraInit, LoraSettings, TargetSpec};
use loratune::train::loss::lm_loss_sum;
use loratune::train::step::SeededDropout;

use crate::common::*;
use crate::parity::reference_batch;

fn run(arch: &str, fused: bool) -> (f32, Vec<(String, Vec<f32>)>) {
    let dir = fixture(&format!("adapters/{arch}"));
    let device = Default::default();
    let model_dir = fixture(&format!("models/{arch}"));
    let mut model = load_fixture_model::<AD>(&model_dir, &device);
    if dir.is_dir() {
        load_adapter(&mut model, &dir).unwrap();
    } else {
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            targets: TargetSpec::AllLinear,
            layers: None,
            init: LoraInit::Gaussian,
            seed: 3,
            use_dora: false,
            modules_to_save: Vec::new(),
        };
        attach(&mut model, &settings).unwrap();
        let mut k = 0u64;
        for (_, l) in model.linears_mut() {
            if let Some(a) = &mut l.lora {
                // B = 0 at init would leave dA = 0: give B values.
                k += 1;
                <AD as burn::tensor::backend::Backend>::seed(&device, k);
                a.b = Tensor::random(a.b.dims(), Distribution::Normal(0.0, 0.05), &device);
            }
        }
    }
    for (_, l) in model.linears_mut() {
        if let Some(a) = &mut l.lora {
            a.dropout = 0.1;
        }
    }
    set_trainable(&mut model);
    let reference = if dir.is_dir() { dir } else { model_dir }.join("reference.safetensors");
    let (batch, labels) = reference_batch(&reference);
    with_fused(fused, || {
        let mut drop = SeededDropout::new(7, 3, 0);
        let (loss, n) = lm_loss_sum(&model, &batch, &labels, &mut drop);
        assert!(n > 0);
        let value = to_vec(loss.clone())[0];
        let grads = loss.backward();
        let g = lora_params(&model)
            .into_iter()
            .map(|(k, p)| (k, to_vec(p.grad(&grads).expect("gradient"))))
            .collect();
        (value, g)
    })
}

fn check(adapter: &str) {
    let (l1, g1) = run(adapter, true);
    let (l0, g0) = run(adapter, false);
    assert!(
        ((l1 - l0) / l0).abs() < 1e-5,
        "{adapter}: loss fused {l1} vs plain {l0}"
    );
    assert_eq!(g1.len(), g0.len());
    let mut worst = 0f32;
    for ((k, a), (_, b)) in g1.iter().zip(&g0) {
        let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        let d = max_abs_diff(a, b) / scale;
        assert!(d < 1e-4, "{adapter}: {k}: relative max |Δgrad| {d}");
        worst = worst.max(d);
    }
    println!("{adapter}: fused vs plain loss {l1} / {l0}, worst relative |Δgrad| {worst:.2e}");
}

#[test]
fn fused_kernels_match_burn_on_every_fixture_architecture() {
    let mut names: Vec<String> = std::fs::read_dir(fixture("models"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.safetensors").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.len() >= 7,
        "expected every architecture's fixture, found {names:?}"
    );
    for n in &names {
        check(n);
    }
}
