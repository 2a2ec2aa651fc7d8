//! Examples → text with trained byte spans → token ids with trained flags.
//!
//! Chat examples are rendered with the chat template. The trained spans come from the template itself, never
//! from searching the text for the response:
//! - a template with `{% generation %}` blocks reports their byte spans (as transformers'
//!   `return_assistant_tokens_mask`), used as they are;
//! - otherwise each trained turn `i` is located by rendering prefixes of the conversation: it starts where
//!   `render(messages[..i], add_generation_prompt = true)` ends (for an assistant turn; the turn header is part of
//!   the generation prompt, so it is not trained) — or `render(messages[..i])` for other trained roles — and ends
//!   where `render(messages[..=i])` ends, minus trailing whitespace (the newline a template writes after the
//!   end-of-turn token is not something the model generates). Every prefix must be a true prefix of the next
//!   and of the full text; a template that rewrites earlier turns depending on what follows fails with a clear
//!   error instead of producing silently wrong masks. One exception is recognised: a template that writes
//!   `eos_token` after the last message only when no generation prompt follows (Phi-3); that closing EOS is
//!   part of neither turn.
//!
//! The text is tokenized once, without special tokens (a template writes BOS itself: no double BOS), and a
//! token is trained when its byte range overlaps a trained span (the tokenizer's offsets). Alpaca, completion and
//! text examples get BOS prepended when the tokenizer adds one (unless the text already starts with it) and EOS
//! appended as a trained token.

use std::ops::Range;
use std::sync::Arc;

use super::options::{DatasetSource, TrainOnEos};
use super::rows::{BadRow, BadRowKind, Example};
use super::Message;
use crate::error::{Error, Result};

/// A chat template as the data path uses it.
pub trait ChatRenderer: Send + Sync {
    /// Render `messages`; `add_generation_prompt` appends an assistant header.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String>;
    /// Render and return the byte spans of `{% generation %}` output, or `None` when the template has no such
    /// blocks.
    fn render_generation_spans(
        &self,
        messages: &[Message],
    ) -> Result<Option<(String, Vec<Range<usize>>)>>;
    /// Text that identifies the template and its special tokens (part of the cache key).
    fn fingerprint(&self) -> String;
}

/// A compiled chat template prepared for the data path (whether it has `{% generation %}` blocks is decided
/// once, not per sample).
pub struct TemplateRenderer {
    template: crate::tokenizer::ChatTemplate,
    generation: bool,
    fingerprint: String,
}

impl TemplateRenderer {
    pub fn new(template: crate::tokenizer::ChatTemplate) -> Self {
        let generation = template.has_generation_blocks();
        let fingerprint = format!(
            "{}\u{0}{:?}\u{0}{:?}",
            template.source(),
            template.bos_token(),
            template.eos_token()
        );
        TemplateRenderer {
            template,
            generation,
            fingerprint,
        }
    }

    /// The template.
    pub fn template(&self) -> &crate::tokenizer::ChatTemplate {
        &self.template
    }
}

impl ChatRenderer for TemplateRenderer {
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }
    fn render_generation_spans(
        &self,
        messages: &[Message],
    ) -> Result<Option<(String, Vec<Range<usize>>)>> {
        if !self.generation {
            return Ok(None);
        }
        self.template.render_with_spans(messages, false).map(Some)
    }
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}

/// The chat template to use: `override_` (a built-in name such as `chatml`, or Jinja text) or else the
/// tokenizer's own `own` template; either is rendered with the tokenizer's BOS/EOS strings.
pub fn select_template(
    override_: Option<&str>,
    own: Option<&str>,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<Option<crate::tokenizer::ChatTemplate>> {
    use crate::tokenizer::ChatTemplate;
    match override_.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => {
            if let Ok(src) = ChatTemplate::builtin_source(t) {
                return ChatTemplate::new(src, bos, eos).map(Some);
            }
            if t.contains("{%") || t.contains("{{") {
                return ChatTemplate::new(t, bos, eos).map(Some);
            }
            Err(Error::Data(format!(
                "chat_template `{t}` is neither a built-in template ({}) nor Jinja template text",
                crate::tokenizer::BUILTIN_TEMPLATES.join(", ")
            )))
        }
        None => own.map(|src| ChatTemplate::new(src, bos, eos)).transpose(),
    }
}

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// The tokenizer facts the data path needs.
#[derive(Clone)]
pub struct TextTokenizer {
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    /// Padding id (labels of padding are -100 whatever this id is; it may equal EOS).
    pub pad_id: u32,
    /// Whether the tokenizer prepends BOS to plain text (`add_bos_token`).
    pub add_bos: bool,
    /// Ids that end a turn (EOS and the template's end-of-turn tokens): a trained turn should end with one.
    pub end_of_turn_ids: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl TextTokenizer {
    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.token_to_id(text)
    }

    /// A short fingerprint input: the whole tokenizer serialised plus the special-token choices.
    pub fn fingerprint_text(&self) -> String {
        let json = self.tokenizer.to_string(false).unwrap_or_default();
        format!(
            "{json}\u{0}{:?}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{:?}",
            self.bos, self.eos, self.pad_id, self.add_bos, self.end_of_turn_ids
        )
    }
}

/// Text plus the byte spans to train on, and the special ids to add around it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<Range<usize>>,
    /// Prepend the BOS id.
    pub prepend_bos: bool,
    /// Append the EOS id (trained).
    pub append_eos: bool,
    /// Rendered by the chat template (`train_on_eos` applies).
    pub chat: bool,
}

/// A tokenized sample: ids and which of them are trained (before the first-token rule).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// Trained spans whose last token is not an end-of-turn/EOS token (the model would not learn to stop).
    pub spans_without_end: u32,
}

/// One token of a preview: its text as it appears in the rendered sample, id, and whether it is a label.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PreviewToken {
    pub id: u32,
    pub piece: String,
    pub trained: bool,
}

/// Renders and tokenizes examples.
#[derive(Clone)]
pub struct SampleBuilder {
    pub tok: TextTokenizer,
    pub template: Option<Arc<dyn ChatRenderer>>,
    pub train_on_inputs: bool,
    /// Chat samples: which end-of-turn tokens are trained.
    pub train_on_eos: TrainOnEos,
}

fn tmpl_err(e: Error) -> BadRow {
    let msg = match e {
        Error::Tokenizer(m) => m,
        other => other.to_string(),
    };
    BadRow::new(
        BadRowKind::TemplateError,
        "",
        msg,
        "fix the conversation for this template (e.g. roles must alternate for some templates) or pick another \
         `chat_template`",
    )
}

fn not_incremental(turn: usize, what: &str) -> BadRow {
    BadRow::new(
        BadRowKind::TemplateNotIncremental,
        "",
        format!(
            "the chat template does not render this conversation incrementally ({what} at message {turn}), so the \
             trained spans cannot be located from the template"
        ),
        "use a template that marks assistant text with {% generation %}…{% endgeneration %}, or a built-in one \
         (chat_template: chatml, llama3, mistral, gemma, phi3)",
    )
}

/// The Alpaca prompt as Axolotl's `AlpacaPrompter` writes it in each prompt style: the system text (the row's, else
/// the Stanford Alpaca one for with/without input) in the style's system format, then the instruction turn.
pub fn alpaca_prompt(
    style: crate::data::options::AlpacaStyle,
    system: Option<&str>,
    instruction: &str,
    input: Option<&str>,
) -> String {
    use crate::data::options::AlpacaStyle;
    let sys = system.unwrap_or(match input {
        Some(_) => {
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request."
        }
        None => {
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        }
    });
    match (style, input) {
        (AlpacaStyle::Instruct, Some(inp)) => {
            format!("{sys}\n\n### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n")
        }
        (AlpacaStyle::Instruct, None) => {
            format!("{sys}\n\n### Instruction:\n{instruction}\n\n### Response:\n")
        }
        (AlpacaStyle::Chat, Some(inp)) => {
            format!("SYSTEM: {sys}\nUSER: {instruction}\n{inp}\nASSISTANT:")
        }
        (AlpacaStyle::Chat, None) => format!("SYSTEM: {sys}\nUSER: {instruction}\nASSISTANT:"),
        (AlpacaStyle::Chatml, Some(inp)) => format!(
            "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{instruction}\n{inp}<|im_end|>\n<|im_start|>assistant\n"
        ),
        (AlpacaStyle::Chatml, None) => format!(
            "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
        ),
        (AlpacaStyle::Phi, Some(inp)) => {
            format!("<|system|>\n{sys}<|end|>\n<|user|>\n{instruction}<|end|>{inp}<|assistant|>")
        }
        (AlpacaStyle::Phi, None) => {
            format!("<|system|>\n{sys}<|end|>\n<|user|>\n{instruction}<|end|>\n<|assistant|>\n")
        }
    }
}

impl SampleBuilder {
    /// From a loaded tokenizer: its special tokens, BOS policy and stop ids, and the chat template —
    /// `chat_template` (a built-in name or Jinja text) or else the tokenizer's own. Padding uses the pad token,
    /// else EOS (labels of padding are -100 whatever the id).
    pub fn from_tokenizer(
        tok: &crate::tokenizer::LoadedTokenizer,
        chat_template: Option<&str>,
        train_on_inputs: bool,
    ) -> Result<Self> {
        let special = |t: &Option<(String, u32)>| {
            t.as_ref().map(|(text, id)| SpecialToken {
                text: text.clone(),
                id: *id,
            })
        };
        let (bos, eos) = (special(&tok.bos), special(&tok.eos));
        let template = select_template(
            chat_template,
            tok.chat_template.as_deref(),
            bos.as_ref().map(|b| b.text.as_str()),
            eos.as_ref().map(|e| e.text.as_str()),
        )?;
        let mut end_of_turn_ids = tok.stop_ids();
        if let Some(t) = &template {
            for s in t.end_of_turn_tokens() {
                if let Some(id) = tok.token_to_id(&s) {
                    if !end_of_turn_ids.contains(&id) {
                        end_of_turn_ids.push(id);
                    }
                }
            }
        }
        let pad_id = tok
            .pad
            .as_ref()
            .map(|p| p.1)
            .or(eos.as_ref().map(|e| e.id))
            .unwrap_or(0);
        Ok(SampleBuilder {
            tok: TextTokenizer {
                tokenizer: Arc::new(tok.tokenizer.clone()),
                bos,
                eos,
                pad_id,
                add_bos: tok.add_bos,
                end_of_turn_ids,
            },
            template: template.map(|t| Arc::new(TemplateRenderer::new(t)) as Arc<dyn ChatRenderer>),
            train_on_inputs,
            train_on_eos: TrainOnEos::Turn,
        })
    }

    /// This builder with `eot_tokens` as the end-of-turn tokens (Axolotl's `eot_tokens`), each of which must be one
    /// token of the tokenizer.
    pub fn with_eot_tokens(
        mut self,
        tok: &crate::tokenizer::LoadedTokenizer,
        eot: Option<&[String]>,
    ) -> Result<Self> {
        let Some(eot) = eot else { return Ok(self) };
        let mut ids = Vec::with_capacity(eot.len());
        for t in eot {
            let id = tok.token_to_id(t).ok_or_else(|| {
                Error::Data(format!(
                    "eot_tokens: `{t}` is not a token of this tokenizer; list the tokens that end a turn in the \
                     chat template (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>), each a single token"
                ))
            })?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        self.tok.end_of_turn_ids = ids;
        Ok(self)
    }

    /// This builder adapted to a dataset entry: its own chat template (compiled with this tokenizer's BOS/EOS
    /// strings) and its `train_on_eos`.
    pub fn for_source(&self, source: &DatasetSource) -> Result<Self> {
        let mut b = self.clone();
        b.train_on_eos = source.train_on_eos;
        if let Some(t) = source.chat_template.as_deref() {
            let bos = self.tok.bos.as_ref().map(|x| x.text.as_str());
            let eos = self.tok.eos.as_ref().map(|x| x.text.as_str());
            let compiled = select_template(Some(t), None, bos, eos)
                .map_err(|e| Error::Data(format!("dataset {}: chat_template: {e}", source.path)))?;
            b.template =
                compiled.map(|t| Arc::new(TemplateRenderer::new(t)) as Arc<dyn ChatRenderer>);
        }
        Ok(b)
    }

    /// Text and trained spans of an example.
    pub fn render(&self, ex: &Example) -> std::result::Result<Rendered, BadRow> {
        let plain = |text: String, prompt_len: usize, train_all: bool| {
            let start = if train_all { 0 } else { prompt_len };
            let prepend_bos = self.tok.add_bos
                && self
                    .tok
                    .bos
                    .as_ref()
                    .is_some_and(|b| !text.starts_with(b.text.as_str()));
            Rendered {
                spans: std::iter::once(start..text.len()).collect(),
                text,
                prepend_bos,
                append_eos: self.tok.eos.is_some(),
                chat: false,
            }
        };
        match ex {
            Example::Text { text } => Ok(plain(text.clone(), 0, true)),
            Example::Completion { prompt, completion } => Ok(plain(
                format!("{prompt}{completion}"),
                prompt.len(),
                self.train_on_inputs,
            )),
            Example::Alpaca {
                style,
                system,
                instruction,
                input,
                output,
            } => {
                let prompt =
                    alpaca_prompt(*style, system.as_deref(), instruction, input.as_deref());
                let n = prompt.len();
                Ok(plain(format!("{prompt}{output}"), n, self.train_on_inputs))
            }
            Example::Chat { messages, trained } => self.render_chat(messages, trained),
        }
    }

    fn render_chat(
        &self,
        messages: &[Message],
        trained: &[bool],
    ) -> std::result::Result<Rendered, BadRow> {
        let tpl = self.template.as_ref().ok_or_else(|| {
            BadRow::new(
                BadRowKind::TemplateError,
                "",
                "chat data needs a chat template and the tokenizer has none",
                "set `chat_template:` to a built-in name (chatml, llama3, mistral, gemma, phi3) or to the template text",
            )
        })?;
        let full = tpl.render(messages, false).map_err(tmpl_err)?;
        let mk = |text: String, spans| Rendered {
            text,
            spans,
            prepend_bos: false,
            append_eos: false,
            chat: true,
        };
        if self.train_on_inputs {
            let n = full.len();
            return Ok(mk(full, std::iter::once(0..n).collect()));
        }
        let only_assistant = messages
            .iter()
            .zip(trained)
            .all(|(m, &t)| t == (m.role == "assistant"));
        if only_assistant {
            if let Some((text, spans)) = tpl.render_generation_spans(messages).map_err(tmpl_err)? {
                if text != full {
                    return Err(not_incremental(
                        0,
                        "rendering with {% generation %} markers changed the text",
                    ));
                }
                return Ok(mk(full, spans));
            }
        }
        // Some templates (Phi-3) write EOS after the last message unless a generation prompt follows: that
        // closing EOS belongs to the conversation, not to the last turn, and is absent from longer prefixes.
        let eos = self
            .tok
            .eos
            .as_ref()
            .map(|e| e.text.as_str())
            .filter(|e| !e.is_empty());
        let strip_closing = |t: &str| -> Option<usize> {
            let e = eos?;
            t.ends_with(e).then(|| t.len() - e.len())
        };
        let body_end = match strip_closing(&full) {
            Some(cut) => {
                let with_gen = tpl.render(messages, true).map_err(tmpl_err)?;
                if !with_gen.starts_with(full.as_str()) && with_gen.starts_with(&full[..cut]) {
                    cut
                } else {
                    full.len()
                }
            }
            None => full.len(),
        };
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !trained.get(i).copied().unwrap_or(false) {
                continue;
            }
            let before = tpl
                .render(&messages[..i], m.role == "assistant")
                .map_err(tmpl_err)?;
            let through = tpl.render(&messages[..=i], false).map_err(tmpl_err)?;
            if !through.starts_with(&before) {
                return Err(not_incremental(
                    i,
                    "the text before the turn is not a prefix of the text through the turn",
                ));
            }
            let end = if full.starts_with(&through) {
                through.len().min(body_end)
            } else {
                match strip_closing(&through) {
                    Some(cut) if cut >= before.len() && full.starts_with(&through[..cut]) => cut,
                    _ => {
                        return Err(not_incremental(
                            i,
                            "the text through the turn is not a prefix of the whole conversation",
                        ))
                    }
                }
            };
            let start = before.len();
            let trimmed = full.get(start..end.max(start)).unwrap_or("").trim_end();
            let end = start + trimmed.len();
            if end > start {
                spans.push(start..end);
            }
        }
        if spans.is_empty() {
            return Err(BadRow::new(
                BadRowKind::NothingToTrain,
                "",
                "the trained turns render to no text",
                "check the messages' content",
            ));
        }
        Ok(mk(full, spans))
    }

    /// Tokenize rendered text: ids, trained flags and (for previews) each token's byte range in the text.
    #[allow(clippy::type_complexity)]
    pub fn tokenize(
        &self,
        r: &Rendered,
    ) -> std::result::Result<(Sample, Vec<Option<Range<usize>>>), BadRow> {
        let enc = crate::tokenizer::encode_guarded(&self.tok.tokenizer, r.text.as_str(), false)
            .map_err(|e| {
                BadRow::new(
                    BadRowKind::TemplateError,
                    "",
                    format!("tokenizer failed: {e}"),
                    "check the text",
                )
            })?;
        let n = enc.get_ids().len() + r.prepend_bos as usize + r.append_eos as usize;
        let mut ids = Vec::with_capacity(n);
        let mut trained = Vec::with_capacity(n);
        let mut ranges = Vec::with_capacity(n);
        if r.prepend_bos {
            if let Some(b) = &self.tok.bos {
                ids.push(b.id);
                trained.push(false);
                ranges.push(None);
            }
        }
        let mut spans_without_end = 0u32;
        let mut span_idx = 0usize;
        let mut last_in_span: Vec<Option<usize>> = vec![None; r.spans.len()];
        for (&id, &(s, e)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            // Spans are sorted and disjoint and tokens are in text order: a token is trained when it overlaps
            // the first span that ends after its start (the rule transformers uses for assistant masks).
            while span_idx < r.spans.len() && s >= r.spans[span_idx].end {
                span_idx += 1;
            }
            let t = span_idx < r.spans.len() && e > r.spans[span_idx].start;
            if t {
                last_in_span[span_idx] = Some(ids.len());
            }
            ids.push(id);
            trained.push(t);
            ranges.push(Some(s..e));
        }
        if r.append_eos {
            if let Some(e) = &self.tok.eos {
                if let Some(last) = last_in_span.last_mut() {
                    *last = Some(ids.len());
                }
                ids.push(e.id);
                trained.push(true);
                ranges.push(None);
            }
        }
        let eot = &self.tok.end_of_turn_ids;
        for last in &last_in_span {
            match last {
                Some(i) if eot.contains(&ids[*i]) => {}
                _ => spans_without_end += 1,
            }
        }
        if r.chat {
            match self.train_on_eos {
                TrainOnEos::Turn => {}
                TrainOnEos::Last => {
                    let n = last_in_span.len();
                    for &i in last_in_span.iter().take(n.saturating_sub(1)).flatten() {
                        if eot.contains(&ids[i]) {
                            trained[i] = false;
                        }
                    }
                }
                TrainOnEos::All => {
                    for (t, id) in trained.iter_mut().zip(&ids) {
                        if eot.contains(id) {
                            *t = true;
                        }
                    }
                }
            }
        }
        Ok((
            Sample {
                ids,
                trained,
                spans_without_end,
            },
            ranges,
        ))
    }

    /// Render and tokenize.
    pub fn build(&self, ex: &Example) -> std::result::Result<Sample, BadRow> {
        let r = self.render(ex)?;
        Ok(self.tokenize(&r)?.0)
    }

    /// Render, tokenize and describe each token for a preview.
    pub fn preview(
        &self,
        ex: &Example,
    ) -> std::result::Result<(Rendered, Sample, Vec<PreviewToken>), BadRow> {
        let r = self.render(ex)?;
        let (s, ranges) = self.tokenize(&r)?;
        let mut out = Vec::with_capacity(s.ids.len());
        let mut cursor = 0usize;
        for (i, (&id, range)) in s.ids.iter().zip(&ranges).enumerate() {
            let piece = match range {
                Some(rg) if rg.end > cursor => {
                    let start = rg.start.max(cursor);
                    cursor = rg.end;
                    r.text.get(start..rg.end).unwrap_or("").to_string()
                }
                Some(_) => String::new(),
                None => self.tok.tokenizer.id_to_token(id).unwrap_or_default(),
            };
            out.push(PreviewToken {
                id,
                piece,
                trained: s.trained[i],
            });
        }
        Ok((r, s, out))
    }
}
