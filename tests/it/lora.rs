//! LoRA parity with PEFT on the fixture adapters (tests/fixtures/adapters/*): forward logits, gradients of every
//! lora_A / lora_B, one AdamW step, grad clipping, merge; plus frozen-base guarantees.

use burn::tensor::Tensor;
use loratune::lora::adapter::{lora_params, set_lora_params, set_trainable};
use loratune::lora::peft::load_adapter;
use loratune::model::NoDropout;
use loratune::train::loss::lm_loss_sum;
use loratune::train::optim::{clip_grad_norm, AdamW, AdamWConfig};

use crate::common::*;
use crate::parity::reference_batch;

/// The fixture base an adapter was made on (its adapter_config.json's `base_model_name_or_path`).
fn base_dir(adapter: &str) -> std::path::PathBuf {
    let cfg = fixture(&format!("adapters/{adapter}/adapter_config.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg).unwrap()).unwrap();
    let base = v["base_model_name_or_path"].as_str().unwrap();
    fixture(base.strip_prefix("tests/fixtures/").unwrap())
}

fn real_positions_diff(a: &[f32], b: &[f32], mask: &[bool], v: usize) -> f32 {
    (0..mask.len())
        .filter(|&p| mask[p])
        .map(|p| max_abs_diff(&a[p * v..(p + 1) * v], &b[p * v..(p + 1) * v]))
        .fold(0.0, f32::max)
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    max_abs_diff(a, b) / scale
}

fn check_forward(adapter: &str) {
    let dir = fixture(&format!("adapters/{adapter}"));
    let reference = dir.join("reference.safetensors");
    let device = Default::default();
    let mut model = load_fixture_model::<B>(&base_dir(adapter), &device);
    load_adapter(&mut model, &dir).unwrap();
    let (batch, labels) = reference_batch(&reference);
    let v = model.config.vocab_size;
    let logits = to_vec(model.forward(&batch));
    let (_, expected) = read_ref(&reference, "logits");
    let d = real_positions_diff(&logits, &expected, &batch.attention_mask, v);
    let (_, exp_loss) = read_ref(&reference, "loss");
    let loss = crate::parity::hf_loss(&logits, &labels, batch.batch, batch.seq, v);
    println!(
        "{adapter}: adapter forward max |Δlogit| = {d:.3e}, loss Δ = {:.3e}",
        (loss - exp_loss[0] as f64).abs()
    );
    assert!(d <= 1e-4, "{adapter}: max |Δlogit| {d}");
    assert!((loss - exp_loss[0] as f64).abs() <= 1e-5);

    // Merged weights give the same logits (PEFT's merge_and_unload reference too).
    loratune::lora::merge_all(&mut model);
    assert!(model.linears().iter().all(|(_, l)| l.lora.is_none()));
    let merged = to_vec(model.forward(&batch));
    let (_, exp_merged) = read_ref(&reference, "merged_logits");
    let dm = real_positions_diff(&merged, &exp_merged, &batch.attention_mask, v);
    println!("{adapter}: merged max |Δlogit| vs PEFT merge_and_unload = {dm:.3e}");
    assert!(dm <= 1e-4, "{adapter}: merged max |Δlogit| {dm}");
}

#[test]
fn peft_forward_llama() {
    check_forward("llama");
}
#[test]
fn peft_forward_llama_rslora() {
    check_forward("llama-rslora");
}
#[test]
fn peft_forward_qwen2() {
    check_forward("qwen2");
}
#[test]
fn peft_forward_phi3_fused() {
    check_forward("phi3");
}
#[test]
fn peft_forward_gemma2() {
    check_forward("gemma2");
}
#[test]
fn peft_forward_falcon_all_linear() {
    check_forward("falcon");
    check_forward("falcon-new");
}
#[test]
fn peft_forward_mixtral_attention() {
    check_forward("mixtral");
}
#[test]
fn peft_forward_mixtral_router_and_experts() {
    check_forward("mixtral-experts");
}

fn check_grads_and_step(adapter: &str) {
    let dir = fixture(&format!("adapters/{adapter}"));
    let reference = dir.join("reference.safetensors");
    let device = Default::default();
    let mut model = load_fixture_model::<AD>(&base_dir(adapter), &device);
    load_adapter(&mut model, &dir).unwrap();
    set_trainable(&mut model);
    let (batch, labels) = reference_batch(&reference);
    let (sum, n) = lm_loss_sum(&model, &batch, &labels, &mut NoDropout);
    let loss = sum.div_scalar(n as f64);
    let grads = loss.backward();

    // The frozen base gets no gradient at all.
    for (path, lin) in model.linears() {
        assert!(
            lin.weight.as_dense().expect("dense").grad(&grads).is_none(),
            "{path}.weight received a gradient"
        );
    }
    assert!(model
        .model
        .embed_tokens
        .weight
        .as_dense()
        .expect("dense")
        .grad(&grads)
        .is_none());

    let params = lora_params(&model);
    let mut gs = Vec::new();
    let mut worst = 0f32;
    for (key, p) in &params {
        let g = p
            .grad(&grads)
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let (_, expected) = read_ref(&reference, &format!("grad.{key}"));
        let got = to_vec(g.clone());
        let e = rel_err(&got, &expected);
        worst = worst.max(e);
        assert!(e <= 1e-4, "{adapter} {key}: grad relative error {e}");
        gs.push(g);
    }
    println!(
        "{adapter}: {} LoRA grads, worst relative error {worst:.3e}",
        params.len()
    );

    // One AdamW step (lr 1e-3, wd 0) and one with wd 0.01, from the same start. Weight decay moves a parameter
    // by only lr·wd·p ≈ 1e-5·p, so the tolerance is 1e-6 (the issue asks 1e-5) to make that difference visible.
    let mut stepped: Vec<Vec<Vec<f32>>> = Vec::new();
    for (prefix, wd) in [("step1", 0.0), ("step1wd", 0.01)] {
        let mut opt = AdamW::<B>::new(
            AdamWConfig {
                weight_decay: wd,
                ..Default::default()
            },
            params.len(),
        );
        let inner: Vec<_> = params.iter().map(|(_, p)| p.clone().inner()).collect();
        let updated = opt.step(1e-3, inner, gs.iter().cloned().map(Some).collect());
        let mut worst = 0f32;
        for (((key, _), u), g) in params.iter().zip(&updated).zip(&gs) {
            let (_, expected) = read_ref(&reference, &format!("{prefix}.{key}"));
            let (got, g) = (to_vec(u.clone()), to_vec(g.clone()));
            // Adam's first step moves an entry by lr·g/(|g| + ε): where |g| is within a few hundred ε (1e-8) of
            // zero — lm_head rows of tokens the batch makes nearly impossible, in a whole trained matrix
            // (modules_to_save) — the float-order differences of g (checked above) are amplified, so those entries
            // are held only to the step's size. Every other entry: 1e-6.
            let (mut d, mut d_tiny) = (0f32, 0f32);
            for ((x, y), gi) in got.iter().zip(&expected).zip(&g) {
                if gi.abs() >= 1e-6 {
                    d = d.max((x - y).abs());
                } else {
                    d_tiny = d_tiny.max((x - y).abs());
                }
            }
            worst = worst.max(d);
            assert!(d <= 1e-6, "{adapter} {prefix} {key}: max |Δ| {d}");
            assert!(
                d_tiny <= 1e-3,
                "{adapter} {prefix} {key}: max |Δ| {d_tiny} where |g| < 1e-6"
            );
        }
        stepped.push(updated.iter().map(|u| to_vec(u.clone())).collect());
        println!("{adapter}: AdamW {prefix} max |Δparam| {worst:.3e}");
    }
    let wd_effect = stepped[0]
        .iter()
        .zip(&stepped[1])
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(
        wd_effect > 2e-6,
        "weight decay had no visible effect ({wd_effect})"
    );

    // clip_grad_norm_(max_norm=0.5).
    let mut clipped: Vec<_> = gs.iter().cloned().map(Some).collect();
    let total = clip_grad_norm(&mut clipped, 0.5);
    let clipped: Vec<_> = clipped.into_iter().flatten().collect();
    let (_, exp_total) = read_ref(&reference, "clip_total_norm");
    assert!(
        ((total - exp_total[0] as f64) / exp_total[0] as f64).abs() < 1e-5,
        "total norm {total} vs {}",
        exp_total[0]
    );
    for ((key, _), g) in params.iter().zip(&clipped) {
        let (_, expected) = read_ref(&reference, &format!("clip.{key}"));
        let e = rel_err(&to_vec(g.clone()), &expected);
        assert!(e <= 1e-4, "{adapter} clip {key}: {e}");
    }
}

#[test]
fn peft_grads_and_adamw_llama() {
    check_grads_and_step("llama");
}
#[test]
fn peft_grads_and_adamw_llama_rslora() {
    check_grads_and_step("llama-rslora");
}
#[test]
fn peft_grads_and_adamw_qwen2() {
    check_grads_and_step("qwen2");
}
#[test]
fn peft_grads_and_adamw_phi3() {
    check_grads_and_step("phi3");
}
#[test]
fn peft_grads_and_adamw_gemma2() {
    check_grads_and_step("gemma2");
}
#[test]
fn peft_grads_and_adamw_falcon() {
    check_grads_and_step("falcon");
}
#[test]
fn peft_grads_and_adamw_falcon_new_decoder_architecture() {
    check_grads_and_step("falcon-new");
}
#[test]
fn peft_grads_and_adamw_mixtral_attention() {
    check_grads_and_step("mixtral");
}
#[test]
fn peft_grads_and_adamw_mixtral_router_and_experts() {
    check_grads_and_step("mixtral-experts");
}

#[test]
fn peft_forward_llama_dora() {
    check_forward("llama-dora");
}
#[test]
fn peft_grads_and_adamw_llama_dora() {
    check_grads_and_step("llama-dora");
}

/// DoRA's merged weights equal PEFT's `merge_and_unload` (the rows of W + s·B·A rescaled to the magnitude), and the
/// adapter written back holds PEFT's keys, shapes and values (the magnitude 1-D, `use_dora: true`).
#[test]
fn dora_merge_and_export_are_pefts() {
    let dir = fixture("adapters/llama-dora");
    let reference = dir.join("reference.safetensors");
    let device = Default::default();
    let mut model = load_fixture_model::<B>(&base_dir("llama-dora"), &device);
    load_adapter(&mut model, &dir).unwrap();
    for m in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.0.self_attn.k_proj",
    ] {
        let lin = model.linears().into_iter().find(|(p, _)| p == m).unwrap().1;
        let (_, want) = read_ref(&reference, &format!("merged.{m}.weight"));
        let d = rel_err(&to_vec(lin.merged_weight_f32()), &want);
        assert!(d < 1e-5, "{m}: merged weight relative error {d}");
    }
    let out = tempfile::tempdir().unwrap();
    let a = loratune::lora::peft::read_adapter(&dir).unwrap();
    assert!(a.settings.use_dora);
    loratune::lora::peft::save_adapter(
        &model,
        &a.settings,
        "tests/fixtures/models/llama",
        out.path(),
    )
    .unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    let map =
        |f: std::path::PathBuf| -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
            let mut names = ref_names(&f);
            names.sort();
            names
                .into_iter()
                .map(|n| (n.clone(), read_ref(&f, &n)))
                .collect()
        };
    let ours = map(out.path().join("adapter_model.safetensors"));
    let peft = map(dir.join("adapter_model.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    for (k, (shape, v)) in &peft {
        assert_eq!(&ours[k].0, shape, "{k}");
        assert!(max_abs_diff(&ours[k].1, v) == 0.0, "{k}");
    }
    // llama.cpp's adapters cannot carry the magnitudes: the GGUF adapter export refuses with the fix.
    let base = loratune::model::open(&base_dir("llama-dora")).unwrap();
    let err = loratune::export::gguf::export_gguf_adapter(
        &base,
        &a,
        &out.path().join("a.gguf"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("DoRA") && err.contains("merged"), "{err}");
}

/// Several optimizer steps leave every base tensor bit-identical.
#[test]
fn base_weights_stay_bit_identical_after_training_steps() {
    let adapter = "llama";
    let dir = fixture(&format!("adapters/{adapter}"));
    let reference = dir.join("reference.safetensors");
    let device = Default::default();
    let mut model = load_fixture_model::<AD>(&base_dir(adapter), &device);
    load_adapter(&mut model, &dir).unwrap();
    set_trainable(&mut model);
    let before: Vec<Vec<f32>> = model
        .linears()
        .iter()
        .map(|(_, l)| to_vec(l.weight.dense().inner()))
        .collect();
    let (batch, labels) = reference_batch(&reference);
    let mut opt = AdamW::<B>::new(AdamWConfig::default(), lora_params(&model).len());
    let mut losses = Vec::new();
    for _ in 0..3 {
        let (sum, n) = lm_loss_sum(&model, &batch, &labels, &mut NoDropout);
        let loss = sum.div_scalar(n as f64);
        losses.push(to_vec(loss.clone().inner())[0]);
        let grads = loss.backward();
        let params = lora_params(&model);
        let gs: Vec<_> = params
            .iter()
            .map(|(_, p)| p.grad(&grads).unwrap())
            .collect();
        let inner: Vec<_> = params.iter().map(|(_, p)| p.clone().inner()).collect();
        let updated = opt.step(1e-2, inner, gs.into_iter().map(Some).collect());
        set_lora_params(
            &mut model,
            updated
                .into_iter()
                .map(|t| Tensor::from_inner(t).require_grad())
                .collect(),
        );
    }
    let after: Vec<Vec<f32>> = model
        .linears()
        .iter()
        .map(|(_, l)| to_vec(l.weight.dense().inner()))
        .collect();
    assert_eq!(before, after, "a frozen base weight changed");
    assert!(losses[2] < losses[0], "loss did not decrease: {losses:?}");
}

/// Mixtral's router load-balancing loss (`router_aux_loss_coef`) against transformers' `load_balancing_loss_func`
/// (MixtralForCausalLM with `output_router_logits`, coefficient 0.5, the padded reference batch): the balancing
/// loss, and every LoRA gradient of `CE + 0.5·aux` — with the plain step and with layer recompute (which adds each
/// layer's share of the loss while it rebuilds the layer).
#[test]
fn mixtral_router_balancing_loss_equals_transformers() {
    use loratune::train::recompute::Checkpointing;
    use loratune::train::step::{step_gradients, StepConfig};
    let dir = fixture("adapters/mixtral");
    let reference = dir.join("reference.safetensors");
    let mut model = load_fixture_model::<AD>(&base_dir("mixtral"), &Default::default());
    load_adapter(&mut model, &dir).unwrap();
    set_trainable(&mut model);
    let (batch, labels) = reference_batch(&reference);
    let coef = read_ref(&reference, "aux.coef").1[0] as f64;
    let (_, want_aux) = read_ref(&reference, "aux.aux_loss");
    let (_, want_ce) = read_ref(&reference, "loss");
    for recompute in [Checkpointing::Off, Checkpointing::Layers] {
        let cfg = StepConfig {
            router_aux_loss_coef: coef,
            lr: 0.0,
            max_grad_norm: 0.0,
            seed: 0,
            step: 0,
            recompute,
        };
        let g = step_gradients(&model, &[(&batch, &labels)], cfg).unwrap();
        let aux = g.aux_loss.expect("aux loss on");
        assert!(
            (aux - want_aux[0] as f64).abs() <= 1e-5,
            "{recompute}: aux {aux} vs {}",
            want_aux[0]
        );
        assert!(
            (g.loss - want_ce[0] as f64).abs() <= 1e-5,
            "{recompute}: loss {}",
            g.loss
        );
        let mut worst = 0f32;
        for ((key, _), grad) in lora_params(&model).iter().zip(&g.grads) {
            let (_, expected) = read_ref(&reference, &format!("aux.grad.{key}"));
            let e = rel_err(&to_vec(grad.clone().expect("a gradient")), &expected);
            worst = worst.max(e);
            assert!(e <= 1e-4, "{recompute} {key}: grad relative error {e}");
        }
        println!("mixtral aux {aux:.6} ({recompute}): worst grad relative error {worst:.3e}");
    }
}

/// PiSSA / OLoRA against PEFT (`init_lora_weights="pissa" | "olora"`, tests/fixtures/adapters/llama-{pissa,olora},
/// scripts/reference/pissa_fixture.py): the initial s·B₀·A₀ and the residual base equal PEFT's (products: the factors'
/// signs are ambiguous); after a sign-independent change of the factors the logits equal PEFT's; the exported adapter is
/// PEFT's conversion (rank 2r, alpha ×2, products equal PEFT's converted adapter) and gives the trained logits on the
/// original base; a checkpoint (saved as trained) re-derives the residual when applied to the original base, and every
/// export of such a folder converts it the same way.
fn check_principal(name: &str, init: loratune::lora::LoraInit, alpha: f64) {
    use loratune::lora::peft::{
        apply_adapter, portable, read_adapter, save_adapter, write_adapter_files, AdapterForm,
    };
    use loratune::lora::{attach, LoraSettings, TargetSpec};
    let dir = fixture(&format!("adapters/{name}"));
    let reference = dir.join("reference.safetensors");
    let base_path = fixture("models/llama");
    let device = Default::default();
    let mut model = load_fixture_model::<B>(&base_path, &device);
    let settings = LoraSettings {
        r: 4,
        alpha,
        dropout: 0.0,
        use_rslora: false,
        targets: TargetSpec::AllLinear,
        layers: None,
        init,
        seed: 0,
        use_dora: false,
        modules_to_save: Vec::new(),
    };
    attach(&mut model, &settings).unwrap();
    // PiSSA's fixture also holds the same init from a float64 SVD (PEFT's runs in float32, and the fixture's random
    // weights have top singular values 0.5–2 % apart): the tighter reference.
    let f64_ref = ref_names(&reference)
        .iter()
        .any(|n| n == "logits_trained64");
    let (mut worst_delta, mut worst_res, mut worst64) = (0f32, 0f32, 0f32);
    for (path, lin) in model.linears() {
        let Some(l) = &lin.lora else { continue };
        let delta = to_vec(l.b.clone().matmul(l.a.clone()).mul_scalar(l.scale));
        worst_delta = worst_delta.max(rel_err(
            &delta,
            &read_ref(&reference, &format!("delta.{path}")).1,
        ));
        if f64_ref {
            worst64 = worst64.max(rel_err(
                &delta,
                &read_ref(&reference, &format!("delta64.{path}")).1,
            ));
        }
        let res = to_vec(lin.weight.dense_f32());
        worst_res = worst_res.max(rel_err(
            &res,
            &read_ref(&reference, &format!("residual.{path}")).1,
        ));
    }
    let vs64 = if f64_ref {
        format!(" (vs a float64 SVD {worst64:.2e})")
    } else {
        String::new()
    };
    println!("{name}: s·B₀·A₀ relative error vs PEFT {worst_delta:.2e}{vs64}, residual base {worst_res:.2e}");
    assert!(
        worst_delta <= 1e-5 && worst_res <= 1e-5 && worst64 <= 1e-6,
        "{worst_delta} {worst_res} {worst64}"
    );

    // The sign-independent "training" of the fixture: A's rows × G, B's columns × H.
    let g = [1.5f32, 0.5, -1.0, 2.0];
    let h = [0.75f32, 1.25, 0.5, -0.5];
    for (_, lin) in model.linears_mut() {
        if let Some(l) = &mut lin.lora {
            let gt = Tensor::<B, 1>::from_floats(g, &device).reshape([4, 1]);
            let ht = Tensor::<B, 1>::from_floats(h, &device).reshape([1, 4]);
            l.a = l.a.clone() * gt;
            l.b = l.b.clone() * ht;
        }
    }
    let (batch, _) = reference_batch(&reference);
    let v = model.config.vocab_size;
    let (_, trained) = read_ref(&reference, "logits_trained");
    let logits = to_vec(model.forward(&batch));
    let d = real_positions_diff(&logits, &trained, &batch.attention_mask, v);
    if f64_ref {
        // Single singular vectors from PEFT's f32 SVD are off by ~1e-5 here (its own float64 twin differs from it
        // by 2.7e-4 in these logits); the float64 reference is the one to meet at 1e-4.
        let d64 = real_positions_diff(
            &logits,
            &read_ref(&reference, "logits_trained64").1,
            &batch.attention_mask,
            v,
        );
        println!("{name}: trained logits max |Δ| vs the float64 SVD {d64:.2e}, vs PEFT (f32 SVD) {d:.2e}");
        assert!(d64 <= 1e-4 && d <= 1e-3, "{d64} {d}");
    } else {
        println!("{name}: trained logits max |Δ| vs PEFT {d:.2e}");
        assert!(d <= 1e-4, "{d}");
    }

    // The export: PEFT's converted adapter.
    let out = tempfile::tempdir().unwrap();
    save_adapter(&model, &settings, "tests/fixtures/models/llama", out.path()).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("converted_config.json")).unwrap())
            .unwrap();
    for k in ["r", "lora_alpha", "init_lora_weights", "use_rslora"] {
        assert_eq!(cfg[k], want[k], "{k}");
    }
    let converted = read_adapter(out.path()).unwrap();
    let product = |a: &loratune::lora::peft::PeftAdapter, path: &str| {
        let (ash, av, bsh, bv, scale) = &a.modules[path];
        let ta = Tensor::<B, 1>::from_floats(av.as_slice(), &device).reshape([ash[0], ash[1]]);
        let tb = Tensor::<B, 1>::from_floats(bv.as_slice(), &device).reshape([bsh[0], bsh[1]]);
        to_vec(tb.matmul(ta).mul_scalar(*scale))
    };
    let (mut worst, mut worst64) = (0f32, 0f32);
    for path in converted.modules.keys() {
        let p = product(&converted, path);
        worst = worst.max(rel_err(
            &p,
            &read_ref(&reference, &format!("converted.{path}")).1,
        ));
        if f64_ref {
            worst64 = worst64.max(rel_err(
                &p,
                &read_ref(&reference, &format!("converted64.{path}")).1,
            ));
        }
    }
    let vs64 = if f64_ref {
        format!(" (vs float64 {worst64:.2e})")
    } else {
        String::new()
    };
    println!(
        "{name}: exported (converted) adapter products vs PEFT's relative error {worst:.2e}{vs64}"
    );
    assert_eq!(converted.modules.len(), 14);
    assert!(
        worst64 <= 1e-5 && worst <= if f64_ref { 1e-4 } else { 1e-5 },
        "{worst} {worst64}"
    );
    let mut plain = load_fixture_model::<B>(&base_path, &device);
    apply_adapter(&mut plain, &converted).unwrap();
    let d = real_positions_diff(
        &to_vec(plain.forward(&batch)),
        &logits,
        &batch.attention_mask,
        v,
    );
    println!("{name}: exported adapter on the original base vs the trained model, logits max |Δ| {d:.2e}");
    assert!(d <= 1e-4, "{d}");

    // A checkpoint keeps the factors as trained; applied to the original base it re-derives the residual, and the
    // exports of that folder convert it as above.
    let ck = tempfile::tempdir().unwrap();
    write_adapter_files(ck.path(), &model, &settings, "base", AdapterForm::AsTrained).unwrap();
    let raw = read_adapter(ck.path()).unwrap();
    assert_eq!(raw.settings.init, init);
    assert_eq!(raw.modules.values().next().unwrap().0[0], 4);
    let mut resumed = load_fixture_model::<B>(&base_path, &device);
    apply_adapter(&mut resumed, &raw).unwrap();
    let d = real_positions_diff(
        &to_vec(resumed.forward(&batch)),
        &logits,
        &batch.attention_mask,
        v,
    );
    assert!(d == 0.0, "checkpoint re-applied: {d}");
    let base = loratune::model::open(&base_path).unwrap();
    let conv = portable(&raw, &base).unwrap();
    assert_eq!(conv.settings.r, 8);
    for path in conv.modules.keys() {
        assert!(
            max_abs_diff(&product(&conv, path), &product(&converted, path)) <= 1e-6,
            "{path}"
        );
    }
}

#[test]
fn pissa_init_and_conversion_equal_pefts() {
    check_principal("llama-pissa", loratune::lora::LoraInit::Pissa, 8.0);
}

#[test]
fn olora_init_and_conversion_equal_pefts() {
    check_principal("llama-olora", loratune::lora::LoraInit::Olora, 16.0);
}

/// `modules_to_save` (PEFT `modules_to_save=["embed_tokens", "lm_head"]`, LoRA on q/v): forward, merge, every
/// gradient (the two full copies included) and an AdamW step equal PEFT's, on a tied model (two independent
/// copies, as PEFT trains them) and an untied one.
#[test]
fn peft_modules_to_save_forward_grads_and_step() {
    for adapter in ["llama-saved", "mistral-saved"] {
        check_forward(adapter);
        check_grads_and_step(adapter);
    }
}

/// A modules_to_save adapter written back by loratune holds PEFT's keys and values and says
/// `modules_to_save: [embed_tokens, lm_head]`; merged into a Hugging Face folder (streaming, from the files) it
/// gives PEFT's merge_and_unload logits, and a tied base comes out untied with both matrices.
#[test]
fn modules_to_save_files_and_merged_folder_equal_pefts() {
    use loratune::export::hf::MergedExportOptions;
    use loratune::lora::peft::{read_adapter, save_adapter};
    for adapter in ["llama-saved", "mistral-saved"] {
        let dir = fixture(&format!("adapters/{adapter}"));
        let device = Default::default();
        let base = base_dir(adapter);
        let mut model = load_fixture_model::<B>(&base, &device);
        let peft = load_adapter(&mut model, &dir).unwrap();
        assert_eq!(peft.saved.len(), 2);
        let tmp = tempfile::tempdir().unwrap();
        let ours = tmp.path().join("adapter");
        save_adapter(&model, &peft.settings, "base", &ours).unwrap();
        let read = |p: &std::path::Path| {
            let bytes = std::fs::read(p.join("adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec()))
                .collect();
            out.sort();
            out
        };
        let (a, b) = (read(&dir), read(&ours));
        assert_eq!(
            a.iter().map(|t| &t.0).collect::<Vec<_>>(),
            b.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{adapter}: keys differ from PEFT's"
        );
        for (x, y) in a.iter().zip(&b) {
            assert!(x == y, "{adapter}: `{}` differs from PEFT's file", x.0);
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ours.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["modules_to_save"],
            serde_json::json!(["embed_tokens", "lm_head"])
        );

        // The merged folder, from the files.
        let opened = loratune::model::open(&base).unwrap();
        let merged = tmp.path().join("merged");
        loratune::export::merge::merge_to_folder(
            &opened,
            Some(&read_adapter(&ours).unwrap()),
            &merged,
            &MergedExportOptions::default(),
            &|_| Ok(()),
        )
        .unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["tie_word_embeddings"], false,
            "{adapter}: the merged model must be untied"
        );
        let m = load_fixture_model::<B>(&merged, &device);
        let reference = dir.join("reference.safetensors");
        let (batch, _) = reference_batch(&reference);
        let logits = to_vec(m.forward(&batch));
        let (_, expected) = read_ref(&reference, "merged_logits");
        let d = real_positions_diff(
            &logits,
            &expected,
            &batch.attention_mask,
            m.config.vocab_size,
        );
        println!("{adapter}: merged folder max |Δlogit| vs PEFT merge_and_unload = {d:.3e}");
        assert!(d <= 1e-4, "{adapter}: {d}");
    }
}
