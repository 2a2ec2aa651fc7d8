//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, read and written exactly as PEFT,
//! transformers, vLLM and llama.cpp's converter expect them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use serde_json::{json, Value};

use super::adapter::{principal_init_many, LoraInit, LoraSettings, SavedModule};
use super::linear::{Dora, InitialFactors, LoraAdapter};
use super::targets::{short_name, TargetSpec};
use crate::error::{Error, Result};
use crate::export::atomic::{write_atomic, AtomicDir};
use crate::export::safetensors::{encode, pt_metadata, write_safetensors, OutDtype, TensorEntry};
use crate::model::weights::{convert_raw, host_f32, parse_safetensors_header, StoredDtype};
use crate::model::CausalLm;

const PREFIX: &str = "base_model.model.";

/// A number as JSON: an integer when it is one (Ollama reads `lora_alpha` as an integer).
fn num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// Build `adapter_config.json` for a model's current adapters.
pub fn adapter_config<B: Backend>(
    model: &CausalLm<B>,
    s: &LoraSettings,
    base_model: &str,
) -> Value {
    let modules: Vec<String> = model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.lora.is_some())
        .map(|(p, _)| p)
        .collect();
    let target_modules = match &s.targets {
        TargetSpec::Names(n) => json!(n),
        TargetSpec::AllLinear => {
            let set: BTreeSet<&str> = modules.iter().map(|p| short_name(p)).collect();
            json!(set.into_iter().collect::<Vec<_>>())
        }
        TargetSpec::Regex(r) => json!(r),
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": s.r,
        "lora_alpha": num(s.alpha),
        "lora_dropout": s.dropout,
        "target_modules": target_modules,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": json!(s.init),
        "modules_to_save": if s.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(s.modules_to_save.iter().map(|m| m.name()).collect::<Vec<_>>())
        },
        "inference_mode": true,
        "layers_to_transform": s.layers,
        "layers_pattern": if s.layers.is_some() { json!(layer_list_name(model)) } else { Value::Null },
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// The name of the model's decoder-layer list, PEFT's `layers_pattern` (`layers`; Falcon's `h`).
fn layer_list_name<B: Backend>(model: &CausalLm<B>) -> &'static str {
    let prefix = model
        .config
        .family
        .rules()
        .layer_prefix
        .trim_end_matches('.');
    prefix.rsplit('.').next().unwrap_or(prefix)
}

/// One adapter tensor: PEFT key, torch-layout shape, f32 values.
pub type AdapterTensor = (String, Vec<usize>, Vec<f32>);

/// How an adapter is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterForm {
    /// The factors as trained (checkpoints): a PiSSA / OLoRA adapter keeps `init_lora_weights: pissa|olora`, and
    /// loading it (loratune or PEFT) re-derives the residual base from the original one.
    AsTrained,
    /// A plain LoRA on the original base (exports), which every loader applies: a PiSSA / OLoRA adapter of rank r
    /// becomes PEFT's converted one (`path_initial_model_for_weight_conversion`) of rank 2r, A = [A; A₀],
    /// B = [B, −B₀], so that s·B·A = s·(B·A − B₀·A₀) = the trained change of the original W; `lora_alpha` doubles
    /// (×√2 with rsLoRA) so that the scale stays, and `init_lora_weights` says `true`.
    Portable,
}

/// The settings an adapter is written with in `form` (rank and alpha of the converted PiSSA / OLoRA adapter).
pub fn written_settings<B: Backend>(
    model: &CausalLm<B>,
    s: &LoraSettings,
    form: AdapterForm,
) -> LoraSettings {
    let converted = form == AdapterForm::Portable
        && model
            .linears()
            .iter()
            .any(|(_, l)| l.lora.as_ref().is_some_and(|a| a.initial.is_some()));
    if converted {
        converted_settings(s)
    } else {
        s.clone()
    }
}

/// PEFT's conversion of a PiSSA / OLoRA adapter's settings: rank 2r, alpha doubled (×√2 with rsLoRA, so the
/// scale stays), `init_lora_weights: true`.
fn converted_settings(s: &LoraSettings) -> LoraSettings {
    LoraSettings {
        r: 2 * s.r,
        alpha: if s.use_rslora {
            s.alpha * 2f64.sqrt()
        } else {
            2.0 * s.alpha
        },
        init: LoraInit::Kaiming,
        ..s.clone()
    }
}

/// PEFT's conversion of one module's factors: A `[r, in]` gains A₀'s rows, B `[out, r]` gains −B₀'s columns.
fn stack_initial(a: &mut Vec<f32>, b: &mut Vec<f32>, init: &InitialFactors, r: usize, outf: usize) {
    a.extend_from_slice(&init.a);
    *b = (0..outf)
        .flat_map(|i| {
            let (b, b0) = (&b[i * r..(i + 1) * r], &init.b[i * r..(i + 1) * r]);
            b.iter()
                .copied()
                .chain(b0.iter().map(|x| -x))
                .collect::<Vec<_>>()
        })
        .collect();
}

/// The adapter tensors in PEFT naming and torch layout, f32.
pub fn adapter_tensors<B: Backend>(
    model: &CausalLm<B>,
    form: AdapterForm,
) -> Result<Vec<AdapterTensor>> {
    let mut out = Vec::new();
    for (path, lin) in model.linears() {
        if let Some(l) = &lin.lora {
            let (mut a, mut b) = (host_f32(l.a.clone())?, host_f32(l.b.clone())?);
            let [mut r, inf] = l.a.dims();
            let outf = lin.out_features();
            if let (AdapterForm::Portable, Some(init)) = (form, &l.initial) {
                stack_initial(&mut a, &mut b, init, r, outf);
                r *= 2;
            }
            out.push((format!("{PREFIX}{path}.lora_A.weight"), vec![r, inf], a));
            out.push((format!("{PREFIX}{path}.lora_B.weight"), vec![outf, r], b));
            if let Some(d) = &l.dora {
                // PEFT saves the magnitude 1-D, `[out]`, without `.weight`.
                out.push((
                    super::adapter::magnitude_key(&path),
                    vec![outf],
                    host_f32(d.magnitude.clone())?,
                ));
            }
        }
    }
    // modules_to_save: the whole trained weight, under the module's own key (as PEFT saves it).
    for m in SavedModule::ALL {
        if let Some(w) = m.copy(model) {
            out.push((m.peft_key(model), w.dims().to_vec(), host_f32(w.clone())?));
        }
    }
    Ok(out)
}

/// `adapter_config.json` and `adapter_model.safetensors` (f32) of the model's adapters in `form`, into `dir` (a
/// staging folder: the PEFT adapter folder and every checkpoint write them).
pub fn write_adapter_files<B: Backend>(
    dir: &Path,
    model: &CausalLm<B>,
    s: &LoraSettings,
    base_model: &str,
    form: AdapterForm,
) -> Result<()> {
    let tensors = adapter_tensors(model, form)?;
    if tensors.is_empty() {
        return Err(Error::Lora("the model carries no adapter to save".into()));
    }
    let cfg = adapter_config(model, &written_settings(model, s, form), base_model);
    let text = serde_json::to_string_pretty(&cfg).map_err(|source| Error::Serialize {
        what: "adapter_config.json".into(),
        source: source.into(),
    })?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    let entries: Vec<TensorEntry> = tensors
        .into_iter()
        .map(|(name, shape, v)| TensorEntry {
            name,
            dtype: OutDtype::F32,
            shape,
            bytes: encode(&v, OutDtype::F32),
        })
        .collect();
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &entries,
        &pt_metadata(),
    )
}

/// Write a PEFT adapter folder atomically: adapter_config.json, adapter_model.safetensors, README.md.
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    s: &LoraSettings,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    let staging = AtomicDir::create(dir)?;
    // PEFT (>= 0.21) loads adapters on a mixture of experts' router or experts onto transformers 5's fused expert
    // tensors through its ParamWrapper, which refuses any lora_dropout but 0. Dropout plays no part once trained,
    // so the exported adapter says 0 (checkpoints keep the training value: resuming replays it).
    let moe_adapted = model.linears().iter().any(|(p, l)| {
        l.lora.is_some() && p.contains(&format!(".{}.", crate::model::tree::MOE_BLOCK))
    });
    let export_settings = LoraSettings {
        dropout: if moe_adapted { 0.0 } else { s.dropout },
        ..s.clone()
    };
    write_adapter_files(
        staging.path(),
        model,
        &export_settings,
        base_model,
        AdapterForm::Portable,
    )?;
    let mut readme = model_card(model, s, base_model, dir);
    if moe_adapted && s.dropout != 0.0 {
        readme.push_str(&format!(
            "\nTrained with lora_dropout = {}; adapter_config.json says 0 because PEFT loads router and expert \
             adapters onto transformers 5's fused experts only with lora_dropout 0 (dropout has no effect at inference).\n",
            s.dropout
        ));
    }
    if s.init.is_principal() {
        readme.push_str(&format!(
            "\nTrained from a {} initialisation (the base weight minus the adapter's start). Saved as PEFT converts it \
             (`path_initial_model_for_weight_conversion`): a plain LoRA of rank {} = 2 × {} on the original base, \
             lora_alpha {} (the trained factors stacked with the initial ones, negated), so it loads on the unmodified \
             base everywhere.\n",
            s.init.name(),
            2 * s.r,
            s.r,
            written_settings(model, s, AdapterForm::Portable).alpha
        ));
    }
    write_atomic(&staging.path().join("README.md"), readme.as_bytes())?;
    staging.commit()
}

/// `loratune.json` in an adapter folder: what the training run knew that the adapter files do not say.
pub const TRAINING_FACTS: &str = "loratune.json";

/// What a training run records beside its adapter ([`TRAINING_FACTS`]; PEFT ignores the file).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainingFacts {
    /// The system message most training conversations carried, and how many did: an Ollama export uses it as
    /// the Modelfile's SYSTEM, so the model is prompted as it was trained.
    #[serde(default)]
    pub system_message: Option<(String, u64)>,
}

/// Write [`TRAINING_FACTS`] into an adapter folder (atomically).
pub fn write_training_facts(dir: &Path, facts: &TrainingFacts) -> Result<()> {
    let text = serde_json::to_string_pretty(facts).map_err(|source| Error::Serialize {
        what: TRAINING_FACTS.into(),
        source: source.into(),
    })?;
    write_atomic(&dir.join(TRAINING_FACTS), text.as_bytes())
}

/// [`TRAINING_FACTS`] of an adapter folder; the default (nothing known) when the folder has none.
pub fn read_training_facts(dir: &Path) -> Result<TrainingFacts> {
    let path = dir.join(TRAINING_FACTS);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TrainingFacts::default()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn model_card<B: Backend>(
    model: &CausalLm<B>,
    s: &LoraSettings,
    base_model: &str,
    dir: &Path,
) -> String {
    let n_mod = model
        .linears()
        .iter()
        .filter(|(_, l)| l.lora.is_some())
        .count();
    // The adapter folder and the base as PEFT can open them: absolute local paths (the card is read from anywhere);
    // a GGUF file or an Ollama model is first converted into a Hugging Face folder.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let adapter_dir = absolute(dir).display().to_string();
    let local = Path::new(base_model);
    let (convert, base) = if base_model.starts_with("ollama://") || crate::gguf::is_gguf_file(local)
    {
        let hf = format!(
            "{}-hf",
            local.file_stem().and_then(|s| s.to_str()).unwrap_or("base")
        );
        let src = if base_model.starts_with("ollama://") {
            base_model.to_string()
        } else {
            absolute(local).display().to_string()
        };
        (
            format!(
                "The base is a GGUF model; convert it into a Hugging Face folder first:\n\n```sh\nloratune convert {src} {hf}\n```\n\n"
            ),
            hf,
        )
    } else if local.exists() {
        (String::new(), absolute(local).display().to_string())
    } else {
        (String::new(), base_model.to_string())
    };
    format!(
        "---\nbase_model: {base_model}\nlibrary_name: peft\ntags:\n- lora\n- loratune\n---\n\n\
# LoRA adapter\n\nTrained with loratune on `{base_model}` ({arch}).\n\n\
- rank r = {r}, lora_alpha = {alpha}, scale = {scale:.4}{rs}\n- {n_mod} adapted modules\n\n\
{convert}Load with PEFT:\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\
base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"{adapter_dir}\")\n```\n",
        arch = model.config.architecture(),
        r = s.r,
        alpha = s.alpha,
        scale = s.scale(),
        rs = if s.use_rslora { " (rsLoRA)" } else { "" },
    )
}

/// What an adapter folder declares.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub settings: LoraSettings,
    pub base_model: Option<String>,
    /// Module path → its factors.
    pub modules: BTreeMap<String, ModuleFactors>,
    /// Module path → its DoRA magnitude (`[out]`), for a DoRA adapter (`use_dora: true`).
    pub magnitudes: BTreeMap<String, Vec<f32>>,
    /// `modules_to_save`: each trained module's whole weight (`[vocab, hidden]`, f32).
    pub saved: BTreeMap<SavedModule, (Vec<usize>, Vec<f32>)>,
}

/// One module's factors: (A shape `[r, in]`, A values, B shape `[out, r]`, B values, scale).
pub type ModuleFactors = (Vec<usize>, Vec<f32>, Vec<usize>, Vec<f32>, f64);

/// PEFT's pattern lookup for rank_pattern / alpha_pattern: a key matches a module whose path ends with it
/// (after a dot) or equals it.
fn pattern_value(patterns: &serde_json::Map<String, Value>, path: &str) -> Option<f64> {
    patterns.iter().find_map(|(k, v)| {
        let re = regex::Regex::new(&format!(r"^(.*\.)?(?:{k})$")).ok()?;
        if re.is_match(path) {
            v.as_f64()
        } else {
            None
        }
    })
}

/// `adapter` as a plain LoRA on the original weights of `base`: unchanged, except a PiSSA / OLoRA adapter saved as
/// trained (a checkpoint, or PEFT without `path_initial_model_for_weight_conversion`), which gets PEFT's conversion
/// ([`AdapterForm::Portable`]) with its initial factors re-derived from `base`. Every export that reads an adapter
/// folder goes through here.
pub fn portable<'a>(
    adapter: &'a PeftAdapter,
    base: &crate::model::OpenedModel,
) -> Result<std::borrow::Cow<'a, PeftAdapter>> {
    let s = &adapter.settings;
    if !s.init.is_principal() {
        return Ok(std::borrow::Cow::Borrowed(adapter));
    }
    let mut out = adapter.clone();
    for (path, (ash, av, bsh, bv, scale)) in out.modules.iter_mut() {
        let (r, inf, outf) = (ash[0], ash[1], bsh[0]);
        let name = format!("{path}.weight");
        let w = base
            .source
            .load(&name, DType::F32)?
            .to_vec::<f32>()
            .map_err(|e| Error::Weights(format!("{name}: {e:?}")))?;
        if w.len() != inf * outf || r > inf.min(outf) {
            return Err(Error::Lora(format!(
                "adapter module `{path}`: lora_A {ash:?} / lora_B {bsh:?} do not fit the base weight `{name}`"
            )));
        }
        let p = super::adapter::principal_host(&w, outf, inf, s.init, r, *scale);
        let init = InitialFactors { a: p.a, b: p.b };
        stack_initial(av, bv, &init, r, outf);
        ash[0] = 2 * r;
        bsh[1] = 2 * r;
    }
    out.settings = converted_settings(s);
    Ok(std::borrow::Cow::Owned(out))
}

/// [`portable`] of an optional adapter.
pub fn portable_opt<'a>(
    adapter: Option<&'a PeftAdapter>,
    base: &crate::model::OpenedModel,
) -> Result<Option<std::borrow::Cow<'a, PeftAdapter>>> {
    adapter.map(|a| portable(a, base)).transpose()
}

/// A stored tensor's values as f32.
fn f32_values(raw: &[u8], dtype: StoredDtype, shape: &[usize], key: &str) -> Result<Vec<f32>> {
    convert_raw(raw, dtype, shape.to_vec(), DType::F32, key)?
        .to_vec::<f32>()
        .map_err(|e| Error::Lora(format!("{key}: {e:?}")))
}

/// Read a PEFT adapter folder (ours or PEFT's).
pub fn read_adapter(dir: &Path) -> Result<PeftAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::error::read_to_string(&cfg_path)?;
    let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    let bad = |m: String| Error::Lora(format!("{}: {m}", cfg_path.display()));
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(format!(
            "peft_type `{peft_type}` is not supported (only LORA)"
        )));
    }
    let use_dora = v.get("use_dora").and_then(Value::as_bool) == Some(true);
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "fan_in_fan_out: true (Conv1D bases such as GPT-2) is not supported".into(),
        ));
    }
    let mut modules_to_save = Vec::new();
    match v.get("modules_to_save") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for m in a {
                let parsed = m.as_str().and_then(SavedModule::parse).ok_or_else(|| {
                    bad(format!(
                        "modules_to_save {m} is not supported: loratune trains embed_tokens and lm_head in full"
                    ))
                })?;
                if !modules_to_save.contains(&parsed) {
                    modules_to_save.push(parsed);
                }
            }
        }
        Some(other) => return Err(bad(format!("modules_to_save {other} is not a list"))),
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing integer `r`".into()))?;
    let r = crate::limits::check(&crate::limits::LORA_RANK, r).map_err(bad)?;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("missing number `lora_alpha`".into()))?;
    let use_rslora = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match v.get("target_modules") {
        Some(Value::Array(a)) => TargetSpec::Names(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        ),
        Some(Value::String(s)) if s == "all-linear" => TargetSpec::AllLinear,
        Some(Value::String(s)) => TargetSpec::Regex(s.clone()),
        _ => return Err(bad("missing `target_modules`".into())),
    };
    let layers = v.get("layers_to_transform").and_then(|l| match l {
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect(),
        ),
        Value::Number(n) => n.as_u64().map(|x| vec![x as usize]),
        _ => None,
    });
    // The initialisation matters to a trained adapter only where it changed the base: PiSSA / OLoRA adapters saved
    // as trained (PEFT without `path_initial_model_for_weight_conversion`, loratune's checkpoints) are applied to
    // the residual base, re-derived here as PEFT does when it loads them.
    let init = match v.get("init_lora_weights") {
        Some(Value::String(s)) => match LoraInit::parse(s) {
            Ok(i) => i,
            Err(_) if matches!(s.to_ascii_lowercase().as_str(), "eva" | "orthogonal") => LoraInit::Kaiming,
            Err(_) => {
                return Err(bad(format!(
                    "init_lora_weights `{s}` changes the base weight in a way loratune does not reproduce; save the \
                     adapter with PEFT's path_initial_model_for_weight_conversion (a plain LoRA on the original base)"
                )))
            }
        },
        _ => LoraInit::Kaiming,
    };
    let empty = serde_json::Map::new();
    let rank_pattern = v
        .get("rank_pattern")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let alpha_pattern = v
        .get("alpha_pattern")
        .and_then(Value::as_object)
        .unwrap_or(&empty);

    // Tensors.
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin is a pickle: re-save it with safe_serialization=True)"
        } else {
            ""
        };
        return Err(Error::Lora(format!("{}: missing{hint}", st_path.display())));
    }
    let bytes = crate::error::read_file(&st_path)?;
    let header = parse_safetensors_header(&bytes, &st_path)?;
    let mut a_map: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut b_map: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut magnitudes: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut saved = BTreeMap::new();
    for (key, (dtype, shape, start, end)) in header {
        let rest = key.strip_prefix(PREFIX).ok_or_else(|| {
            Error::Lora(format!(
                "{}: tensor `{key}` does not start with `{PREFIX}`",
                st_path.display()
            ))
        })?;
        let rest = rest.replace(".default.", ".");
        if let Some(p) = rest
            .strip_suffix(".lora_magnitude_vector")
            .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"))
        {
            if !use_dora {
                return Err(Error::Lora(format!(
                    "{}: tensor `{key}` is a DoRA magnitude but adapter_config.json does not say use_dora: true",
                    st_path.display()
                )));
            }
            if shape.len() != 1 || matches!(dtype, StoredDtype::Other(_)) {
                return Err(Error::Lora(format!(
                    "{}: DoRA magnitude `{key}` has shape {shape:?} / dtype {dtype}, expected a 1-D float vector",
                    st_path.display()
                )));
            }
            let vals = f32_values(&bytes[start..end], dtype, &shape, &key)?;
            magnitudes.insert(p.to_string(), vals);
            continue;
        }
        // A module trained in full (modules_to_save): `<path>.weight` (PEFT's saved name; also the wrapper's).
        let whole = rest.strip_suffix(".modules_to_save.weight").or_else(|| {
            rest.strip_suffix(".weight")
                .filter(|p| !p.ends_with(".lora_A") && !p.ends_with(".lora_B"))
        });
        if let Some(m) = whole.and_then(SavedModule::parse) {
            if !modules_to_save.contains(&m) {
                return Err(Error::Lora(format!(
                    "{}: tensor `{key}` is a whole {} weight, but adapter_config.json's modules_to_save does not                      name it",
                    st_path.display(),
                    m.name()
                )));
            }
            if shape.len() != 2 || matches!(dtype, StoredDtype::Other(_)) {
                return Err(Error::Lora(format!(
                    "{}: `{key}` has shape {shape:?} / dtype {dtype}, expected a 2-D float matrix",
                    st_path.display()
                )));
            }
            let vals = f32_values(&bytes[start..end], dtype, &shape, &key)?;
            saved.insert(m, (shape, vals));
            continue;
        }
        let (path, which) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
            (p.to_string(), 'A')
        } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
            (p.to_string(), 'B')
        } else {
            return Err(Error::Lora(format!(
                "{}: tensor `{key}` is not a LoRA factor (lora_A/lora_B) or a DoRA magnitude; embeddings and biases are not supported",
                st_path.display()
            )));
        };
        if shape.len() != 2 {
            return Err(Error::Lora(format!(
                "{}: tensor `{key}` has shape {shape:?}, expected 2-D",
                st_path.display()
            )));
        }
        if matches!(dtype, StoredDtype::Other(_)) {
            return Err(Error::Lora(format!(
                "{}: tensor `{key}` has unsupported dtype {dtype}",
                st_path.display()
            )));
        }
        let vals = f32_values(&bytes[start..end], dtype, &shape, &key)?;
        if which == 'A' {
            a_map.insert(path, (shape, vals));
        } else {
            b_map.insert(path, (shape, vals));
        }
    }
    let mut modules = BTreeMap::new();
    for (path, (ash, av)) in a_map {
        let (bsh, bv) = b_map.remove(&path).ok_or_else(|| {
            Error::Lora(format!(
                "{}: `{path}` has lora_A but no lora_B",
                st_path.display()
            ))
        })?;
        let rr = ash[0];
        if bsh[1] != rr {
            return Err(Error::Lora(format!(
                "{}: `{path}` lora_A is {ash:?} but lora_B is {bsh:?} (ranks differ)",
                st_path.display()
            )));
        }
        let expected_r = pattern_value(rank_pattern, &path)
            .map(|x| x as usize)
            .unwrap_or(r);
        if rr != expected_r {
            return Err(Error::Lora(format!(
                "{}: `{path}` has rank {rr} but the config says {expected_r}",
                st_path.display()
            )));
        }
        let a = pattern_value(alpha_pattern, &path).unwrap_or(alpha);
        let scale = if use_rslora {
            a / (rr as f64).sqrt()
        } else {
            a / rr as f64
        };
        modules.insert(path, (ash, av, bsh, bv, scale));
    }
    if let Some(path) = b_map.keys().next() {
        return Err(Error::Lora(format!(
            "{}: `{path}` has lora_B but no lora_A",
            st_path.display()
        )));
    }
    if modules.is_empty() && saved.is_empty() {
        return Err(Error::Lora(format!(
            "{}: no LoRA tensors",
            st_path.display()
        )));
    }
    if let Some(m) = modules_to_save.iter().find(|m| !saved.contains_key(m)) {
        return Err(Error::Lora(format!(
            "{}: modules_to_save names {} but the file has no `{PREFIX}…{}.weight`",
            st_path.display(),
            m.name(),
            m.name()
        )));
    }
    if use_dora {
        if let Some(p) = modules.keys().find(|p| !magnitudes.contains_key(*p)) {
            return Err(Error::Lora(format!(
                "{}: use_dora is true but `{p}` has no lora_magnitude_vector",
                st_path.display()
            )));
        }
    }
    if let Some(p) = magnitudes.keys().find(|p| !modules.contains_key(*p)) {
        return Err(Error::Lora(format!(
            "{}: `{p}` has a DoRA magnitude but no lora_A / lora_B",
            st_path.display()
        )));
    }
    Ok(PeftAdapter {
        settings: LoraSettings {
            r,
            alpha,
            dropout,
            use_rslora,
            targets,
            layers,
            init,
            seed: 0,
            use_dora,
            modules_to_save,
        },
        base_model: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        modules,
        magnitudes,
        saved,
    })
}

/// Put an adapter's factors onto a model (replacing nothing: a module that already has one is an error).
pub fn apply_adapter<B: Backend>(model: &mut CausalLm<B>, adapter: &PeftAdapter) -> Result<()> {
    let device = model.device.clone();
    let tied = model.config.tie_word_embeddings;
    // PiSSA / OLoRA saved as trained: the residual base first (as PEFT re-derives it when loading such an adapter).
    let mut initial = if adapter.settings.init.is_principal() {
        let jobs = model
            .linears_mut()
            .into_iter()
            .filter_map(|(p, l)| {
                let (ash, _, _, _, scale) = adapter.modules.get(&p)?;
                (l.lora.is_none() && ash[1] == l.in_features()).then_some((l, ash[0], *scale))
            })
            .collect();
        principal_init_many(jobs, adapter.settings.init)?
    } else {
        BTreeMap::new()
    };
    let mut remaining: BTreeSet<&String> = adapter.modules.keys().collect();
    for (path, lin) in model.linears_mut() {
        let Some((ash, av, bsh, bv, scale)) = adapter.modules.get(&path) else {
            continue;
        };
        remaining.remove(&path);
        if path == "lm_head" && tied {
            return Err(Error::Lora(
                "the adapter targets lm_head, but this model ties lm_head to embed_tokens; not supported".into(),
            ));
        }
        if path == "lm_head" && adapter.magnitudes.contains_key(&path) {
            return Err(Error::Lora(
                "the adapter puts DoRA on lm_head, which loratune does not support (its loss kernel applies lm_head \
                 without forming the logits)"
                    .into(),
            ));
        }
        let (inf, outf) = (lin.in_features(), lin.out_features());
        if ash[1] != inf || bsh[0] != outf {
            return Err(Error::Lora(format!(
                "adapter module `{path}`: lora_A {ash:?} / lora_B {bsh:?} do not fit the base layer [out {outf}, in {inf}] (adapter for another base model?)"
            )));
        }
        if lin.lora.is_some() {
            return Err(Error::Lora(format!(
                "module `{path}` already has an adapter"
            )));
        }
        lin.lora = Some(LoraAdapter {
            initial: initial.remove(&path).map(std::sync::Arc::new),
            a: Tensor::from_data(
                TensorData::new(av.clone(), [ash[0], ash[1]]),
                (&device, DType::F32),
            ),
            b: Tensor::from_data(
                TensorData::new(bv.clone(), [bsh[0], bsh[1]]),
                (&device, DType::F32),
            ),
            scale: *scale,
            dropout: adapter.settings.dropout,
            dora: match adapter.magnitudes.get(&path) {
                Some(m) if m.len() == outf => Some(Dora::with_magnitude(
                    &lin.weight,
                    Tensor::from_data(TensorData::new(m.clone(), [1, outf]), (&device, DType::F32)),
                )),
                Some(m) => {
                    return Err(Error::Lora(format!(
                        "adapter module `{path}`: lora_magnitude_vector has {} values, the layer has {outf} outputs",
                        m.len()
                    )))
                }
                None => None,
            },
        });
        lin.merged = false;
    }
    for (m, (shape, vals)) in &adapter.saved {
        let w = Tensor::from_data(
            TensorData::new(vals.clone(), [shape[0], shape[1]]),
            (&device, DType::F32),
        );
        m.set(model, w)?;
    }
    if let Some(p) = remaining.into_iter().next() {
        let avail: Vec<String> = model
            .linears()
            .into_iter()
            .take(8)
            .map(|(p, _)| p)
            .collect();
        return Err(Error::Lora(format!(
            "adapter module `{p}` does not exist in this model (its modules look like: {}, ...)",
            avail.join(", ")
        )));
    }
    Ok(())
}

/// Read and apply in one step.
pub fn load_adapter<B: Backend>(model: &mut CausalLm<B>, dir: &Path) -> Result<PeftAdapter> {
    let a = read_adapter(dir)?;
    apply_adapter(model, &a)?;
    Ok(a)
}
