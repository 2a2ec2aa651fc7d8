//! Build a [`CausalLm`] from a [`TensorSource`]: every expected tensor checked by name and shape, with one
//! error listing everything missing, unexpected or mis-shaped.

use std::collections::BTreeSet;

use burn::tensor::{backend::Backend, DType, Tensor};

use super::config::{Family, ModelConfig};
use super::decoder::{
    CausalLm, DecoderLayer, GateUpProj, Mlp, Model, QkvProj, RmsNorm, SelfAttention,
};
use super::weights::TensorSource;
use crate::error::{Error, Result};
use crate::lora::linear::LoraLinear;

/// Tensors some checkpoints carry that the model does not use (never an error).
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".masked_bias")
        || name.ends_with(".attn.bias")
}

/// The torch-layout shapes a config implies, by HF name.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let (qo, kvo, i) = (cfg.q_out(), cfg.kv_out(), cfg.intermediate_size);
    let mut v: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        if cfg.family.fused_projections() {
            v.push((
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![qo + 2 * kvo, h],
            ));
            v.push((format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h]));
        } else {
            v.push((format!("{p}.self_attn.q_proj.weight"), vec![qo, h]));
            v.push((format!("{p}.self_attn.k_proj.weight"), vec![kvo, h]));
            v.push((format!("{p}.self_attn.v_proj.weight"), vec![kvo, h]));
            if cfg.qkv_bias {
                v.push((format!("{p}.self_attn.q_proj.bias"), vec![qo]));
                v.push((format!("{p}.self_attn.k_proj.bias"), vec![kvo]));
                v.push((format!("{p}.self_attn.v_proj.bias"), vec![kvo]));
            }
            v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            if cfg.mlp_bias {
                v.push((format!("{p}.mlp.gate_proj.bias"), vec![i]));
                v.push((format!("{p}.mlp.up_proj.bias"), vec![i]));
            }
        }
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, qo]));
        if cfg.o_bias {
            v.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        if cfg.mlp_bias {
            v.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
        }
        if cfg.qk_norm {
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![cfg.head_dim]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![cfg.head_dim]));
        }
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if cfg.family == Family::Gemma2 {
            v.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
            v.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
        }
    }
    v.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    v
}

/// Check a source against a config without loading anything: one error naming every problem.
pub fn check_source(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<()> {
    let expected = expected_tensors(cfg);
    let mut problems = Vec::new();
    let mut wanted = BTreeSet::new();
    for (name, shape) in &expected {
        wanted.insert(name.clone());
        match src.shape(name) {
            None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some(got) if &got != shape => problems.push(format!(
                "tensor `{name}` has shape {got:?} in the checkpoint but the config implies {shape:?}"
            )),
            Some(_) => {}
        }
    }
    for name in src.names() {
        if wanted.contains(&name) || ignorable(&name) {
            continue;
        }
        // Tied checkpoints sometimes still carry lm_head.weight; transformers ignores it too.
        if name == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        problems.push(format!(
            "unexpected tensor `{name}` (shape {:?})",
            src.shape(&name).unwrap_or_default()
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let shown: Vec<_> = problems.into_iter().take(20).collect();
    Err(Error::Weights(format!(
        "{}: the weights do not match the {} config ({} problem{}):\n  {}{}",
        src.origin(),
        cfg.architecture(),
        n,
        if n == 1 { "" } else { "s" },
        shown.join("\n  "),
        if n > 20 {
            format!("\n  ... and {} more", n - 20)
        } else {
            String::new()
        }
    )))
}

struct Loader<'a, B: Backend> {
    src: &'a dyn TensorSource,
    device: &'a B::Device,
    dtype: DType,
}

impl<B: Backend> Loader<'_, B> {
    fn t2(&self, name: &str) -> Result<Tensor<B, 2>> {
        let data = self.src.load(name, self.dtype)?;
        Ok(Tensor::from_data(data, (self.device, self.dtype)))
    }
    fn t1(&self, name: &str) -> Result<Tensor<B, 1>> {
        let data = self.src.load(name, self.dtype)?;
        Ok(Tensor::from_data(data, (self.device, self.dtype)))
    }
    fn linear(&self, path: &str, bias: bool) -> Result<LoraLinear<B>> {
        let w = self.t2(&format!("{path}.weight"))?;
        let b = if bias {
            Some(self.t1(&format!("{path}.bias"))?)
        } else {
            None
        };
        Ok(LoraLinear::new(w, b))
    }
    fn norm(&self, name: &str, eps: f64, gemma: bool) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: self.t1(name)?,
            eps,
            gemma,
        })
    }
}

impl<B: Backend> CausalLm<B> {
    /// Load a model from a tensor source in the given compute dtype (F32, BF16 or F16).
    pub fn load(
        cfg: ModelConfig,
        src: &dyn TensorSource,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        check_source(&cfg, src)?;
        let ld = Loader::<B> { src, device, dtype };
        let eps = cfg.rms_norm_eps;
        let gemma = cfg.family.is_gemma();
        let embed_tokens = ld.t2("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let qkv = if cfg.family.fused_projections() {
                QkvProj::Fused {
                    qkv_proj: ld.linear(&format!("{p}.self_attn.qkv_proj"), false)?,
                }
            } else {
                QkvProj::Split {
                    q_proj: ld.linear(&format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
                    k_proj: ld.linear(&format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
                    v_proj: ld.linear(&format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
                }
            };
            let gate_up = if cfg.family.fused_projections() {
                GateUpProj::Fused {
                    gate_up_proj: ld.linear(&format!("{p}.mlp.gate_up_proj"), false)?,
                }
            } else {
                GateUpProj::Split {
                    gate_proj: ld.linear(&format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                    up_proj: ld.linear(&format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                }
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(ld.norm(&format!("{p}.self_attn.q_norm.weight"), eps, gemma)?),
                    Some(ld.norm(&format!("{p}.self_attn.k_norm.weight"), eps, gemma)?),
                )
            } else {
                (None, None)
            };
            let gemma2 = cfg.family == Family::Gemma2;
            layers.push(DecoderLayer {
                self_attn: SelfAttention {
                    qkv,
                    o_proj: ld.linear(&format!("{p}.self_attn.o_proj"), cfg.o_bias)?,
                    q_norm,
                    k_norm,
                },
                mlp: Mlp {
                    gate_up,
                    down_proj: ld.linear(&format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
                    act: cfg.hidden_act,
                },
                input_layernorm: ld.norm(&format!("{p}.input_layernorm.weight"), eps, gemma)?,
                post_attention_layernorm: ld.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    eps,
                    gemma,
                )?,
                pre_feedforward_layernorm: if gemma2 {
                    Some(ld.norm(&format!("{p}.pre_feedforward_layernorm.weight"), eps, gemma)?)
                } else {
                    None
                },
                post_feedforward_layernorm: if gemma2 {
                    Some(ld.norm(
                        &format!("{p}.post_feedforward_layernorm.weight"),
                        eps,
                        gemma,
                    )?)
                } else {
                    None
                },
                window: cfg.layer_windows[l],
            });
        }
        let norm = ld.norm("model.norm.weight", eps, gemma)?;
        let lm_head = if cfg.tie_word_embeddings {
            LoraLinear::new(embed_tokens.clone(), None)
        } else {
            ld.linear("lm_head", false)?
        };
        let inv_freq = cfg.rope_inv_freq();
        Ok(CausalLm {
            config: cfg,
            model: Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            inv_freq,
            device: device.clone(),
        })
    }
}
