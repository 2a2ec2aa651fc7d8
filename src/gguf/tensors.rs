//! llama.cpp tensor names ↔ Hugging Face names, and the layout fix-ups between the two.
//!
//! Names follow gguf-py's `tensor_mapping.py` (0.19.0) as llama.cpp's `convert_hf_to_gguf.py` applies it
//! (checked with `gguf.get_tensor_name_map(arch, n)` for llama, qwen2, qwen3, phi3, gemma, gemma2):
//!
//! | GGUF | HF |
//! |------|----|
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` | `lm_head.weight` |
//! | `blk.N.attn_norm` | `model.layers.N.input_layernorm` |
//! | `blk.N.attn_q` / `attn_k` / `attn_v` / `attn_output` | `self_attn.q_proj` / `k_proj` / `v_proj` / `o_proj` |
//! | `blk.N.attn_qkv` (phi3) | `self_attn.qkv_proj` (fused, as in HF Phi-3 checkpoints) |
//! | `blk.N.attn_q_norm` / `attn_k_norm` (qwen3) | `self_attn.q_norm` / `k_norm` |
//! | `blk.N.ffn_gate` / `ffn_down` | `mlp.gate_proj` / `mlp.down_proj` |
//! | `blk.N.ffn_up` | phi3: `mlp.gate_up_proj` (fused); others: `mlp.up_proj` |
//! | `blk.N.ffn_norm` | gemma2: `pre_feedforward_layernorm`; others: `post_attention_layernorm` |
//! | `blk.N.post_attention_norm` (gemma2) | `post_attention_layernorm` |
//! | `blk.N.post_ffw_norm` (gemma2) | `post_feedforward_layernorm` |
//! | `blk.N.ffn_gate_inp` (Mixtral) | `block_sparse_moe.gate` (the router) |
//! | `blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` (Mixtral: `[experts, out, in]`, stacked) | `block_sparse_moe.experts.{e}.w1` / `w3` / `w2` |
//! | `blk.N.ffn_gate.E` / `ffn_up.E` / `ffn_down.E` (2023 Mixtral files, read only) | `block_sparse_moe.experts.E.w1` / `w3` / `w2` |
//!
//! Layout fix-ups applied on import (and their inverses, for the GGUF writer):
//! - `llama` architecture (Llama, Mistral, SmolLM): the converter permutes the rows of q_proj / k_proj
//!   (weights and biases) per head from HF's half-split rotary layout to interleaved pairs: HF row
//!   `a·(d/2) + j` of a head of size `d` is stored as row `2j + a` ([`unpermute_rope_rows`] undoes it; k uses
//!   the kv head count).
//! - `gemma`, `gemma2`: the converter stores every `*norm.weight` as `w + 1` (HF's Gemma RMSNorm multiplies
//!   by `1 + w`); we subtract 1, as transformers' GGUF loader does.
//! - GGUF dims are innermost first; shapes are reported in torch order (`[out, in]`).

use std::collections::BTreeMap;

use super::reader::GgufFile;
use crate::error::{Error, Result};
use crate::model::{Family, ModelConfig};

/// The GGUF `general.architecture` llama.cpp uses for a family.
pub fn gguf_architecture(family: Family) -> &'static str {
    family.rules().gguf_architecture
}

/// GGUF tensors that carry hyperparameters rather than weights; the config reader interprets them.
pub const CONFIG_TENSORS: &[&str] = &[
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
];

fn split_suffix(s: &str) -> Option<(&str, &str)> {
    s.strip_suffix(".weight")
        .map(|b| (b, "weight"))
        .or_else(|| s.strip_suffix(".bias").map(|b| (b, "bias")))
}

/// `"12.rest"` → `("12", "rest")`: a canonical layer number (digits, no leading zero) and what follows it.
fn split_layer(s: &str) -> Option<(&str, &str)> {
    let (layer, rest) = s.split_once('.')?;
    let canonical = !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && !(layer.len() > 1 && layer.starts_with('0'));
    canonical.then_some((layer, rest))
}

/// llama.cpp's expert projections (base names without `_exps`) and Mixtral's module names.
const EXPERT_TENSORS: &[(&str, &str)] = &[("ffn_gate", "w1"), ("ffn_up", "w3"), ("ffn_down", "w2")];

/// An expert's weight `model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight` → (N, E, llama.cpp base name).
pub fn expert_of(hf_name: &str) -> Option<(usize, usize, &'static str)> {
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = split_layer(rest)?;
    let rest = rest.strip_prefix("block_sparse_moe.experts.")?;
    let (e, rest) = split_layer(rest)?;
    let module = rest.strip_suffix(".weight")?;
    let (base, _) = EXPERT_TENSORS.iter().find(|(_, m)| *m == module)?;
    Some((layer.parse().ok()?, e.parse().ok()?, base))
}

/// A stacked expert tensor `blk.N.ffn_gate_exps.weight` → (N, the Mixtral module name).
fn stacked_experts(gguf_name: &str) -> Option<(&str, &'static str)> {
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = split_layer(rest)?;
    let base = rest.strip_suffix("_exps.weight")?;
    let (_, module) = EXPERT_TENSORS.iter().find(|(g, _)| *g == base)?;
    Some((layer, module))
}

/// The HF weight names, expert by expert, of a stacked expert tensor (`None` for any other tensor).
pub fn stacked_expert_names(cfg: &ModelConfig, gguf_name: &str) -> Option<Vec<String>> {
    let moe = cfg.moe?;
    let (layer, module) = stacked_experts(gguf_name)?;
    Some(
        (0..moe.experts)
            .map(|e| expert_path(layer, e, module))
            .collect(),
    )
}

fn expert_path(layer: &str, e: impl std::fmt::Display, module: &str) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{module}.weight")
}

/// HF name of a GGUF tensor, `None` for a name this family does not use (a stacked expert tensor is several HF
/// tensors: see [`plan`]). Where the family maps a GGUF name to two modules (Falcon's `attn_norm`: one shared
/// LayerNorm or `ln_attn`), the first; [`hf_names`] gives all.
pub fn hf_name(family: Family, gguf_name: &str) -> Option<String> {
    hf_names(family, gguf_name).into_iter().next()
}

/// Every HF name a GGUF tensor can be for this family (one, or Falcon's two layouts of `attn_norm`).
pub fn hf_names(family: Family, gguf_name: &str) -> Vec<String> {
    let rules = family.rules();
    if let Some((base, suffix)) = split_suffix(gguf_name) {
        if let Some((_, hf)) = rules.gguf_globals.iter().find(|(g, _)| *g == base) {
            return vec![format!("{hf}.{suffix}")];
        }
    }
    hf_layer_name(family, gguf_name)
}

fn hf_layer_name(family: Family, gguf_name: &str) -> Vec<String> {
    if family.rules().moe {
        // the 2023 per-expert layout: blk.N.ffn_gate.E.weight
        let per_expert = gguf_name
            .strip_prefix("blk.")
            .and_then(split_layer)
            .and_then(|(layer, rest)| {
                let (base, rest) = rest.split_once('.')?;
                let (e, suffix) = split_layer(rest)?;
                let (_, module) = EXPERT_TENSORS.iter().find(|(g, _)| *g == base)?;
                (suffix == "weight").then(|| expert_path(layer, e, module))
            });
        if let Some(p) = per_expert {
            return vec![p];
        }
    }
    let Some((layer, rest)) = gguf_name.strip_prefix("blk.").and_then(split_layer) else {
        return Vec::new();
    };
    let Some((base, suffix)) = split_suffix(rest) else {
        return Vec::new();
    };
    let prefix = family.rules().layer_prefix;
    family
        .rules()
        .gguf_names()
        .filter(|(g, _)| *g == base)
        .map(|(_, module)| format!("{prefix}{layer}.{module}.{suffix}"))
        .collect()
}

/// GGUF name of an HF tensor (the inverse of [`hf_name`]); an expert's weight names the stacked tensor that
/// holds it (llama.cpp's converter writes the experts stacked).
pub fn gguf_name(family: Family, hf_name: &str) -> Option<String> {
    let rules = family.rules();
    let (module, suffix) = split_suffix(hf_name)?;
    if let Some((g, _)) = rules.gguf_globals.iter().find(|(_, h)| *h == module) {
        return Some(format!("{g}.{suffix}"));
    }
    if family.rules().moe {
        if let Some((layer, _, base)) = expert_of(hf_name) {
            return Some(format!("blk.{layer}.{base}_exps.weight"));
        }
    }
    let rest = hf_name.strip_prefix(rules.layer_prefix)?;
    let (layer, rest) = split_layer(rest)?;
    let (module, suffix) = split_suffix(rest)?;
    let (base, _) = rules.gguf_names().find(|(_, m)| *m == module)?;
    Some(format!("blk.{layer}.{base}.{suffix}"))
}

/// Fix-up applied to a tensor after dequantisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    None,
    /// Undo llama.cpp's rotary row permutation with this many heads.
    UnpermuteRope {
        n_head: usize,
    },
    /// Subtract 1 (Gemma norms stored as `w + 1`).
    GemmaNorm,
    /// Falcon's `query_key_value` rows: llama.cpp's converter regroups them q|k|v ("jploski" layout); HF groups
    /// them per key/value head ([`ModelConfig::fused_qkv_order`]).
    FalconQkv,
}

/// How one HF tensor is produced from the GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTensorSpec {
    pub hf_name: String,
    pub gguf_name: String,
    pub transform: Transform,
    /// Torch-layout shape of the result.
    pub shape: Vec<usize>,
    /// The rows `[start, start + shape[0])` of the GGUF tensor seen as a matrix of its innermost dimension (one
    /// expert of a stacked expert tensor); `None` for the whole tensor.
    pub rows: Option<usize>,
}

fn layer_base(gguf_name: &str) -> Option<(&str, &str)> {
    let rest = gguf_name.strip_prefix("blk.")?;
    let (_, rest) = rest.split_once('.')?;
    split_suffix(rest)
}

/// The transform for a (non-fused) GGUF tensor.
fn transform_for(cfg: &ModelConfig, gguf_name: &str, hf: &str) -> Transform {
    let rules = cfg.family.rules();
    if rules.gguf_permutes_qk {
        match layer_base(gguf_name) {
            Some(("attn_q", _)) => {
                return Transform::UnpermuteRope {
                    n_head: cfg.num_attention_heads,
                }
            }
            Some(("attn_k", _)) => {
                return Transform::UnpermuteRope {
                    n_head: cfg.num_key_value_heads,
                }
            }
            _ => {}
        }
    }
    if rules.gemma_norms && hf.ends_with("norm.weight") {
        return Transform::GemmaNorm;
    }
    if hf.contains(".query_key_value.") && cfg.fused_qkv_order().is_some() {
        return Transform::FalconQkv;
    }
    Transform::None
}

/// Map every tensor of `file` to its HF tensor(s). Unknown tensors are an error naming them (we never drop
/// weights silently).
pub fn plan(file: &GgufFile, cfg: &ModelConfig) -> Result<BTreeMap<String, HfTensorSpec>> {
    let expected_names = crate::model::tree::expected_tensors(cfg);
    let expected: std::collections::BTreeSet<&str> =
        expected_names.iter().map(|(n, _)| n.as_str()).collect();
    let mut out = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut insert = |spec: HfTensorSpec| -> Result<()> {
        if let Some(prev) = out.insert(spec.hf_name.clone(), spec) {
            return Err(Error::Gguf(format!(
                "{}: two GGUF tensors map to `{}` (one is `{}`)",
                file.path().display(),
                prev.hf_name,
                prev.gguf_name
            )));
        }
        Ok(())
    };
    for info in file.tensor_infos() {
        let name = info.name.as_str();
        if CONFIG_TENSORS.contains(&name) {
            continue;
        }
        if let (Some(moe), Some((layer, module))) = (cfg.moe, stacked_experts(name)) {
            let shape = info.shape();
            if shape.len() != 3 || shape[0] != moe.experts {
                return Err(Error::Gguf(format!(
                    "{}: `{name}` has shape {shape:?}, expected [{}, rows, cols] (one matrix per expert)",
                    file.path().display(),
                    moe.experts
                )));
            }
            for e in 0..moe.experts {
                insert(HfTensorSpec {
                    hf_name: expert_path(layer, e, module),
                    gguf_name: name.to_string(),
                    transform: Transform::None,
                    shape: shape[1..].to_vec(),
                    rows: Some(e * shape[1]),
                })?;
            }
            continue;
        }
        let candidates = hf_names(cfg.family, name);
        let hf = match candidates.len() {
            0 | 1 => candidates.into_iter().next(),
            _ => candidates
                .into_iter()
                .find(|c| expected.contains(c.as_str())),
        };
        if let Some(hf) = hf {
            let transform = transform_for(cfg, name, &hf);
            insert(HfTensorSpec {
                hf_name: hf,
                gguf_name: name.to_string(),
                transform,
                shape: info.shape(),
                rows: None,
            })?;
            continue;
        }
        unknown.push(name.to_string());
    }
    if !unknown.is_empty() {
        let shown: Vec<_> = unknown.iter().take(8).map(|n| format!("`{n}`")).collect();
        return Err(Error::Gguf(format!(
            "{}: {} tensor(s) have no Hugging Face equivalent for a {} model: {}{} (is the file a {} model, or a variant loratune does not support?)",
            file.path().display(),
            unknown.len(),
            gguf_architecture(cfg.family),
            shown.join(", "),
            if unknown.len() > 8 { ", ..." } else { "" },
            gguf_architecture(cfg.family),
        )));
    }
    Ok(out)
}

/// Falcon's `query_key_value` rows between HF's grouping (per key/value head) and llama.cpp's q|k|v: row c of the
/// GGUF tensor is HF row `order[c]`. `data` is `rows × cols`.
pub fn falcon_qkv_rows(
    data: &[f32],
    cols: usize,
    order: &[i32],
    to_gguf: bool,
) -> std::result::Result<Vec<f32>, String> {
    let rows = order.len();
    if data.len() != rows * cols {
        return Err(format!("{} values for {rows}×{cols}", data.len()));
    }
    let mut out = vec![0f32; data.len()];
    for (c, &h) in order.iter().enumerate() {
        let h = h as usize;
        let (src, dst) = if to_gguf { (h, c) } else { (c, h) };
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    Ok(out)
}

fn check_rope_rows(rows: usize, n_head: usize) -> std::result::Result<usize, String> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows cannot be split into {n_head} heads of even size for the rotary permutation"
        ));
    }
    Ok(rows / n_head / 2)
}

/// Undo llama.cpp's q/k permutation: `data` is `rows × cols` (row-major), rows = `n_head · head_dim`.
/// Stored row `h·d + 2j + a` becomes HF row `h·d + a·(d/2) + j`.
pub fn unpermute_rope_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> std::result::Result<Vec<f32>, String> {
    move_rope_rows(data, rows, cols, n_head, false)
}

/// Apply llama.cpp's q/k permutation (the inverse of [`unpermute_rope_rows`]), for the GGUF writer.
pub fn permute_rope_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> std::result::Result<Vec<f32>, String> {
    move_rope_rows(data, rows, cols, n_head, true)
}

/// Rows between HF's half-split rotary layout (row `h·d + a·(d/2) + j`) and llama.cpp's interleaved pairs (row
/// `h·d + 2j + a`): to llama.cpp when `to_gguf`, back to HF otherwise.
fn move_rope_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    to_gguf: bool,
) -> std::result::Result<Vec<f32>, String> {
    let half = check_rope_rows(rows, n_head)?;
    if data.len() != rows * cols {
        return Err(format!("{} values for {rows}×{cols}", data.len()));
    }
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..half {
            for a in 0..2 {
                let hf = h * 2 * half + a * half + j;
                let gg = h * 2 * half + 2 * j + a;
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_per_family() {
        let cases: &[(Family, &str, &str)] = &[
            (
                Family::Llama,
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            (
                Family::Llama,
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                Family::Llama,
                "blk.12.attn_output.weight",
                "model.layers.12.self_attn.o_proj.weight",
            ),
            (
                Family::Qwen2,
                "blk.0.attn_k.bias",
                "model.layers.0.self_attn.k_proj.bias",
            ),
            (
                Family::Qwen3,
                "blk.1.attn_k_norm.weight",
                "model.layers.1.self_attn.k_norm.weight",
            ),
            (
                Family::Phi3,
                "blk.2.attn_qkv.weight",
                "model.layers.2.self_attn.qkv_proj.weight",
            ),
            (
                Family::Phi3,
                "blk.2.ffn_up.weight",
                "model.layers.2.mlp.gate_up_proj.weight",
            ),
            (
                Family::Gemma2,
                "blk.0.ffn_norm.weight",
                "model.layers.0.pre_feedforward_layernorm.weight",
            ),
            (
                Family::Gemma2,
                "blk.0.post_attention_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                Family::Gemma2,
                "blk.0.post_ffw_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight",
            ),
            (Family::Gemma, "output_norm.weight", "model.norm.weight"),
            (
                Family::Llama,
                "token_embd.weight",
                "model.embed_tokens.weight",
            ),
            (Family::Llama, "output.weight", "lm_head.weight"),
        ];
        for &(f, g, h) in cases {
            assert_eq!(hf_name(f, g).as_deref(), Some(h), "{f:?} {g}");
            assert_eq!(gguf_name(f, h).as_deref(), Some(g), "{f:?} {h}");
        }
        // Names that belong to other families, or are malformed, do not map.
        assert_eq!(hf_name(Family::Llama, "blk.0.post_ffw_norm.weight"), None);
        assert_eq!(hf_name(Family::Llama, "blk.0.attn_q_norm.weight"), None);
        assert_eq!(hf_name(Family::Phi3, "blk.0.ffn_gate.weight"), None);
        assert_eq!(hf_name(Family::Llama, "blk.x.attn_q.weight"), None);
        assert_eq!(hf_name(Family::Llama, "blk.01.attn_q.weight"), None);
        assert_eq!(hf_name(Family::Llama, "blk.0.attn_q.scale"), None);
    }

    /// Mixtral: the router maps both ways; an expert's weight is written into its layer's stacked tensor; the
    /// 2023 per-expert names read back as the expert's weight; other families never see expert names.
    #[test]
    fn mixtral_expert_names() {
        let f = Family::Mixtral;
        let router = "model.layers.3.block_sparse_moe.gate.weight";
        assert_eq!(
            hf_name(f, "blk.3.ffn_gate_inp.weight").as_deref(),
            Some(router)
        );
        assert_eq!(
            gguf_name(f, router).as_deref(),
            Some("blk.3.ffn_gate_inp.weight")
        );
        for (module, base) in [("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")] {
            let hf = format!("model.layers.3.block_sparse_moe.experts.7.{module}.weight");
            assert_eq!(expert_of(&hf), Some((3, 7, base)));
            assert_eq!(gguf_name(f, &hf), Some(format!("blk.3.{base}_exps.weight")));
            assert_eq!(hf_name(f, &format!("blk.3.{base}.7.weight")), Some(hf));
        }
        assert_eq!(hf_name(f, "blk.3.ffn_gate_exps.weight"), None); // several HF tensors: see plan()
        assert_eq!(hf_name(Family::Llama, "blk.3.ffn_gate.7.weight"), None);
        assert_eq!(hf_name(f, "blk.3.ffn_gate.07.weight"), None);
        assert_eq!(expert_of("model.layers.3.mlp.gate_proj.weight"), None);
    }

    /// Hand-computed: 2 heads of size 4 (half = 2), one column. Stored rows per head are
    /// [a0j0, a1j0, a0j1, a1j1]; HF rows are [a0j0, a0j1, a1j0, a1j1].
    #[test]
    fn unpermute_by_hand() {
        let stored = [0., 1., 2., 3., 10., 11., 12., 13.];
        let hf = unpermute_rope_rows(&stored, 8, 1, 2).unwrap();
        assert_eq!(hf, vec![0., 2., 1., 3., 10., 12., 11., 13.]);
        assert_eq!(permute_rope_rows(&hf, 8, 1, 2).unwrap(), stored.to_vec());
        // Two columns move together.
        let stored2: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let hf2 = unpermute_rope_rows(&stored2, 8, 2, 2).unwrap();
        assert_eq!(&hf2[..8], &[0., 1., 4., 5., 2., 3., 6., 7.]);
        assert!(unpermute_rope_rows(&stored, 8, 1, 3).is_err());
        assert!(unpermute_rope_rows(&stored, 6, 1, 2).is_err());
    }
}
