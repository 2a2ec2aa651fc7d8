//! The training step: gradient accumulation normalised per token, determinism, NaN guard.

use loratune::lora::adapter::{lora_params, set_trainable};
use loratune::lora::peft::load_adapter;
use loratune::model::TokenBatch;
use loratune::train::optim::{AdamW, AdamWConfig};
use loratune::train::recompute::Checkpointing;
use loratune::train::step::{step_gradients, train_step, StepConfig};

use crate::common::*;
use crate::parity::reference_batch;

fn model_with_adapter() -> loratune::model::CausalLm<AD> {
    let device = Default::default();
    let mut m = load_fixture_model::<AD>(&fixture("models/llama"), &device);
    load_adapter(&mut m, &fixture("adapters/llama")).unwrap();
    set_trainable(&mut m);
    m
}

fn params(m: &loratune::model::CausalLm<AD>) -> Vec<Vec<f32>> {
    lora_params(m)
        .into_iter()
        .map(|(_, t)| to_vec(t.inner()))
        .collect()
}

/// Rows of the reference batch as separate unpadded micro-batches.
fn split_rows(batch: &TokenBatch, labels: &[i64]) -> Vec<(TokenBatch, Vec<i64>)> {
    (0..batch.batch)
        .map(|r| {
            let len = (0..batch.seq)
                .filter(|&i| batch.attention_mask[r * batch.seq + i])
                .count();
            let ids = batch.input_ids[r * batch.seq..r * batch.seq + len].to_vec();
            let lab = labels[r * batch.seq..r * batch.seq + len].to_vec();
            (TokenBatch::from_rows(&[ids], None), lab)
        })
        .collect()
}

#[test]
fn gradient_accumulation_is_normalised_per_token_not_per_micro_batch() {
    let (batch, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    let cfg = StepConfig {
        router_aux_loss_coef: 0.0,
        lr: 1e-2,
        max_grad_norm: 0.0,
        seed: 0,
        step: 0,
        recompute: Checkpointing::Off,
    };

    // One micro-batch holding both rows (padded).
    let mut a = model_with_adapter();
    let mut oa = AdamW::new(AdamWConfig::default(), lora_params(&a).len());
    let sa = train_step(&mut a, &mut oa, &[(&batch, &labels)], cfg).unwrap();

    // The same rows as two micro-batches of different lengths (15 and 10 trained tokens).
    let parts = split_rows(&batch, &labels);
    let mut b = model_with_adapter();
    let mut ob = AdamW::new(AdamWConfig::default(), lora_params(&b).len());
    let micro: Vec<(&TokenBatch, &[i64])> = parts.iter().map(|(t, l)| (t, l.as_slice())).collect();
    let sb = train_step(&mut b, &mut ob, &micro, cfg).unwrap();

    assert_eq!(sa.trained_tokens, sb.trained_tokens);
    assert!(
        (sa.loss - sb.loss).abs() < 1e-6,
        "{} vs {}",
        sa.loss,
        sb.loss
    );
    assert!(
        (sa.grad_norm - sb.grad_norm).abs() / sa.grad_norm < 1e-5,
        "{} vs {}",
        sa.grad_norm,
        sb.grad_norm
    );
    let d = params(&a)
        .iter()
        .zip(params(&b))
        .map(|(x, y)| max_abs_diff(x, &y))
        .fold(0.0, f32::max);
    assert!(d < 1e-6, "accumulated update differs by {d}");

    // The reference loss of the fixture (transformers, the same two rows) is the per-token mean.
    let (_, exp) = read_ref(&fixture("adapters/llama/reference.safetensors"), "loss");
    assert!((sa.loss - exp[0] as f64).abs() < 1e-5);

    // A mean of per-micro-batch means would differ here (unequal token counts): the check above has teeth.
    let per: Vec<f64> = parts
        .iter()
        .map(|(t, l)| {
            let m = model_with_adapter();
            let (s, n) = loratune::train::loss::lm_loss_sum(
                &m.valid(),
                t,
                l,
                &mut loratune::model::NoDropout,
            );
            to_vec(s)[0] as f64 / n as f64
        })
        .collect();
    let mean_of_means = (per[0] + per[1]) / 2.0;
    assert!(
        (mean_of_means - sa.loss).abs() > 1e-3,
        "test data cannot tell the two normalisations apart"
    );
}

#[test]
fn steps_are_deterministic_with_dropout() {
    let (batch, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    let run = || {
        let mut m = model_with_adapter();
        for (_, l) in m.linears_mut() {
            if let Some(a) = &mut l.lora {
                a.dropout = 0.1;
            }
        }
        let mut o = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
        let mut losses = Vec::new();
        for step in 0..3 {
            let s = train_step(
                &mut m,
                &mut o,
                &[(&batch, &labels)],
                StepConfig {
                    router_aux_loss_coef: 0.0,
                    lr: 1e-2,
                    max_grad_norm: 1.0,
                    seed: 5,
                    step,
                    recompute: Checkpointing::Off,
                },
            )
            .unwrap();
            losses.push(s.loss);
        }
        (losses, params(&m))
    };
    let (l1, p1) = run();
    let (l2, p2) = run();
    assert_eq!(l1, l2);
    assert_eq!(p1, p2);
    // Dropout is active: the first loss differs from the dropout-free reference loss.
    let (_, exp) = read_ref(&fixture("adapters/llama/reference.safetensors"), "loss");
    assert!((l1[0] - exp[0] as f64).abs() > 1e-4);
}

#[test]
fn nan_loss_stops_without_touching_the_adapter() {
    let (batch, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    // An infinite adapter scale makes the forward overflow: the loss is not finite.
    let mut m = model_with_adapter();
    let before = params(&m);
    let mut o = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
    for (_, l) in m.linears_mut() {
        if let Some(a) = &mut l.lora {
            a.scale = f64::INFINITY;
        }
    }
    let e = train_step(
        &mut m,
        &mut o,
        &[(&batch, &labels)],
        StepConfig {
            router_aux_loss_coef: 0.0,
            lr: 1e-3,
            max_grad_norm: 1.0,
            seed: 0,
            step: 0,
            recompute: Checkpointing::Off,
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, loratune::Error::NonFinite { step: 1, .. }),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(
        e.contains("training stopped") && e.contains("learning_rate"),
        "{e}"
    );
    assert_eq!(params(&m), before, "a failed step changed the adapter");
}

/// Gradient checkpointing (layer recompute, on the device or offloaded) against the plain step: the same losses,
/// gradient norms and updated adapters, over several steps with LoRA dropout on (the recompute must replay the
/// forward's masks), for the fused CPU kernels and the reference path (Gemma 2: sliding window, soft-capping;
/// Qwen3: per-head q/k norms), padded and packed batches, an adapter on `lm_head`, and adapters on the upper
/// layer only (the layers below it are never rebuilt).
#[test]
fn gradient_checkpointing_equals_the_plain_step() {
    use loratune::lora::adapter::{attach, LoraInit, LoraSettings};
    use loratune::lora::TargetSpec;
    let (padded, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    // The same tokens as one packed row: two samples, positions restarting, attention kept inside each.
    let packed = {
        let mut t = TokenBatch::from_rows(std::slice::from_ref(&padded.input_ids), None);
        let s = padded.seq;
        t.position_ids = (0..2 * s as u32).map(|p| p % s as u32).collect();
        t.segment_ids = Some((0..2 * s as u32).map(|p| p / s as u32).collect());
        t
    };
    let mut packed_labels = labels.clone();
    packed_labels[padded.seq] = -100;
    let device = Default::default();
    use loratune::lora::adapter::SavedModule::{EmbedTokens, LmHead};
    let none = Vec::new;
    /// family, targets, layers, DoRA, modules_to_save
    type Case = (
        &'static str,
        TargetSpec,
        Option<Vec<usize>>,
        bool,
        Vec<loratune::lora::adapter::SavedModule>,
    );
    let cases: [Case; 10] = [
        ("llama", TargetSpec::AllLinear, None, false, none()),
        ("gemma2", TargetSpec::AllLinear, None, false, none()),
        ("qwen3", TargetSpec::AllLinear, None, false, none()),
        (
            "qwen2",
            TargetSpec::Names(vec!["q_proj".into(), "down_proj".into(), "lm_head".into()]),
            None,
            false,
            none(),
        ),
        (
            "mistral",
            TargetSpec::AllLinear,
            Some(vec![1]),
            false,
            none(),
        ),
        // router and experts adapted: the experts' rows are gathered and scattered per routing
        ("mixtral", TargetSpec::AllLinear, None, false, none()),
        // LayerNorms with bias, parallel attention + MLP, grouped query_key_value
        ("falcon-new", TargetSpec::AllLinear, None, false, none()),
        // DoRA: a magnitude per module (three parameters each), dropout through the extra member pass
        ("llama", TargetSpec::AllLinear, None, true, none()),
        // modules_to_save: the embedding and lm_head copies (the tied Llama: two copies; Gemma 2: scaled embedding
        // and soft-capped logits)
        (
            "llama",
            TargetSpec::AllLinear,
            None,
            false,
            vec![EmbedTokens, LmHead],
        ),
        (
            "gemma2",
            TargetSpec::Names(vec!["q_proj".into()]),
            None,
            false,
            vec![EmbedTokens, LmHead],
        ),
    ];
    for (family, targets, layers, use_dora, modules_to_save) in cases {
        let mut base = load_fixture_model::<AD>(&fixture(&format!("models/{family}")), &device);
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            use_rslora: false,
            targets,
            layers,
            init: LoraInit::Gaussian,
            seed: 3,
            use_dora,
            modules_to_save,
        };
        attach(&mut base, &settings).unwrap();
        set_trainable(&mut base);
        let vocab = base.config.vocab_size as i64;
        let clamp = |l: &[i64]| -> Vec<i64> {
            l.iter()
                .map(|&x| if x < 0 { x } else { x % vocab })
                .collect()
        };
        let clamp_ids = |t: &TokenBatch| {
            let mut t = t.clone();
            t.input_ids.iter_mut().for_each(|x| *x %= vocab as u32);
            t
        };
        let (pb, pl) = (clamp_ids(&padded), clamp(&labels));
        let (kb, kl) = (clamp_ids(&packed), clamp(&packed_labels));
        let cfg = |step: u64, recompute| StepConfig {
            router_aux_loss_coef: 0.0,
            lr: 1e-2,
            max_grad_norm: 1.0,
            seed: 11,
            step,
            recompute,
        };
        let micro_of = |step: u64| -> Vec<(&TokenBatch, &[i64])> {
            if step == 1 {
                vec![(&kb, &kl), (&pb, &pl)]
            } else {
                vec![(&pb, &pl)]
            }
        };
        for fused in [true, false] {
            // Along the plain run's trajectory, each step's loss and gradients with and without recompute.
            let mut plain = Vec::new();
            loratune::kernels::with_fused(fused, || {
                let mut m = base.clone();
                let mut o = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
                for step in 0..3 {
                    let g0 =
                        step_gradients(&m, &micro_of(step), cfg(step, Checkpointing::Off)).unwrap();
                    for mode in [Checkpointing::Layers, Checkpointing::Offload] {
                        let g1 = step_gradients(&m, &micro_of(step), cfg(step, mode)).unwrap();
                        let rel = (g0.loss - g1.loss).abs() / g0.loss.abs();
                        assert!(
                            rel <= 1e-6,
                            "{family} fused={fused} {mode} step {step}: loss {} vs {}",
                            g0.loss,
                            g1.loss
                        );
                        assert_eq!(g0.grads.len(), g1.grads.len());
                        for (i, (x, y)) in g0.grads.iter().zip(&g1.grads).enumerate() {
                            let (Some(x), Some(y)) = (x, y) else {
                                assert!(
                                    x.is_none() && y.is_none(),
                                    "{family}: gradient {i} present in one run only"
                                );
                                continue;
                            };
                            let (x, y) = (to_vec(x.clone()), to_vec(y.clone()));
                            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                            let d = max_abs_diff(&x, &y) / scale;
                            assert!(d <= 1e-6, "{family} fused={fused} {mode} step {step}: gradient {i} differs by {d} (relative to its largest entry)");
                        }
                    }
                    plain.push(
                        train_step(
                            &mut m,
                            &mut o,
                            &micro_of(step),
                            cfg(step, Checkpointing::Off),
                        )
                        .unwrap(),
                    );
                }
            });
            // The fused CPU kernels are deterministic: the recomputed run is the plain run, Adam updates included.
            if fused {
                let mut m = base.clone();
                let mut o = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
                let rec: Vec<_> = (0..3)
                    .map(|step| {
                        train_step(
                            &mut m,
                            &mut o,
                            &micro_of(step),
                            cfg(step, Checkpointing::Layers),
                        )
                        .unwrap()
                    })
                    .collect();
                assert_eq!(
                    rec.iter()
                        .map(|s| (s.loss, s.grad_norm))
                        .collect::<Vec<_>>(),
                    plain
                        .iter()
                        .map(|s| (s.loss, s.grad_norm))
                        .collect::<Vec<_>>(),
                    "{family}: recomputed steps differ from the plain ones"
                );
            }
            // The dropout masks matter here: without them the losses change (so a recompute that drew fresh masks
            // would have been caught above).
            let mut nodrop = base.clone();
            for (_, l) in nodrop.linears_mut() {
                if let Some(a) = &mut l.lora {
                    a.dropout = 0.0;
                }
            }
            let mut o = AdamW::new(AdamWConfig::default(), lora_params(&nodrop).len());
            let s = loratune::kernels::with_fused(fused, || {
                train_step(
                    &mut nodrop,
                    &mut o,
                    &[(&pb, &pl)],
                    cfg(0, Checkpointing::Layers),
                )
                .unwrap()
            });
            assert!(
                (s.grad_norm - plain[0].grad_norm).abs() > 1e-6 * plain[0].grad_norm,
                "{family}: dropout made no difference to the gradient"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Whole runs from a YAML config on the tiny llama fixture (tests/fixtures/models/llama) and a small chat set.

mod runs {
    use std::path::Path;

    use loratune::config::TrainConfig;
    use loratune::model::CausalLm;
    use loratune::train::checkpoint::list_checkpoints;
    use loratune::train::run::{train, ProgressMode, RunOptions};

    use crate::common::*;

    fn config(dir: &Path, extra: &str) -> TrainConfig {
        config_with(dir, extra, &[])
    }

    fn config_with(dir: &Path, extra: &str, sets: &[&str]) -> TrainConfig {
        let yaml = format!(
            "base_model: {model}\n\
             datasets:\n  - path: {data}\n    type: chat_template\n\
             dataset_prepared_path: {cache}\n\
             sequence_len: 256\n\
             micro_batch_size: 4\n\
             gradient_accumulation_steps: 2\n\
             lora_r: 8\n\
             lora_alpha: 16\n\
             lora_dropout: 0.1\n\
             lora_target_linear: true\n\
             learning_rate: 0.01\n\
             lr_scheduler: cosine\n\
             warmup_steps: 2\n\
             seed: 7\n\
             output_dir: {out}\n\
             logging_steps: 1\n\
             {extra}\n",
            model = fixture("models/llama").display(),
            data = fixture("train/facts_chat.jsonl").display(),
            cache = dir.join("cache").display(),
            out = dir.join("run").display(),
        );
        let p = dir.join("config.yaml");
        std::fs::write(&p, yaml).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::load(&p, &sets).unwrap()
    }

    fn quiet() -> RunOptions {
        RunOptions {
            stop_after: None,
            progress: ProgressMode::Quiet,
            ..RunOptions::default()
        }
    }

    #[test]
    fn thirty_steps_drive_the_loss_well_down_and_write_every_output() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), "max_steps: 30\nval_set_size: 8\neval_steps: 10\nsave_steps: 10\nsave_total_limit: 2\nmerge_lora: true");
        let s = train(&cfg, &quiet()).unwrap();
        assert_eq!(s.steps, 30);
        let start = s.losses[0];
        let end = s.losses[25..].iter().sum::<f64>() / 5.0;
        println!("loss {start:.3} → {end:.3}; eval {:?}", s.best_eval_loss);
        assert!(
            end < 0.5 * start,
            "loss did not fall well below its start: {start} → {end}"
        );
        let out = tmp.path().join("run");
        // Outputs: PEFT adapter, merged folder, metrics, curve, resolved config; 2 newest checkpoints kept.
        for f in [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "merged/config.json",
            "merged/model.safetensors",
            "merged/tokenizer.json",
            "metrics.jsonl",
            "loss_curve.svg",
            "config.yaml",
        ] {
            assert!(out.join(f).is_file(), "missing {f}");
        }
        let ck: Vec<u64> = list_checkpoints(&out).into_iter().map(|(s, _)| s).collect();
        assert_eq!(ck, vec![20, 30]);
        let metrics = loratune::train::report::read_metrics(&out).unwrap();
        assert_eq!(metrics.iter().filter(|m| m.loss.is_some()).count(), 30);
        assert_eq!(metrics.iter().filter(|m| m.eval_loss.is_some()).count(), 3);
        // The merged folder reproduces base + adapter.
        let device = Default::default();
        let mut with_adapter = load_fixture_model::<B>(&fixture("models/llama"), &device);
        loratune::lora::peft::load_adapter(&mut with_adapter, &out.join("adapter")).unwrap();
        let merged = load_fixture_model::<B>(&out.join("merged"), &device);
        let (batch, _) =
            crate::parity::reference_batch(&fixture("models/llama/reference.safetensors"));
        let a = to_vec(with_adapter.forward(&batch));
        let b = to_vec(merged.forward(&batch));
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-4, "merged differs from base+adapter by {d}");
    }

    /// A run killed after a checkpoint and resumed gives exactly the losses of an uninterrupted run.
    #[test]
    fn resume_after_interruption_is_bit_identical() {
        let extra = "max_steps: 12\nsave_steps: 4\nauto_resume_from_checkpoints: true";
        let a_dir = tempfile::tempdir().unwrap();
        let full = train(&config(a_dir.path(), extra), &quiet()).unwrap();
        assert_eq!(full.losses.len(), 12);

        let b_dir = tempfile::tempdir().unwrap();
        let cfg = config(b_dir.path(), extra);
        let first = train(
            &cfg,
            &RunOptions {
                stop_after: Some(6),
                progress: ProgressMode::Quiet,
                ..RunOptions::default()
            },
        )
        .unwrap();
        assert!(first.interrupted);
        assert_eq!(first.losses, full.losses[..6].to_vec());
        // The newest checkpoint is step 4: steps 5 and 6 are redone after the "crash".
        let second = train(&cfg, &quiet()).unwrap();
        assert!(second
            .resumed_from
            .as_ref()
            .unwrap()
            .ends_with("checkpoint-4"));
        assert_eq!(
            second.losses,
            full.losses[4..].to_vec(),
            "resumed losses differ from the uninterrupted run"
        );
        let fa = std::fs::read(a_dir.path().join("run/adapter/adapter_model.safetensors")).unwrap();
        let fb = std::fs::read(b_dir.path().join("run/adapter/adapter_model.safetensors")).unwrap();
        assert!(fa == fb, "final adapters differ");
        // metrics.jsonl holds each step once.
        let m = loratune::train::report::read_metrics(&b_dir.path().join("run")).unwrap();
        let steps: Vec<u64> = m
            .iter()
            .filter(|l| l.loss.is_some())
            .map(|l| l.step)
            .collect();
        assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    }

    /// `use_tensorboard: true`: the event file holds every logged step's scalars (TensorBoard's record format,
    /// CRCs checked on reading), equal to metrics.jsonl; a resumed run writes a second file that starts with a
    /// `SessionLog START` at the step after the checkpoint (TensorBoard then drops the first file's points from
    /// there on) and continues with the redone steps.
    #[test]
    fn tensorboard_events_follow_the_run() {
        use loratune::train::tensorboard::read_events;
        let extra = "max_steps: 6\nsave_steps: 4\nuse_tensorboard: true\nauto_resume_from_checkpoints: true";
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), extra);
        let first = train(
            &cfg,
            &RunOptions {
                stop_after: Some(5),
                progress: ProgressMode::Quiet,
                ..RunOptions::default()
            },
        )
        .unwrap();
        assert!(first.interrupted);
        let second = train(&cfg, &quiet()).unwrap();
        assert!(second.resumed_from.is_some());
        let runs = dir.path().join("run/runs");
        let mut files: Vec<_> = std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 2, "{files:?}");
        let loss_at = |evs: &[loratune::train::tensorboard::ReadEvent]| -> Vec<(i64, f32)> {
            evs.iter()
                .filter_map(|e| {
                    e.scalars
                        .iter()
                        .find(|(t, _)| t == "train/loss")
                        .map(|(_, v)| (e.step, *v))
                })
                .collect()
        };
        let a = read_events(&files[0]).unwrap();
        assert!(
            a[0].scalars.is_empty() && !a[0].session_start,
            "file_version first"
        );
        assert_eq!(
            loss_at(&a).iter().map(|x| x.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let b = read_events(&files[1]).unwrap();
        assert!(b[1].session_start && b[1].step == 5, "{:?}", b[1]);
        assert_eq!(loss_at(&b).iter().map(|x| x.0).collect::<Vec<_>>(), [5, 6]);
        // The values are metrics.jsonl's (which the resumed run rewrote from step 5).
        let m = loratune::train::report::read_metrics(&dir.path().join("run")).unwrap();
        let want: Vec<(i64, f32)> = m
            .iter()
            .filter_map(|l| l.loss.map(|x| (l.step as i64, x as f32)))
            .collect();
        let mut got = loss_at(&a)[..4].to_vec();
        got.extend(loss_at(&b));
        assert_eq!(got, want);
        let lr = b[2]
            .scalars
            .iter()
            .find(|(t, _)| t == "train/learning_rate");
        assert!(lr.is_some_and(|(_, v)| *v > 0.0), "{:?}", b[2]);
    }

    /// `loratune runs`: a finished and an interrupted trial under `trials/`, found from their parent; the table shows
    /// the config keys that differ (not the per-run paths), each run's status, steps and losses; a run whose folder
    /// lock is held is `running`; sorting by a differing key; CSV and text forms.
    #[test]
    fn runs_table_compares_runs() {
        use loratune::train::runs::{find_runs, render_csv, render_text, sort, table};
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("trials/a"), root.path().join("trials/b"));
        let extra = "max_steps: 4\nval_set_size: 8\neval_steps: 2";
        let out_a = format!("output_dir={}", a.display());
        train(&config_with(root.path(), extra, &[&out_a]), &quiet()).unwrap();
        let out_b = format!("output_dir={}", b.display());
        let cfg_b = config_with(
            root.path(),
            &format!("{extra}\nsave_steps: 2"),
            &[&out_b, "lora_r=4"],
        );
        let opts = RunOptions {
            stop_after: Some(3),
            progress: ProgressMode::Quiet,
            ..RunOptions::default()
        };
        assert!(train(&cfg_b, &opts).unwrap().interrupted);

        let runs = find_runs(&[root.path().to_path_buf()]).unwrap();
        assert_eq!(runs, [a.clone(), b.clone()]);
        let mut rows = table(&runs).unwrap();
        let keys: Vec<&String> = rows[0].differs.keys().collect();
        assert_eq!(keys, ["lora_r", "save_steps"], "{:?}", rows[0].differs);
        assert_eq!(rows[0].differs["lora_r"], "8");
        assert_eq!(rows[1].differs["lora_r"], "4");
        assert_eq!(
            (rows[0].status.as_str(), rows[0].steps, rows[0].max_steps),
            ("finished", 4, Some(4))
        );
        assert_eq!((rows[1].status.as_str(), rows[1].steps), ("interrupted", 3));
        let m = loratune::train::report::read_metrics(&a).unwrap();
        let best = m
            .iter()
            .filter_map(|l| l.eval_loss)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(rows[0].best_eval_loss, Some(best));
        assert_eq!(
            rows[0].final_train_loss,
            m.iter().rev().find_map(|l| l.loss)
        );
        let wall = rows[0].wall_seconds.unwrap();
        assert!(
            wall > 0.0
                && m.iter()
                    .filter_map(|l| l.elapsed_seconds)
                    .all(|e| e <= wall)
        );
        sort(&mut rows, "lora_r").unwrap();
        assert_eq!(rows[0].run, b);
        assert!(sort(&mut rows, "nope").is_err());
        let csv = render_csv(&rows).unwrap();
        assert!(
            csv.starts_with("run,lora_r,save_steps,status,steps,"),
            "{csv}"
        );
        assert_eq!(csv.lines().count(), 3);
        assert!(render_text(&rows).contains("interrupted"));
        // A live run holds its folder's lock.
        let _lock = loratune::export::atomic::FolderLock::acquire(&a).unwrap();
        let rows = table(&runs).unwrap();
        assert_eq!(rows[0].status, "running");
        assert!(find_runs(&[root.path().join("missing")]).is_err());
    }

    /// A run with `extra` keys (6 steps, a checkpoint at 3): stopped after step 4 and resumed, it equals the straight
    /// run (losses and final adapter bit for bit), and the straight run's merged folder gives its adapter's logits on
    /// the original base. Returns the straight run's adapter.
    fn resumes_bit_identically_and_merges(
        extra: &str,
        what: &str,
    ) -> loratune::lora::peft::PeftAdapter {
        let extra =
            format!("max_steps: 6\nsave_steps: 3\nauto_resume_from_checkpoints: true\n{extra}");
        let a_dir = tempfile::tempdir().unwrap();
        let full = train(
            &config(a_dir.path(), &format!("{extra}\nmerge_lora: true")),
            &quiet(),
        )
        .unwrap();
        assert!(full.losses[5] < full.losses[0], "{:?}", full.losses);
        let b_dir = tempfile::tempdir().unwrap();
        let cfg = config(b_dir.path(), &extra);
        let first = train(
            &cfg,
            &RunOptions {
                stop_after: Some(4),
                progress: ProgressMode::Quiet,
                ..RunOptions::default()
            },
        )
        .unwrap();
        assert!(first.interrupted);
        let second = train(&cfg, &quiet()).unwrap();
        assert_eq!(
            second.losses,
            full.losses[3..].to_vec(),
            "resumed {what} losses differ"
        );
        let adapter = a_dir.path().join("run/adapter");
        assert_eq!(
            std::fs::read(adapter.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(b_dir.path().join("run/adapter/adapter_model.safetensors")).unwrap(),
            "final {what} adapters differ"
        );
        let a = loratune::lora::peft::read_adapter(&adapter).unwrap();
        // The merged folder's logits equal the original base + the adapter's.
        let device = Default::default();
        let (batch, _) =
            crate::parity::reference_batch(&fixture("adapters/llama/reference.safetensors"));
        let mut with = load_fixture_model::<B>(&fixture("models/llama"), &device);
        loratune::lora::peft::apply_adapter(&mut with, &a).unwrap();
        let merged = load_fixture_model::<B>(&a_dir.path().join("run/merged"), &device);
        let d = max_abs_diff(
            &to_vec(with.forward(&batch)),
            &to_vec(merged.forward(&batch)),
        );
        assert!(d < 1e-4, "{what}: merged vs adapter logits {d}");
        a
    }

    /// DoRA end to end from the config (`peft_use_dora: true`, dropout, layer recompute): resumes bit-identically
    /// (magnitudes and their AdamW moments included), the adapter says `use_dora` and holds a magnitude per module.
    #[test]
    fn dora_runs_resume_and_merge() {
        let a = resumes_bit_identically_and_merges(
            "peft_use_dora: true\ngradient_checkpointing: true",
            "DoRA",
        );
        assert!(a.settings.use_dora);
        assert_eq!(a.magnitudes.len(), a.modules.len());
    }

    /// `lora_modules_to_save: [embed_tokens, lm_head]` end to end on the tied Llama fixture: the two copies train
    /// (the step with layer recompute equals the plain one), resume bit-identically (their AdamW moments included),
    /// are exported as PEFT's whole-module tensors, and the merged folder (untied) equals base + adapter.
    #[test]
    fn modules_to_save_runs_resume_and_export() {
        let a = resumes_bit_identically_and_merges(
            "lora_modules_to_save: [embed_tokens, lm_head]",
            "modules_to_save",
        );
        assert_eq!(a.saved.len(), 2);
        let base = load_fixture_model::<B>(&fixture("models/llama"), &Default::default());
        let frozen = to_vec(base.model.embed_tokens.weight.dense_f32());
        let (_, emb) = &a.saved[&loratune::lora::adapter::SavedModule::EmbedTokens];
        let (_, head) = &a.saved[&loratune::lora::adapter::SavedModule::LmHead];
        assert!(
            max_abs_diff(emb, &frozen) > 1e-4,
            "the embedding copy did not train"
        );
        assert!(
            max_abs_diff(head, &frozen) > 1e-4,
            "the lm_head copy did not train"
        );
        assert!(
            max_abs_diff(emb, head) > 1e-4,
            "a tied model's two copies must train independently"
        );
        // Layer recompute gives the plain step's losses and copies.
        let runs: Vec<(Vec<f64>, Vec<u8>)> = ["false", "true"]
            .iter()
            .map(|gc| {
                let dir = tempfile::tempdir().unwrap();
                let extra = format!(
                    "max_steps: 3\nlora_modules_to_save: [embed_tokens, lm_head]\ngradient_checkpointing: {gc}"
                );
                let s = train(&config(dir.path(), &extra), &quiet()).unwrap();
                let bytes = std::fs::read(dir.path().join("run/adapter/adapter_model.safetensors")).unwrap();
                (s.losses, bytes)
            })
            .collect();
        assert_eq!(runs[0].0, runs[1].0, "losses with and without recompute");
        assert!(
            runs[0].1 == runs[1].1,
            "adapters with and without recompute differ"
        );
    }

    /// PiSSA and OLoRA end to end from the config: the resumed run re-derives the residual base from the checkpoint
    /// (saved as trained) bit for bit; the exported adapter is the converted rank-2r LoRA on the original base.
    #[test]
    fn pissa_and_olora_runs_resume_and_merge() {
        for init in ["pissa", "olora"] {
            let a = resumes_bit_identically_and_merges(&format!("lora_init: {init}"), init);
            let r = a.modules.values().next().unwrap().0[0];
            assert_eq!(a.settings.init, loratune::lora::LoraInit::Kaiming);
            assert_eq!(
                (r, a.settings.r),
                (16, 16),
                "{init}: lora_r 8 exported as rank 16"
            );
        }
    }

    /// A checkpoint write that died half-way (its staging folder, or a folder without trainer_state.json)
    /// is ignored: the previous checkpoint is what resumes.
    #[test]
    fn interrupted_checkpoint_write_leaves_the_previous_one_loadable() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(
            tmp.path(),
            "max_steps: 8\nsave_steps: 4\nauto_resume_from_checkpoints: true",
        );
        let s = train(
            &cfg,
            &RunOptions {
                stop_after: Some(5),
                progress: ProgressMode::Quiet,
                ..RunOptions::default()
            },
        )
        .unwrap();
        assert!(s.interrupted);
        let out = tmp.path().join("run");
        // What a crash during the save of step 8 could leave: a staging folder and a partial folder.
        std::fs::create_dir_all(out.join(".checkpoint-8.tmp-4242")).unwrap();
        std::fs::write(
            out.join(".checkpoint-8.tmp-4242/adapter_model.safetensors"),
            b"partial",
        )
        .unwrap();
        std::fs::create_dir_all(out.join("checkpoint-8")).unwrap();
        std::fs::write(
            out.join("checkpoint-8/adapter_model.safetensors"),
            b"partial",
        )
        .unwrap();
        let r = train(&cfg, &quiet()).unwrap();
        assert!(r.resumed_from.unwrap().ends_with("checkpoint-4"));
        assert_eq!(r.steps, 8);
    }

    /// `eval_generate`: the held-out questions are asked before the first step (the baseline), at every evaluation
    /// with `at_eval_steps`, and at the end; each time every question's answer and scores go to
    /// `eval_generate/step-N.jsonl` and the means to metrics.jsonl (`task`), and the summary has before and after.
    #[test]
    fn eval_generate_records_task_metrics_before_during_and_after() {
        let held = root().join("datasets/nimbrel/heldout.jsonl");
        let n = std::fs::read_to_string(&held)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        let tmp = tempfile::tempdir().unwrap();
        let extra = format!(
            "max_steps: 4\nval_set_size: 0.2\neval_steps: 2\neval_generate:\n  path: {}\n  max_new_tokens: 4\n  batch_size: 5\n  metrics: [contains, f1, exact]\n  at_eval_steps: true",
            held.display()
        );
        let s = train(&config(tmp.path(), &extra), &quiet()).unwrap();
        let out = tmp.path().join("run");
        let lines = loratune::train::report::read_metrics(&out).unwrap();
        let task_steps: Vec<u64> = lines
            .iter()
            .filter(|l| l.task.is_some())
            .map(|l| l.step)
            .collect();
        assert_eq!(task_steps, vec![0, 2, 4]);
        for step in [0, 2, 4] {
            let f = out.join(format!("eval_generate/step-{step}.jsonl"));
            let rows: Vec<serde_json::Value> = std::fs::read_to_string(&f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(rows.len(), n, "{}", f.display());
            // The file's scores average to the recorded means.
            let line = lines
                .iter()
                .find(|l| l.step == step && l.task.is_some())
                .unwrap();
            for (metric, mean) in line.task.as_ref().unwrap() {
                let avg = rows
                    .iter()
                    .map(|r| r["scores"][metric].as_f64().unwrap())
                    .sum::<f64>()
                    / n as f64;
                assert!((avg - mean).abs() < 1e-12, "{metric} at step {step}");
            }
        }
        let (b, f) = (s.task_baseline.unwrap(), s.task_final.unwrap());
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            vec!["contains", "exact", "f1"]
        );
        assert_eq!(
            &f,
            lines.iter().rev().find_map(|l| l.task.as_ref()).unwrap()
        );
        // `loratune runs` shows the last task metrics.
        let rows = loratune::train::runs::table(std::slice::from_ref(&out)).unwrap();
        assert_eq!(rows[0].task, f);
        let text = loratune::train::runs::render_text(&rows);
        assert!(
            text.contains("task:contains") && text.contains("task:f1"),
            "{text}"
        );
        // Without at_eval_steps: before and after only.
        let tmp = tempfile::tempdir().unwrap();
        let extra = format!(
            "max_steps: 2\neval_generate:\n  path: {}\n  max_new_tokens: 2",
            held.display()
        );
        train(&config(tmp.path(), &extra), &quiet()).unwrap();
        let lines = loratune::train::report::read_metrics(&tmp.path().join("run")).unwrap();
        let steps: Vec<u64> = lines
            .iter()
            .filter(|l| l.task.is_some())
            .map(|l| l.step)
            .collect();
        assert_eq!(steps, vec![0, 2]);
    }

    #[test]
    fn early_stopping_ends_the_run_when_eval_loss_stops_improving() {
        let tmp = tempfile::tempdir().unwrap();
        // A learning rate so small that eval loss cannot improve after the first evaluation.
        let cfg = config_with(
            tmp.path(),
            "max_steps: 20\nval_set_size: 8\neval_steps: 1\nearly_stopping_patience: 2",
            &["learning_rate=1.0e-12", "warmup_steps=0"],
        );
        let s = train(&cfg, &quiet()).unwrap();
        assert!(s.stopped_early);
        assert!(s.steps < 20 && s.steps >= 3, "stopped at {}", s.steps);
    }

    /// `train` with `merge_lora` assembles the merged folder as `loratune merge` does: a base
    /// generation_config.json that is not a JSON object is an error naming it in both (it used to be replaced
    /// silently), and a good one is kept (its sampling keys and eos ids) and completed with the model's eos.
    #[test]
    fn merged_export_of_train_and_merge_share_one_assembly() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir(&base).unwrap();
        for f in std::fs::read_dir(fixture("models/llama")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, base.join(f.file_name().unwrap())).unwrap();
        }
        std::fs::write(
            base.join("generation_config.json"),
            "[\"not\", \"an object\"]",
        )
        .unwrap();
        let cfg = config_with(
            tmp.path(),
            "max_steps: 1\nmerge_lora: true",
            &[&format!("base_model={}", base.display())],
        );
        let e = train(&cfg, &quiet()).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json must be a JSON object"),
            "{e}"
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loratune"))
            .args(["merge", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(fixture("loratune_export/llama/adapter"))
            .arg("--out")
            .arg(tmp.path().join("merged"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("generation_config.json must be a JSON object"),
            "{err}"
        );
        // A good one is kept (its sampling keys and eos ids) and completed with the model's eos.
        std::fs::write(
            base.join("generation_config.json"),
            r#"{"eos_token_id": 0, "temperature": 0.3}"#,
        )
        .unwrap();
        train(&cfg, &quiet()).unwrap();
        let g: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("run/merged/generation_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(g["temperature"], 0.3);
        assert_eq!(g["eos_token_id"], serde_json::json!([2, 0]));
    }

    /// `loratune eval` runs where and how the config says: `bf16: true` evaluates the base in bf16 (it used to run
    /// CPU f32 whatever the config said), exactly as the library does with a bf16 model.
    #[test]
    fn eval_honours_the_configs_placement() {
        use burn::tensor::DType;
        use loratune::train::run::{eval_on, evaluate};
        let tmp = tempfile::tempdir().unwrap();
        let f32_cfg = config(tmp.path(), "max_steps: 1\nval_set_size: 8");
        let bf16_cfg = config_with(tmp.path(), "max_steps: 1\nval_set_size: 8", &["bf16=true"]);
        let e32 = evaluate(&f32_cfg, None).unwrap();
        let e16 = evaluate(&bf16_cfg, None).unwrap();
        assert_eq!(e32.tokens, e16.tokens);
        assert!(
            (e32.loss - e16.loss).abs() > 1e-6,
            "bf16 eval equals the f32 one ({}): the placement was ignored",
            e32.loss
        );
        // The same evaluation by hand, with the base loaded in bf16.
        let tok = bf16_cfg.tokenizer(&fixture("models/llama")).unwrap();
        let data = bf16_cfg.data_pipeline(&tok).unwrap();
        let batches: Vec<_> = data.eval_batches().unwrap().map(|b| b.unwrap()).collect();
        let base = loratune::model::open(&fixture("models/llama")).unwrap();
        let m = CausalLm::<B>::load(
            base.config,
            base.source.as_ref(),
            &Default::default(),
            DType::BF16,
        )
        .unwrap();
        let want = eval_on(&m, &batches).unwrap();
        assert_eq!(e16, want);
    }

    /// Resuming a checkpoint with a config that changes the trajectory is refused, as a typed error naming the
    /// checkpoint.
    #[test]
    fn resuming_with_another_config_is_a_typed_error() {
        let tmp = tempfile::tempdir().unwrap();
        train(&config(tmp.path(), "max_steps: 2\nsave_steps: 1"), &quiet()).unwrap();
        let other = config_with(
            tmp.path(),
            "max_steps: 2\nsave_steps: 1\nauto_resume_from_checkpoints: true",
            &["learning_rate=0.02"],
        );
        match train(&other, &quiet()) {
            Err(loratune::Error::CheckpointMismatch {
                checkpoint,
                found,
                expected,
            }) => {
                assert!(checkpoint.ends_with("checkpoint-2"), "{checkpoint:?}");
                assert_ne!(found, expected);
            }
            other => panic!("expected a checkpoint mismatch, got {other:?}"),
        }
    }

    /// Two processes training into one folder: the second fails at once, naming the holder's pid, and writes
    /// nothing there (before the lock, both exited 0 with interleaved metrics and a config of the wrong seed).
    #[test]
    fn a_second_run_into_a_locked_folder_fails_naming_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), "max_steps: 1");
        let out = &cfg.output_dir;
        let held = loratune::export::atomic::FolderLock::acquire(out)
            .unwrap()
            .expect("advisory locks work on the test machine's temp folder");
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_loratune"))
            .arg("train")
            .arg(tmp.path().join("config.yaml"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{err}");
        assert!(
            err.contains("in use by another loratune process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(!out.join("config.yaml").exists() && !out.join("metrics.jsonl").exists());
        // Released (as when the holder dies): the same run now goes through.
        drop(held);
        train(&cfg, &quiet()).unwrap();
        assert!(out.join("adapter/adapter_model.safetensors").exists());
    }

    /// What a killed run left half-written (a checkpoint staging folder, an export's temp file) is removed by the
    /// next run in that folder; finished checkpoints are kept.
    #[test]
    fn staging_left_by_a_killed_run_is_removed_on_the_next_start() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(
            tmp.path(),
            "max_steps: 3\nsave_steps: 1\nauto_resume_from_checkpoints: true",
        );
        let interrupted = RunOptions {
            stop_after: Some(2),
            ..quiet()
        };
        train(&cfg, &interrupted).unwrap();
        let out = &cfg.output_dir;
        let dead = 4_194_304u32; // above Linux's pid_max: never a running process
        let stale_ckpt = out.join(format!(".checkpoint-3.tmp-{dead}"));
        std::fs::create_dir(&stale_ckpt).unwrap();
        std::fs::write(stale_ckpt.join("adapter_model.safetensors"), b"half").unwrap();
        std::fs::create_dir_all(out.join("adapter")).unwrap();
        let stale_file = out.join(format!("adapter/.adapter_model.safetensors.tmp-{dead}"));
        std::fs::write(&stale_file, b"half").unwrap();
        train(&cfg, &quiet()).unwrap();
        assert!(!stale_ckpt.exists() && !stale_file.exists());
        assert!(out.join("checkpoint-2").is_dir() && out.join("checkpoint-3").is_dir());
    }

    /// `learning_rate: 1e30` used to train without a word; now the config carries a warning (and still trains).
    #[test]
    fn an_implausible_learning_rate_is_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_with(tmp.path(), "max_steps: 1", &["learning_rate=1e30"]);
        let w: Vec<String> = cfg.warnings().iter().map(|w| w.to_string()).collect();
        assert!(
            w.iter()
                .any(|w| w.contains("learning_rate") && w.contains("implausibly high")),
            "{w:?}"
        );
        let ok = config(tmp.path(), "max_steps: 1");
        assert!(ok
            .warnings()
            .iter()
            .all(|w| !w.to_string().contains("implausibly")));
    }

    /// With 3 of the rows too long and 2 bad, `train` says so at the start and writes the same counts, with the
    /// file and line of each, to data_report.json (it used to print only "N training samples").
    #[test]
    fn every_row_is_accounted_for_at_the_start_and_in_the_run_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let good = std::fs::read_to_string(fixture("train/facts_chat.jsonl")).unwrap();
        let n_good = good.lines().count();
        let long = "lorem ipsum ".repeat(300);
        let mut data = good.clone();
        for i in 0..3 {
            data.push_str(
                &serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")},
                    {"role": "assistant", "content": long}]})
                .to_string(),
            );
            data.push('\n');
        }
        data.push_str(r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}"#);
        data.push_str("\n{not json\n");
        let data_path = tmp.path().join("mixed.jsonl");
        std::fs::write(&data_path, data).unwrap();
        let set = format!("datasets.0.path={}", data_path.display());
        config_with(tmp.path(), "max_steps: 1\nskip_bad_rows: true", &[&set]);
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_loratune"))
            .arg("train")
            .arg(tmp.path().join("config.yaml"))
            .args(["--set", &set])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{stdout}\n{stderr}");
        let shown = format!("{stdout}{stderr}");
        for want in [
            format!("records read          {}", n_good + 5),
            format!("samples kept          {n_good}"),
            "bad records skipped   2".to_string(),
            "dropped (> 256 tokens)  3".to_string(),
            format!("mixed.jsonl line {}: ", n_good + 1),
            format!(
                "mixed.jsonl line {}: field `messages[1].content`: is null",
                n_good + 4
            ),
        ] {
            assert!(shown.contains(&want), "`{want}` not in:\n{shown}");
        }
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(tmp.path().join("run/data_report.json")).unwrap(),
        )
        .unwrap();
        let c = &report["train_counts"];
        assert_eq!(c["records"], n_good as u64 + 5);
        assert_eq!(c["samples"], n_good as u64);
        assert_eq!(c["dropped_too_long"], 3);
        assert_eq!(c["skipped"]["missing_field"], 1);
        assert_eq!(c["skipped"]["invalid_json"], 1);
        let drops = c["drop_examples"].as_array().unwrap();
        assert_eq!(drops.len(), 3);
        assert!(drops[0]
            .as_str()
            .unwrap()
            .contains(&format!("mixed.jsonl line {}: ", n_good + 1)));
        assert_eq!(c["skip_examples"].as_array().unwrap().len(), 2);
    }

    /// QLoRA end to end: `adapter: qlora` trains on an NF4 base (the decoder linears are NF4 in memory), the loss
    /// falls, and the merged export adds the adapter to the base's *original* f32 weights, not to their NF4 copy
    /// (Axolotl reloads the base in full precision to merge; so do we).
    #[test]
    fn qlora_trains_on_an_nf4_base_and_merges_into_the_original_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(
            tmp.path(),
            "max_steps: 12\nadapter: qlora\nmerge_lora: true",
        );
        assert!(cfg.base_plan().quantize.is_some());
        let s = train(&cfg, &quiet()).unwrap();
        let start = s.losses[0];
        let end = s.losses[9..].iter().sum::<f64>() / 3.0;
        assert!(
            end < 0.8 * start,
            "QLoRA loss did not fall: {start} → {end}"
        );
        let out = tmp.path().join("run");
        let name = "model.layers.0.self_attn.q_proj.weight";
        let (shape, orig) = read_ref(&fixture("models/llama/model.safetensors"), name);
        let (_, merged) = read_ref(&out.join("merged/model.safetensors"), name);
        let adapter = loratune::lora::peft::read_adapter(&out.join("adapter")).unwrap();
        let (ash, a, _, b, scale) = &adapter.modules["model.layers.0.self_attn.q_proj"];
        let (r, inp) = (ash[0], ash[1]);
        let mut worst_orig = 0f32;
        let mut worst_nf4 = 0f32;
        let nf4 = loratune::quant::QMatrix::quantize(
            &orig,
            shape[0],
            shape[1],
            loratune::quant::QuantScheme::Nf4 { double: true },
        )
        .unwrap()
        .to_f32();
        for o in 0..shape[0] {
            for i in 0..inp {
                let d: f32 =
                    (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum::<f32>() * *scale as f32;
                let m = merged[o * inp + i];
                worst_orig = worst_orig.max((m - (orig[o * inp + i] + d)).abs());
                worst_nf4 = worst_nf4.max((m - (nf4[o * inp + i] + d)).abs());
            }
        }
        assert!(worst_orig < 1e-5, "merged ≠ original + delta: {worst_orig}");
        assert!(
            worst_nf4 > 1e-3,
            "the NF4 copy is indistinguishable: {worst_nf4}"
        );
    }
}
