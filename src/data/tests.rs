//! Unit tests of the data path (fixture tokenizer: tests/fixtures/tokenizer).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;

pub(crate) fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The fixture byte-level BPE: `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2, `<pad>`=3.
pub(crate) fn fixture_tok(pad_id: u32) -> TextTokenizer {
    let path = fixture("tokenizer/tokenizer.json");
    let t = tokenizers::Tokenizer::from_file(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    TextTokenizer {
        tokenizer: Arc::new(t),
        bos: None,
        eos: Some(SpecialToken {
            text: "<|im_end|>".into(),
            id: 2,
        }),
        pad_id,
        add_bos: false,
        end_of_turn_ids: vec![2],
    }
}

/// SmolLM2's ChatML template written out in Rust (checked against transformers' renders below).
pub(crate) struct SmolChatMl;

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

impl ChatRenderer for SmolChatMl {
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> crate::Result<String> {
        let mut s = String::new();
        for (i, m) in messages.iter().enumerate() {
            if i == 0 && m.role != "system" {
                s.push_str(SMOL_SYSTEM);
            }
            s.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            s.push_str("<|im_start|>assistant\n");
        }
        Ok(s)
    }
    fn render_generation_spans(
        &self,
        _: &[Message],
    ) -> crate::Result<Option<(String, Vec<std::ops::Range<usize>>)>> {
        Ok(None)
    }
    fn fingerprint(&self) -> String {
        "test-smol-chatml".into()
    }
}

pub(crate) fn chat_builder(pad_id: u32) -> SampleBuilder {
    SampleBuilder {
        tok: fixture_tok(pad_id),
        template: Some(Arc::new(SmolChatMl)),
        train_on_inputs: false,
        train_on_eos: Default::default(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn chat_line(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
        .to_string()
}

/// `n` small chat records with varied lengths.
fn chat_jsonl(dir: &Path, name: &str, n: usize) -> PathBuf {
    let mut s = String::new();
    for i in 0..n {
        let words = "lorem ipsum dolor sit amet ".repeat(1 + i % 5);
        s.push_str(&chat_line(
            &format!("Question {i}?"),
            &format!("Answer {i}: {words}"),
        ));
        s.push('\n');
    }
    write(dir, name, &s)
}

fn decode(tok: &TextTokenizer, ids: &[u32]) -> String {
    tok.tokenizer.decode(ids, false).unwrap()
}

fn opts() -> DataOptions {
    DataOptions {
        sequence_len: 256,
        ..Default::default()
    }
}

fn pipeline(sources: Vec<DatasetSource>, o: DataOptions, cache: &Path) -> DataPipeline {
    DataPipeline::new(sources, vec![], o, chat_builder(3), cache).unwrap()
}

// ---------------------------------------------------------------- templates and masks

#[test]
fn hand_written_chatml_matches_transformers_render() {
    // tokenizer_reference.json holds transformers' apply_chat_template output for SmolLM2's template.
    let refj: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("tokenizer/tokenizer_reference.json")).unwrap(),
    )
    .unwrap();
    let chats = refj["chat"].as_array().unwrap();
    assert!(!chats.is_empty());
    let tok = fixture_tok(3);
    for c in chats {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let text = SmolChatMl.render(&msgs, gen).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap());
        let ids: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids(),
            &ids[..]
        );
    }
}

#[test]
fn chat_labels_are_assistant_content_plus_end_of_turn() {
    let b = chat_builder(3);
    let msgs = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "What is 2+2?"),
        Message::new("assistant", "4."),
        Message::new("user", "And 3+3?"),
        Message::new("assistant", "  6, of course.  "),
    ];
    let ex = Example::Chat {
        trained: msgs.iter().map(|m| m.role == "assistant").collect(),
        messages: msgs,
    };
    let s = b.build(&ex).unwrap();
    // Group the trained tokens into runs and decode each.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (id, &t) in s.ids.iter().zip(&s.trained) {
        if t {
            if !prev {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(*id);
        }
        prev = t;
    }
    let texts: Vec<String> = runs.iter().map(|r| decode(&b.tok, r)).collect();
    assert_eq!(
        texts,
        vec![
            "4.<|im_end|>".to_string(),
            "  6, of course.  <|im_end|>".to_string()
        ]
    );
    assert_eq!(s.spans_without_end, 0);
    // The whole sample decodes to the template text (nothing added or lost).
    assert_eq!(
        decode(&b.tok, &s.ids),
        SmolChatMl.render(ex_msgs(&ex), false).unwrap()
    );
}

fn ex_msgs(ex: &Example) -> &[Message] {
    match ex {
        Example::Chat { messages, .. } => messages,
        _ => unreachable!(),
    }
}

#[test]
fn response_text_also_in_prompt_is_masked_by_position() {
    // A response that also appears verbatim in the prompt: a string search would find the first occurrence.
    let b = chat_builder(3);
    let msgs = vec![
        Message::new("user", "Say yes."),
        Message::new("assistant", "yes."),
    ];
    let ex = Example::Chat {
        trained: vec![false, true],
        messages: msgs,
    };
    let (r, s, toks) = b.preview(&ex).unwrap();
    let trained_text: String = toks
        .iter()
        .filter(|t| t.trained)
        .map(|t| t.piece.clone())
        .collect();
    assert_eq!(trained_text, "yes.<|im_end|>");
    // The trained tokens are at the end (the assistant turn), not inside the user turn.
    let first_trained = s.trained.iter().position(|&t| t).unwrap();
    let prefix = decode(&b.tok, &s.ids[..first_trained]);
    assert!(prefix.ends_with("<|im_start|>assistant\n"), "{prefix:?}");
    assert!(r.text.ends_with("yes.<|im_end|>\n"));
}

#[test]
fn train_on_inputs_trains_everything() {
    let mut b = chat_builder(3);
    b.train_on_inputs = true;
    let ex = Example::Chat {
        messages: vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
        ],
        trained: vec![true, true],
    };
    let s = b.build(&ex).unwrap();
    assert!(s.trained.iter().all(|&t| t));
}

#[test]
fn non_incremental_template_is_an_error_not_a_silent_mask() {
    /// Renders earlier assistant turns differently once another message follows (like templates that strip
    /// reasoning from history).
    struct Rewriting;
    impl ChatRenderer for Rewriting {
        fn render(&self, m: &[Message], gen: bool) -> crate::Result<String> {
            let mut s = String::new();
            for (i, msg) in m.iter().enumerate() {
                let content = if msg.role == "assistant" && i + 1 < m.len() {
                    "…"
                } else {
                    msg.content.as_str()
                };
                s.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    msg.role, content
                ));
            }
            if gen {
                s.push_str("<|im_start|>assistant\n");
            }
            Ok(s)
        }
        fn render_generation_spans(
            &self,
            _: &[Message],
        ) -> crate::Result<Option<(String, Vec<std::ops::Range<usize>>)>> {
            Ok(None)
        }
        fn fingerprint(&self) -> String {
            "rewriting".into()
        }
    }
    let b = SampleBuilder {
        tok: fixture_tok(3),
        template: Some(Arc::new(Rewriting)),
        train_on_inputs: false,
        train_on_eos: Default::default(),
    };
    let msgs = vec![
        Message::new("user", "a"),
        Message::new("assistant", "b"),
        Message::new("user", "c"),
        Message::new("assistant", "d"),
    ];
    let err = b
        .build(&Example::Chat {
            trained: vec![false, true, false, true],
            messages: msgs,
        })
        .unwrap_err();
    assert_eq!(err.kind, BadRowKind::TemplateNotIncremental);
    assert!(err.fix.contains("generation"), "{err:?}");
}

#[test]
fn generation_spans_are_used_when_the_template_has_them() {
    /// ChatML whose generation blocks cover only the content (not the end token).
    struct Gen;
    impl ChatRenderer for Gen {
        fn render(&self, m: &[Message], gen: bool) -> crate::Result<String> {
            SmolChatMl.render(m, gen)
        }
        fn render_generation_spans(
            &self,
            m: &[Message],
        ) -> crate::Result<Option<(String, Vec<std::ops::Range<usize>>)>> {
            let text = SmolChatMl.render(m, false)?;
            let mut spans = Vec::new();
            let mut from = 0;
            for msg in m.iter().filter(|x| x.role == "assistant") {
                let head = "<|im_start|>assistant\n";
                let at = from + text[from..].find(head).unwrap() + head.len();
                spans.push(at..at + msg.content.len());
                from = at;
            }
            Ok(Some((text, spans)))
        }
        fn fingerprint(&self) -> String {
            "gen".into()
        }
    }
    let b = SampleBuilder {
        tok: fixture_tok(3),
        template: Some(Arc::new(Gen)),
        train_on_inputs: false,
        train_on_eos: Default::default(),
    };
    let s = b
        .build(&Example::Chat {
            messages: vec![
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello there"),
            ],
            trained: vec![false, true],
        })
        .unwrap();
    let ids: Vec<u32> = s
        .ids
        .iter()
        .zip(&s.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(decode(&b.tok, &ids), "Hello there");
    assert_eq!(
        s.spans_without_end, 1,
        "a trained span without an end-of-turn token is reported"
    );
}

// ---------------------------------------------------------------- BOS / EOS

fn tok_with_bos(add_bos: bool) -> TextTokenizer {
    let mut t = fixture_tok(3);
    // Use <|endoftext|> (id 0) as BOS for these tests.
    t.bos = Some(SpecialToken {
        text: "<|endoftext|>".into(),
        id: 0,
    });
    t.add_bos = add_bos;
    t
}

#[test]
fn no_double_bos_when_text_already_starts_with_bos() {
    let b = SampleBuilder {
        tok: tok_with_bos(true),
        template: None,
        train_on_inputs: false,
        train_on_eos: Default::default(),
    };
    let plain = b
        .build(&Example::Text {
            text: "hello world".into(),
        })
        .unwrap();
    assert_eq!(plain.ids[0], 0);
    assert_ne!(plain.ids[1], 0);
    let with = b
        .build(&Example::Text {
            text: "<|endoftext|>hello world".into(),
        })
        .unwrap();
    assert_eq!(
        with.ids, plain.ids,
        "BOS written in the text is not doubled"
    );
    assert_eq!(with.ids.iter().filter(|&&i| i == 0).count(), 1);
}

/// A template that writes BOS itself (as Llama 3 / Gemma / Mistral templates do).
struct BosTemplate;
impl ChatRenderer for BosTemplate {
    fn render(&self, m: &[Message], gen: bool) -> crate::Result<String> {
        let mut s = String::from("<|endoftext|>");
        for msg in m {
            s.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>",
                msg.role, msg.content
            ));
        }
        if gen {
            s.push_str("<|im_start|>assistant\n");
        }
        Ok(s)
    }
    fn render_generation_spans(
        &self,
        _: &[Message],
    ) -> crate::Result<Option<(String, Vec<std::ops::Range<usize>>)>> {
        Ok(None)
    }
    fn fingerprint(&self) -> String {
        "bos".into()
    }
}

#[test]
fn no_double_bos_from_a_template_that_writes_bos() {
    let b = SampleBuilder {
        tok: tok_with_bos(true),
        template: Some(Arc::new(BosTemplate)),
        train_on_inputs: false,
        train_on_eos: Default::default(),
    };
    let s = b
        .build(&Example::Chat {
            messages: vec![Message::new("user", "Hi"), Message::new("assistant", "Yo")],
            trained: vec![false, true],
        })
        .unwrap();
    assert_eq!(s.ids[0], 0);
    assert_eq!(s.ids.iter().filter(|&&i| i == 0).count(), 1, "{:?}", s.ids);
}

#[test]
fn completion_and_alpaca_append_a_trained_eos_and_mask_the_prompt() {
    let b = SampleBuilder {
        tok: tok_with_bos(true),
        template: None,
        train_on_inputs: false,
        train_on_eos: Default::default(),
    };
    let s = b
        .build(&Example::Completion {
            prompt: "Q: hi\nA:".into(),
            completion: " hello".into(),
        })
        .unwrap();
    assert_eq!(*s.ids.last().unwrap(), 2);
    assert!(*s.trained.last().unwrap());
    let ids: Vec<u32> = s
        .ids
        .iter()
        .zip(&s.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(decode(&b.tok, &ids), " hello<|im_end|>");
    assert_eq!(s.spans_without_end, 0);

    let a = b
        .build(&Example::Alpaca {
            style: crate::data::options::AlpacaStyle::Instruct,
            system: None,
            instruction: "Add 2 and 2.".into(),
            input: None,
            output: "4".into(),
        })
        .unwrap();
    let ids: Vec<u32> = a
        .ids
        .iter()
        .zip(&a.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(decode(&b.tok, &ids), "4<|im_end|>");
    let all = decode(&b.tok, &a.ids);
    assert!(
        all.starts_with("<|endoftext|>Below is an instruction that describes a task. Write"),
        "{all}"
    );
    assert!(
        all.contains("### Instruction:\nAdd 2 and 2.\n\n### Response:\n4<|im_end|>"),
        "{all}"
    );
}

#[test]
fn eos_keeps_its_label_when_pad_equals_eos() {
    // pad id = eos id = 2 (as SmolLM2's GGUF): padding must be masked by position, not by id.
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "d.jsonl",
        &format!(
            "{}\n{}\n",
            chat_line("Hi", "Hello"),
            chat_line("A longer question here?", "Sure, a longer answer.")
        ),
    );
    let o = DataOptions {
        micro_batch_size: 2,
        shuffle: false,
        ..opts()
    };
    let p = DataPipeline::new(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        vec![],
        o,
        chat_builder(2),
        dir.path().join("cache"),
    )
    .unwrap();
    let batch = p.train_loader(None).unwrap().next().unwrap().unwrap();
    let tb = &batch.tokens;
    assert_eq!(tb.batch, 2);
    let mut eos_labels = 0;
    let mut pad_positions = 0;
    for i in 0..tb.batch * tb.seq {
        if !tb.attention_mask[i] {
            pad_positions += 1;
            assert_eq!(tb.input_ids[i], 2, "padding uses pad id 2 (= eos)");
            assert_eq!(batch.labels[i], IGNORE_INDEX);
        } else if tb.input_ids[i] == 2 && batch.labels[i] == 2 {
            eos_labels += 1;
        }
    }
    assert!(pad_positions > 0, "the shorter row is padded");
    assert_eq!(
        eos_labels, 2,
        "the end-of-turn token of each assistant turn is a label"
    );
    // In each row, the last real token is the trailing "\n" after <|im_end|> (not trained); the EOS before it is.
    for r in 0..2 {
        let row = &batch.labels[r * tb.seq..(r + 1) * tb.seq];
        let mask = &tb.attention_mask[r * tb.seq..(r + 1) * tb.seq];
        let last_real = mask.iter().rposition(|&m| m).unwrap();
        assert_eq!(row[last_real], IGNORE_INDEX);
        assert_eq!(row[last_real - 1], 2);
    }
}

// ---------------------------------------------------------------- readers and bad rows

#[test]
fn jsonl_reader_numbers_lines_and_reports_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.jsonl",
        "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n{not json}\n{\"text\": \"c\"}",
    );
    let files =
        source::resolve(&DatasetSource::new(f.to_string_lossy(), DataFormat::Text)).unwrap();
    let mut seen = Vec::new();
    source::read_records(&files[0], None, None, 16, &mut |r| {
        seen.push((r.loc, r.value.is_ok()));
        Ok(true)
    })
    .unwrap();
    use source::RowLoc::Line;
    assert_eq!(
        seen,
        vec![
            (Line(1), true),
            (Line(3), true),
            (Line(4), false),
            (Line(5), true)
        ]
    );
}

#[test]
fn json_array_is_streamed_with_record_numbers_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.json",
        "[{\"text\": \"a\"},\n {\"text\": \"b\"},\n {\"text\": \"c\"}]",
    );
    let files =
        source::resolve(&DatasetSource::new(f.to_string_lossy(), DataFormat::Text)).unwrap();
    let mut got = Vec::new();
    source::read_records(&files[0], Some(2), None, 16, &mut |r| {
        got.push((
            r.loc,
            r.value.unwrap()["text"].as_str().unwrap().to_string(),
        ));
        Ok(true)
    })
    .unwrap();
    assert_eq!(
        got,
        vec![
            (source::RowLoc::Record(1), "a".to_string()),
            (source::RowLoc::Record(2), "b".to_string())
        ]
    );
    let bad = write(dir.path(), "b.json", "[{\"text\": \"a\"},\n {\"text\": }]");
    let files =
        source::resolve(&DatasetSource::new(bad.to_string_lossy(), DataFormat::Text)).unwrap();
    let err = source::read_records(&files[0], None, None, 16, &mut |_| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("b.json") && err.contains("line 2"), "{err}");
}

#[test]
fn csv_and_parquet_are_read_with_their_locations() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        dir.path(),
        "a.csv",
        "\u{feff}instruction,input,output\n\"Say hi,\npolitely\",,Hello!\nAdd,\"1, 2\",3\n",
    );
    let files = source::resolve(&DatasetSource::new(
        csv.to_string_lossy(),
        DataFormat::Alpaca,
    ))
    .unwrap();
    let mut rows = Vec::new();
    source::read_records(&files[0], None, None, 1, &mut |r| {
        rows.push((r.loc, r.value.unwrap()));
        Ok(true)
    })
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, source::RowLoc::Line(2));
    assert_eq!(
        rows[1].0,
        source::RowLoc::Line(4),
        "the quoted line break counts"
    );
    assert_eq!(rows[0].1["instruction"], "Say hi,\npolitely");
    assert_eq!(rows[0].1["input"], serde_json::Value::Null);
    assert_eq!(rows[1].1["output"], "3", "CSV values stay strings");

    // Parquet with a chat column: list<struct<role, content>>.
    let roles = Series::new("role".into(), ["user", "assistant"]);
    let contents = Series::new("content".into(), ["Hi", "Hello"]);
    let msgs = StructChunked::from_series("m".into(), 2, [roles, contents].iter())
        .unwrap()
        .into_series();
    let list = msgs
        .implode()
        .unwrap()
        .into_series()
        .with_name("messages".into());
    let mut df = DataFrame::new_infer_height(vec![list.into()]).unwrap();
    let pq = dir.path().join("c.parquet");
    ParquetWriter::new(std::fs::File::create(&pq).unwrap())
        .finish(&mut df)
        .unwrap();
    let src = DatasetSource::new(pq.to_string_lossy(), DataFormat::Chat);
    let files = source::resolve(&src).unwrap();
    let parser = RowParser::new(&src).unwrap();
    let mut ex = Vec::new();
    source::read_records(&files[0], None, parser.columns().as_deref(), 8, &mut |r| {
        ex.push(parser.parse(&r.value.unwrap(), false).unwrap());
        Ok(true)
    })
    .unwrap();
    assert_eq!(
        ex,
        vec![Example::Chat {
            messages: vec![
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello")
            ],
            trained: vec![false, true]
        }]
    );
}

#[test]
fn ragged_and_non_utf8_csv_rows_are_bad_rows_at_their_line() {
    // Both used to abort the whole file with no line number, and skip_bad_rows did not apply.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"instruction,output\nSay hi,Hello\nToo,many,fields\nOne field only\n".to_vec();
    bytes.extend_from_slice(b"Caf\xe9,latin-1 bytes\nAdd,3\n");
    let csv = dir.path().join("r.csv");
    std::fs::write(&csv, &bytes).unwrap();
    let src = DatasetSource::new(csv.to_string_lossy(), DataFormat::Alpaca);
    let files = source::resolve(&src).unwrap();
    let mut got = Vec::new();
    source::read_records(&files[0], None, None, 16, &mut |r| {
        got.push((r.loc, r.value.map_err(|b| b.message(&csv, r.loc))));
        Ok(true)
    })
    .unwrap();
    assert_eq!(got.len(), 5, "{got:?}");
    use source::RowLoc::Line;
    assert_eq!((got[0].0, got[4].0), (Line(2), Line(6)));
    assert!(got[0].1.is_ok() && got[4].1.is_ok());
    let e = got[1].1.as_ref().unwrap_err();
    assert!(
        e.contains("r.csv line 3") && e.contains("3 fields but the header has 2"),
        "{e}"
    );
    let e = got[2].1.as_ref().unwrap_err();
    assert!(e.contains("line 4") && e.contains("1 fields"), "{e}");
    let e = got[3].1.as_ref().unwrap_err();
    assert!(
        e.contains("line 5") && e.contains("`instruction`") && e.contains("UTF-8"),
        "{e}"
    );
    assert!(
        e.contains("skip_bad_rows: true"),
        "the hint names the real key: {e}"
    );

    // Through the pipeline: skipped and counted with skip_bad_rows, an error naming the line without.
    let o = DataOptions {
        on_bad_row: OnBadRow::Skip,
        ..opts()
    };
    let p = pipeline(vec![src.clone()], o, &dir.path().join("c"));
    let c = p.stats().unwrap().train_counts;
    assert_eq!((c.records, c.samples), (5, 2));
    assert_eq!(c.skipped.values().sum::<u64>(), 3);
    assert!(
        c.skip_examples[0].contains("r.csv line 3"),
        "{:?}",
        c.skip_examples
    );
    let p = pipeline(vec![src], opts(), &dir.path().join("c2"));
    let e = p.stats().unwrap_err().to_string();
    assert!(e.contains("r.csv line 3"), "{e}");
}

#[test]
fn null_content_and_null_required_fields_are_bad_rows_naming_the_field() {
    // `"content": null` used to render silently as an empty turn.
    let p = RowParser::new(&DatasetSource::new("x", DataFormat::Chat)).unwrap();
    let v = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}]});
    let e = p.parse(&v, false).unwrap_err();
    assert_eq!(
        (e.kind, e.field.as_str(), e.problem.as_str()),
        (BadRowKind::MissingField, "messages[1].content", "is null")
    );
    // An OpenAI tool call keeps its null content.
    let v = serde_json::json!({"messages": [{"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]}]});
    assert!(p.parse(&v, false).is_ok());
    // A null required field of a flat format.
    let p = RowParser::new(&DatasetSource::new("x", DataFormat::Alpaca)).unwrap();
    let e = p
        .parse(
            &serde_json::json!({"instruction": "Say hi", "output": null}),
            false,
        )
        .unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.problem.as_str()),
        ("output", "is null")
    );
}

#[test]
fn cache_build_folders_of_dead_processes_are_removed_by_the_next_build() {
    // A build killed mid-way leaves `<key>.tmp-<pid>-<n>/`; the next build removes those of dead processes and
    // leaves a live process's build alone (the cache folder is shared between runs).
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "c.jsonl", 4);
    let cache = dir.path().join("cache");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = cache.join(format!("0123abcd.tmp-{dead}-0"));
    let live = cache.join("0123abcd.tmp-1-0");
    for d in [&stale, &live] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("ids.bin"), [0u8; 64]).unwrap();
    }
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        opts(),
        &cache,
    );
    assert_eq!(p.stats().unwrap().train_counts.samples, 4);
    assert!(!stale.exists(), "the dead build's folder is still there");
    assert!(live.exists(), "a live process's build folder was removed");
}

#[test]
fn sharegpt_records_and_role_mapping() {
    let mut src = DatasetSource::new("x", DataFormat::Chat);
    let p = RowParser::new(&src).unwrap();
    let v = serde_json::json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]});
    assert_eq!(
        p.parse(&v, false).unwrap(),
        Example::Chat {
            messages: vec![Message::new("user", "Hi"), Message::new("assistant", "Yo")],
            trained: vec![false, true]
        }
    );
    let v = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]});
    let e = p.parse(&v, false).unwrap_err();
    assert_eq!(e.kind, BadRowKind::UnknownRole);
    assert_eq!(e.field, "messages[1].role");
    assert!(e.fix.contains("roles: {assistant: [bot]}"), "{e:?}");
    src.roles.insert("assistant".into(), vec!["bot".into()]);
    let p = RowParser::new(&src).unwrap();
    assert!(p.parse(&v, false).is_ok());
}

#[test]
fn bad_rows_error_with_file_line_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "bad.jsonl",
        &format!(
            "{}\n{}\n{}\n",
            chat_line("ok", "fine"),
            r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}"#,
            chat_line("ok", "fine")
        ),
    );
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        opts(),
        &dir.path().join("c"),
    );
    let err = p.prepared().unwrap_err().to_string();
    assert!(err.contains("bad.jsonl line 2"), "{err}");
    assert!(err.contains("messages[0].content"), "{err}");
    assert!(err.contains("expected a string, found a number"), "{err}");
    assert!(err.contains("skip_bad_rows: true"), "{err}");
}

#[test]
fn skipped_bad_rows_are_counted_per_reason() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        chat_line("ok", "fine"),
        r#"{"messages": [{"role": "user", "content": 5}]}"#.to_string(),
        r#"{"messages": [{"role": "alien", "content": "x"}]}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": "no answer"}]}"#.to_string(),
        r#"{"text": "no messages"}"#.to_string(),
        "not json".to_string(),
        r#"{"messages": [{"role": "user", "content": "x"}, {"role": "alien", "content": "y"}]}"#
            .to_string(),
        chat_line("ok again", "fine again"),
    ];
    let f = write(dir.path(), "mixed.jsonl", &(lines.join("\n") + "\n"));
    let o = DataOptions {
        on_bad_row: OnBadRow::Skip,
        ..opts()
    };
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        o,
        &dir.path().join("c"),
    );
    let st = p.stats().unwrap();
    let c = &st.train_counts;
    assert_eq!(c.records, 8);
    assert_eq!(c.samples, 2);
    let expect: std::collections::BTreeMap<String, u64> = [
        ("wrong_type", 1),
        ("unknown_role", 2),
        ("nothing_to_train", 1),
        ("missing_field", 1),
        ("invalid_json", 1),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), *v))
    .collect();
    assert_eq!(c.skipped, expect);
    assert!(
        c.skip_examples[0].contains("mixed.jsonl line 2"),
        "{:?}",
        c.skip_examples
    );
    let shown = st.to_string();
    assert!(shown.contains("bad records skipped   6"), "{shown}");
}

#[test]
fn long_samples_are_dropped_or_truncated_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(200);
    let f = write(
        dir.path(),
        "l.jsonl",
        &format!(
            "{}\n{}\n{}\n",
            chat_line("short", "ok"),
            chat_line("q", &long),
            chat_line(&long, "ok")
        ),
    );
    let src = vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)];
    let short = chat_builder(3)
        .build(
            &RowParser::new(&src[0])
                .unwrap()
                .parse(
                    &serde_json::from_str(&chat_line("short", "ok")).unwrap(),
                    false,
                )
                .unwrap(),
        )
        .unwrap()
        .ids
        .len();
    let cap = short + 8;
    let o = DataOptions {
        sequence_len: cap,
        ..opts()
    };
    let p = pipeline(src.clone(), o.clone(), &dir.path().join("c"));
    let c = p.stats().unwrap().train_counts;
    assert_eq!((c.samples, c.dropped_too_long, c.truncated), (1, 2, 0));

    let o = DataOptions {
        truncation: Truncation::Truncate,
        ..o
    };
    let p = pipeline(src, o, &dir.path().join("c"));
    let c = p.stats().unwrap().train_counts;
    // The long answer is cut (still has labels); the long prompt leaves no label after the cut → dropped.
    assert_eq!(
        (
            c.samples,
            c.dropped_too_long,
            c.truncated,
            c.dropped_no_labels
        ),
        (2, 0, 1, 1)
    );
    let prep = p.prepared().unwrap();
    for i in 0..prep.train_cache.len() {
        assert!(prep.train_cache.sample_len(i) <= cap);
    }
}

// ---------------------------------------------------------------- order, split, packing, resume

#[test]
fn same_seed_same_order_other_seed_other_order() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 50);
    let src = vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)];
    let order = |seed: u64, epoch: u64| {
        let p = pipeline(
            src.clone(),
            DataOptions { seed, ..opts() },
            &dir.path().join("c"),
        );
        p.prepared().unwrap().epoch_samples(epoch)
    };
    let a = order(7, 0);
    assert_eq!(a, order(7, 0));
    assert_ne!(a, order(8, 0));
    assert_ne!(a, order(7, 1));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..50).collect::<Vec<u32>>(),
        "an epoch is a permutation of the samples"
    );
}

#[test]
fn val_split_is_disjoint_seeded_and_sized() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 40);
    let src = vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)];
    let split = |v: f64, seed: u64| {
        let p = pipeline(
            src.clone(),
            DataOptions {
                val_set_size: v,
                seed,
                ..opts()
            },
            &dir.path().join("c"),
        );
        let pr = p.prepared().unwrap();
        (pr.train_ids.clone(), pr.eval_ids.clone())
    };
    let (t, v) = split(0.1, 1);
    assert_eq!(v.len(), 4);
    assert_eq!(t.len(), 36);
    assert!(v.iter().all(|x| !t.contains(x)));
    assert_eq!(split(0.1, 1), (t.clone(), v.clone()));
    assert_ne!(split(0.1, 2).1, v);
    assert_eq!(split(0.01, 1).1.len(), 1, "a fraction is rounded up");
    assert_eq!(split(5.0, 1).1.len(), 5);
    let p = pipeline(
        src,
        DataOptions {
            val_set_size: 40.0,
            ..opts()
        },
        &dir.path().join("c"),
    );
    assert!(p
        .prepared()
        .unwrap_err()
        .to_string()
        .contains("leaving none to train on"));
}

#[allow(clippy::type_complexity)]
fn batch_key(
    b: &Batch,
) -> (
    Vec<u32>,
    Vec<u32>,
    Vec<bool>,
    Option<Vec<u32>>,
    Vec<i64>,
    u64,
    u64,
) {
    (
        b.tokens.input_ids.clone(),
        b.tokens.position_ids.clone(),
        b.tokens.attention_mask.clone(),
        b.tokens.segment_ids.clone(),
        b.labels.clone(),
        b.epoch,
        b.index,
    )
}

#[test]
fn save_and_restore_resume_at_the_same_batch_across_epochs() {
    for packing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let f = chat_jsonl(dir.path(), "d.jsonl", 30);
        let o = DataOptions {
            sample_packing: packing,
            micro_batch_size: 2,
            sequence_len: 128,
            ..opts()
        };
        let p = pipeline(
            vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
            o,
            &dir.path().join("c"),
        );
        let per_epoch = p.batches_in_epoch(0).unwrap();
        let total = 2 * per_epoch + 3;
        let reference: Vec<_> = p
            .train_loader(None)
            .unwrap()
            .take(total)
            .map(|b| batch_key(&b.unwrap()))
            .collect();
        for cut in [1, per_epoch - 1, per_epoch, per_epoch + 2] {
            let mut l = p.train_loader(None).unwrap();
            for _ in 0..cut {
                l.next().unwrap().unwrap();
            }
            let saved = serde_json::to_string(&l.state()).unwrap();
            drop(l);
            let state: LoaderState = serde_json::from_str(&saved).unwrap();
            // A fresh pipeline (as after a restart, here on a copy of the data at another path with another
            // modification time, so the cache is rebuilt) resumes at the same batch.
            let moved = dir.path().join(format!("moved-{cut}.jsonl"));
            std::fs::copy(&f, &moved).unwrap();
            let p2 = pipeline(
                vec![DatasetSource::new(
                    moved.to_string_lossy(),
                    DataFormat::Chat,
                )],
                p.options().clone(),
                &dir.path().join("c"),
            );
            let resumed: Vec<_> = p2
                .train_loader(Some(&state))
                .unwrap()
                .take(total - cut)
                .map(|b| batch_key(&b.unwrap()))
                .collect();
            assert_eq!(resumed, reference[cut..], "packing={packing} cut={cut}");
        }
        // A state from other options is refused.
        let mut state = p.train_loader(None).unwrap().state();
        state.fingerprint = "other".into();
        assert!(p.train_loader(Some(&state)).is_err());
    }
}

#[test]
fn packing_restarts_positions_separates_segments_and_masks_first_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 40);
    let o = DataOptions {
        sample_packing: true,
        micro_batch_size: 3,
        sequence_len: 512,
        ..opts()
    };
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        o,
        &dir.path().join("c"),
    );
    let prep = p.prepared().unwrap();
    let cache = &prep.train_cache;
    let plan = prep.epoch_plan(0);
    let mut seen: Vec<u32> = plan.samples.clone();
    seen.sort();
    assert_eq!(
        seen,
        (0..40).collect::<Vec<u32>>(),
        "every sample exactly once"
    );
    assert!(plan.rows() < 40, "samples share rows");
    let mut multi = 0;
    for b in 0..plan.batches() {
        let rows = plan.batch_rows(b);
        let batch = prep.make_batch(cache, &rows, 0, b as u64).unwrap();
        let tb = &batch.tokens;
        let seg = tb.segment_ids.as_ref().unwrap();
        for (r, row) in rows.iter().enumerate() {
            let total: usize = row.iter().map(|&s| cache.sample_len(s as usize)).sum();
            assert!(total <= 512);
            multi += (row.len() > 1) as usize;
            let mut at = r * tb.seq;
            for (k, &s) in row.iter().enumerate() {
                let mut ids = Vec::new();
                let mut tr = Vec::new();
                cache.read_sample(s as usize, &mut ids, &mut tr).unwrap();
                for (i, &id) in ids.iter().enumerate() {
                    assert_eq!(tb.input_ids[at + i], id);
                    assert_eq!(
                        tb.position_ids[at + i],
                        i as u32,
                        "positions restart per sample"
                    );
                    assert_eq!(seg[at + i], k as u32 + 1);
                    let want = if i > 0 && tr[i] {
                        id as i64
                    } else {
                        IGNORE_INDEX
                    };
                    assert_eq!(batch.labels[at + i], want);
                }
                assert_eq!(
                    batch.labels[at], IGNORE_INDEX,
                    "first token of each sample is never a label"
                );
                at += ids.len();
            }
            for i in at..(r + 1) * tb.seq {
                assert!(!tb.attention_mask[i]);
                assert_eq!(batch.labels[i], IGNORE_INDEX);
            }
        }
        assert_eq!(
            batch.trained_tokens,
            batch.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
        );
    }
    assert!(multi > 0);
}

#[test]
fn unpacked_batches_are_padded_rows_of_one_sample() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 20);
    let o = DataOptions {
        micro_batch_size: 4,
        ..opts()
    };
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        o,
        &dir.path().join("c"),
    );
    let batches: Vec<Batch> = p
        .train_loader(None)
        .unwrap()
        .take(5)
        .map(|b| b.unwrap())
        .collect();
    let mut samples = 0;
    for b in &batches {
        assert!(b.tokens.segment_ids.is_none());
        assert_eq!(b.tokens.batch, b.samples);
        samples += b.samples;
        for r in 0..b.tokens.batch {
            let pos = &b.tokens.position_ids[r * b.tokens.seq..(r + 1) * b.tokens.seq];
            let mask = &b.tokens.attention_mask[r * b.tokens.seq..(r + 1) * b.tokens.seq];
            let n = mask.iter().filter(|&&m| m).count();
            assert!(mask[..n].iter().all(|&m| m), "right padding");
            assert_eq!(&pos[..n], &(0..n as u32).collect::<Vec<_>>()[..]);
        }
    }
    assert_eq!(samples, 20);
}

#[test]
fn weights_repeat_or_subsample_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let a = chat_jsonl(dir.path(), "a.jsonl", 10);
    let b = chat_jsonl(dir.path(), "b.jsonl", 20);
    let mut sa = DatasetSource::new(a.to_string_lossy(), DataFormat::Chat);
    sa.weight = Some(2.0);
    let mut sb = DatasetSource::new(b.to_string_lossy(), DataFormat::Chat);
    sb.weight = Some(0.5);
    sb.limit = Some(16);
    let p = pipeline(vec![sa, sb], opts(), &dir.path().join("c"));
    let prep = p.prepared().unwrap();
    assert_eq!(
        prep.train_cache.len(),
        26,
        "limit reads the first 16 records of b"
    );
    let e0 = prep.epoch_samples(0);
    let from_a = e0
        .iter()
        .filter(|&&s| prep.train_cache.sample_source(s as usize) == 0)
        .count();
    let from_b = e0
        .iter()
        .filter(|&&s| prep.train_cache.sample_source(s as usize) == 1)
        .count();
    assert_eq!((from_a, from_b), (20, 8));
    assert_ne!(e0, prep.epoch_samples(1));
}

#[test]
fn cache_is_reused_and_keyed_by_tokenization_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 10);
    let src = vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)];
    let cache = dir.path().join("c");
    let d1 = pipeline(src.clone(), opts(), &cache)
        .prepared()
        .unwrap()
        .train_cache
        .dir
        .clone();
    let stamp = std::fs::metadata(d1.join("meta.json"))
        .unwrap()
        .modified()
        .unwrap();
    // Order options reuse the cache.
    let o2 = DataOptions {
        seed: 99,
        sample_packing: true,
        micro_batch_size: 3,
        ..opts()
    };
    let d2 = pipeline(src.clone(), o2, &cache)
        .prepared()
        .unwrap()
        .train_cache
        .dir
        .clone();
    assert_eq!(d1, d2);
    assert_eq!(
        std::fs::metadata(d2.join("meta.json"))
            .unwrap()
            .modified()
            .unwrap(),
        stamp
    );
    // Tokenization options make a new cache.
    let o3 = DataOptions {
        sequence_len: 1000,
        ..opts()
    };
    let d3 = pipeline(src.clone(), o3, &cache)
        .prepared()
        .unwrap()
        .train_cache
        .dir
        .clone();
    assert_ne!(d1, d3);
    // A changed file makes a new cache.
    std::thread::sleep(std::time::Duration::from_millis(20));
    chat_jsonl(dir.path(), "d.jsonl", 11);
    let d4 = pipeline(src, opts(), &cache).prepared().unwrap();
    assert_ne!(d4.train_cache.dir, d1);
    assert_eq!(d4.train_cache.len(), 11);
    // No temporary folders are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn preview_marks_trained_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "d.jsonl",
        &format!("{}\n{{\"messages\": 3}}\n", chat_line("Hi", "Hello")),
    );
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        opts(),
        &dir.path().join("c"),
    );
    let items = p.preview(5).unwrap();
    assert_eq!(items.len(), 2);
    let text = items[0].marked_text(false);
    assert_eq!(
        text,
        format!("{SMOL_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello<|im_end|>⟧\n")
    );
    assert!(items[1].error.as_ref().unwrap().contains("d.jsonl line 2"));
}

#[test]
fn eval_batches_come_from_the_split_in_data_order() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 20);
    let o = DataOptions {
        val_set_size: 0.25,
        micro_batch_size: 2,
        ..opts()
    };
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        o,
        &dir.path().join("c"),
    );
    let eval: Vec<Batch> = p.eval_batches().unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(eval.iter().map(|b| b.samples).sum::<usize>(), 5);
    let again: Vec<Batch> = p.eval_batches().unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(
        eval.iter().map(batch_key).collect::<Vec<_>>(),
        again.iter().map(batch_key).collect::<Vec<_>>()
    );
    let train_samples: usize = p
        .train_loader(None)
        .unwrap()
        .take(8)
        .map(|b| b.unwrap().samples)
        .sum();
    assert_eq!(train_samples, 15);
    // `eval_batch_size` sets the evaluation batch rows (5 samples: 3 + 2), the samples unchanged.
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        DataOptions {
            val_set_size: 0.25,
            micro_batch_size: 2,
            eval_batch_size: Some(3),
            ..opts()
        },
        &dir.path().join("c"),
    );
    let sizes: Vec<usize> = p
        .eval_batches()
        .unwrap()
        .map(|b| b.unwrap().samples)
        .collect();
    assert_eq!(sizes, vec![3, 2]);
}

#[test]
fn packed_text_samples_never_predict_across_the_boundary() {
    // Raw text trains every token, so without the first-token rule the last position of one packed sample
    // would be trained to predict the first token of the next.
    let dir = tempfile::tempdir().unwrap();
    let mut s = String::new();
    for i in 0..30 {
        s.push_str(&serde_json::json!({"text": format!("sample {i} says hello")}).to_string());
        s.push('\n');
    }
    let f = write(dir.path(), "t.jsonl", &s);
    let o = DataOptions {
        sample_packing: true,
        micro_batch_size: 2,
        sequence_len: 64,
        ..opts()
    };
    let p = pipeline(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Text)],
        o,
        &dir.path().join("c"),
    );
    let prep = p.prepared().unwrap();
    let mut boundaries = 0;
    for b in p
        .train_loader(None)
        .unwrap()
        .take(prep.epoch_plan(0).batches())
    {
        let b = b.unwrap();
        let seg = b.tokens.segment_ids.clone().unwrap();
        let targets = crate::data::tests::shift(&b.labels, b.tokens.batch, b.tokens.seq);
        for r in 0..b.tokens.batch {
            for i in 0..b.tokens.seq - 1 {
                let (a, c) = (r * b.tokens.seq + i, r * b.tokens.seq + i + 1);
                if seg[a] != seg[c] {
                    boundaries += 1;
                    assert_eq!(
                        targets[a], IGNORE_INDEX,
                        "position {i} of row {r} predicts across a sample boundary"
                    );
                } else if b.tokens.attention_mask[c] {
                    assert_ne!(
                        targets[a], IGNORE_INDEX,
                        "text samples train every next token"
                    );
                }
            }
        }
    }
    assert!(boundaries > 10);
}

/// Next-token targets as the loss uses them (`labels[i+1]` per row; last position ignored).
pub(crate) fn shift(labels: &[i64], batch: usize, seq: usize) -> Vec<i64> {
    let mut t = vec![IGNORE_INDEX; batch * seq];
    for r in 0..batch {
        for i in 0..seq.saturating_sub(1) {
            t[r * seq + i] = labels[r * seq + i + 1];
        }
    }
    t
}

#[test]
fn separate_eval_datasets_are_prepared_and_batched() {
    let dir = tempfile::tempdir().unwrap();
    let tr = chat_jsonl(dir.path(), "train.jsonl", 12);
    let ev = chat_jsonl(dir.path(), "eval.jsonl", 5);
    let o = DataOptions {
        micro_batch_size: 2,
        ..opts()
    };
    let p = DataPipeline::new(
        vec![DatasetSource::new(tr.to_string_lossy(), DataFormat::Chat)],
        vec![DatasetSource::new(ev.to_string_lossy(), DataFormat::Chat)],
        o.clone(),
        chat_builder(3),
        dir.path().join("c"),
    )
    .unwrap();
    let eval: Vec<Batch> = p.eval_batches().unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(eval.len(), 3);
    assert_eq!(eval.iter().map(|b| b.samples).sum::<usize>(), 5);
    let st = p.stats().unwrap();
    assert_eq!((st.train_samples, st.eval_samples), (12, 5));
    assert_eq!(st.eval_counts.unwrap().records, 5);
    // Both a split and eval datasets is refused.
    let err = DataPipeline::new(
        vec![DatasetSource::new(tr.to_string_lossy(), DataFormat::Chat)],
        vec![DatasetSource::new(ev.to_string_lossy(), DataFormat::Chat)],
        DataOptions {
            val_set_size: 0.1,
            ..o
        },
        chat_builder(3),
        dir.path().join("c"),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("val_set_size"));
}

#[test]
fn missing_files_and_bad_options_fail_before_preparation() {
    let dir = tempfile::tempdir().unwrap();
    let e = |src: DatasetSource, o: DataOptions| {
        DataPipeline::new(vec![src], vec![], o, chat_builder(3), dir.path().join("c"))
            .err()
            .unwrap()
            .to_string()
    };
    let msg = e(
        DatasetSource::new("nope/missing.jsonl", DataFormat::Chat),
        opts(),
    );
    assert!(
        msg.contains("nope/missing.jsonl") && msg.contains("no such file"),
        "{msg}"
    );
    let msg = e(DatasetSource::new("nope/*.jsonl", DataFormat::Chat), opts());
    assert!(msg.contains("matches no files"), "{msg}");
    let f = chat_jsonl(dir.path(), "d.jsonl", 3);
    let msg = e(
        DatasetSource::new(f.to_string_lossy(), DataFormat::Chat),
        DataOptions {
            val_set_size: 2.5,
            ..opts()
        },
    );
    assert!(msg.contains("whole number"), "{msg}");
    let mut src = DatasetSource::new(f.to_string_lossy(), DataFormat::Chat);
    src.roles_to_train = Some(vec!["assitant".into()]);
    let msg = e(src, opts());
    assert!(
        msg.contains("roles_to_train") && msg.contains("assitant"),
        "{msg}"
    );
    let txt = write(dir.path(), "d.txt", "hello");
    let msg = e(
        DatasetSource::new(txt.to_string_lossy(), DataFormat::Text),
        opts(),
    );
    assert!(
        msg.contains("unsupported file extension") && msg.contains("ds_type"),
        "{msg}"
    );
    // A chat dataset without any template.
    let b = SampleBuilder {
        template: None,
        ..chat_builder(3)
    };
    let msg = DataPipeline::new(
        vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)],
        vec![],
        opts(),
        b,
        dir.path().join("c"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(msg.contains("chat_template"), "{msg}");
}

#[test]
fn globs_and_folders_resolve_sorted() {
    let dir = tempfile::tempdir().unwrap();
    chat_jsonl(dir.path(), "b.jsonl", 2);
    chat_jsonl(dir.path(), "a.jsonl", 3);
    write(dir.path(), "notes.md", "x");
    let by_glob = source::resolve(&DatasetSource::new(
        format!("{}/*.jsonl", dir.path().display()),
        DataFormat::Chat,
    ))
    .unwrap();
    let names: Vec<String> = by_glob
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["a.jsonl", "b.jsonl"]);
    let by_dir = source::resolve(&DatasetSource::new(
        dir.path().to_string_lossy(),
        DataFormat::Chat,
    ))
    .unwrap();
    assert_eq!(by_dir, by_glob);
    let p = pipeline(
        vec![DatasetSource::new(
            dir.path().to_string_lossy(),
            DataFormat::Chat,
        )],
        opts(),
        &dir.path().join("c"),
    );
    assert_eq!(p.prepared().unwrap().train_cache.len(), 5);
}

/// Decoded runs of trained tokens.
fn trained_runs(b: &SampleBuilder, s: &render::Sample) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (id, &t) in s.ids.iter().zip(&s.trained) {
        if t {
            if !prev {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(*id);
        }
        prev = t;
    }
    runs.iter().map(|r| decode(&b.tok, r)).collect()
}

#[test]
fn train_on_eos_turn_last_all() {
    let msgs = vec![
        Message::new("user", "Q1"),
        Message::new("assistant", "A1"),
        Message::new("user", "Q2"),
        Message::new("assistant", "A2"),
    ];
    let ex = Example::Chat {
        trained: vec![false, true, false, true],
        messages: msgs,
    };
    let mut b = chat_builder(3);
    let runs = |b: &SampleBuilder| trained_runs(b, &b.build(&ex).unwrap());
    assert_eq!(runs(&b), vec!["A1<|im_end|>", "A2<|im_end|>"]);
    b.train_on_eos = TrainOnEos::Last;
    assert_eq!(runs(&b), vec!["A1", "A2<|im_end|>"]);
    b.train_on_eos = TrainOnEos::All;
    // The default system turn and both user turns end with <|im_end|> too.
    assert_eq!(
        runs(&b),
        vec![
            "<|im_end|>",
            "<|im_end|>",
            "A1<|im_end|>",
            "<|im_end|>",
            "A2<|im_end|>"
        ]
    );
}

#[test]
fn drop_system_message_and_per_dataset_template() {
    let dir = tempfile::tempdir().unwrap();
    let rec = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]})
    .to_string();
    let f = write(dir.path(), "d.jsonl", &format!("{rec}\n"));
    let mut plain = DatasetSource::new(f.to_string_lossy(), DataFormat::Chat);
    let mut dropped = plain.clone();
    dropped.drop_system_message = true;
    let mut own = plain.clone();
    own.chat_template =
        Some("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}".into());
    plain.limit = Some(1);
    let texts: Vec<String> =
        report::preview_sources(&[plain, dropped, own], &chat_builder(3), &opts(), 3)
            .unwrap()
            .iter()
            .map(|it| it.marked_text(false))
            .collect();
    assert_eq!(
        texts[0],
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello<|im_end|>⟧\n"
    );
    // Without its system message the SmolLM2 template inserts its default one.
    assert!(
        texts[1].starts_with(SMOL_SYSTEM) && !texts[1].contains("Be brief"),
        "{}",
        texts[1]
    );
    // This template has no generation prompt, so the assistant header belongs to the trained turn.
    assert_eq!(
        texts[2],
        "[system] Be brief.\n[user] Hi\n⟦[assistant] Hello⟧\n"
    );
}

#[test]
fn training_config_maps_onto_the_data_path() {
    use crate::config::{LoadOptions, TrainConfig};
    let dir = tempfile::tempdir().unwrap();
    let chat = chat_jsonl(dir.path(), "chat.jsonl", 20);
    let sg = write(
        dir.path(),
        "sg.jsonl",
        &(serde_json::json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
            .to_string()
            + "\n"),
    );
    let yaml = format!(
        "base_model: {base}\nlearning_rate: 2e-4\nnum_epochs: 1\nsequence_len: 300\nsample_packing: true\n\
         micro_batch_size: 2\nval_set_size: 0.1\nseed: 7\nskip_bad_rows: true\ntruncation: truncate\n\
         dataset_prepared_path: prepared\n\
         datasets:\n  - path: chat.jsonl\n    type: chat_template\n    train_on_eos: last\n\
         \x20 - path: sg.jsonl\n    type: chat_template\n    field_messages: conversations\n\
         \x20   message_property_mappings: {{role: from, content: value}}\n    chat_template: chatml\n",
        base = fixture("models/llama").display()
    );
    let cfg = TrainConfig::from_yaml_str(
        &yaml,
        "test.yaml",
        &[],
        &LoadOptions {
            base_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let spec = cfg.data_spec();
    let o = spec.options.clone();
    assert_eq!(
        (
            o.sequence_len,
            o.sample_packing,
            o.micro_batch_size,
            o.val_set_size,
            o.seed
        ),
        (300, true, 2, 0.1, 7)
    );
    assert_eq!(
        (o.on_bad_row, o.truncation, o.chat_template.clone()),
        (OnBadRow::Skip, Truncation::Truncate, None)
    );
    let (s0, s1) = (spec.train[0].clone(), spec.train[1].clone());
    assert_eq!(std::path::Path::new(&s0.path), chat);
    assert_eq!(
        (s0.train_on_eos, s0.chat_template.clone()),
        (TrainOnEos::Last, None)
    );
    assert_eq!(s1.chat_template.as_deref(), Some("chatml"));
    assert_eq!(
        s1.message_property_mappings,
        Some(PropertyMappings {
            role: "from".into(),
            content: "value".into()
        })
    );
    assert_eq!(spec.cache_dir, dir.path().join("prepared"));
    let tok = crate::tokenizer::LoadedTokenizer::from_hf_dir(&fixture("tokenizer")).unwrap();
    let p = cfg.data_pipeline(&tok).unwrap();
    let st = p.stats().unwrap();
    assert_eq!(st.train_counts.samples, 21);
    assert_eq!((st.train_samples, st.eval_samples), (18, 3));
    assert!(st.cache.starts_with(dir.path().join("prepared")));
    let facts = p.data_facts().unwrap();
    assert_eq!((facts.eval_samples, facts.samples_before_split), (3, 21));
    assert_eq!(
        facts.train_samples,
        p.prepared().unwrap().epoch_plan(0).rows(),
        "packed rows"
    );
    // The ShareGPT record went through the generic ChatML template (no default system prompt).
    let items = p.preview(21).unwrap();
    assert_eq!(
        items[20].marked_text(false),
        format!("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Yo<|im_end|>⟧\n")
    );
    let _ = sg;
}

/// Axolotl's `AlpacaPrompter` formats per prompt style (src/axolotl/prompters.py at the pinned commit), by hand.
#[test]
fn alpaca_prompt_styles_are_axolotls() {
    use crate::data::options::AlpacaStyle::*;
    use crate::data::render::alpaca_prompt;
    let with = "Below is an instruction that describes a task, paired with an input that provides further context. \
                Write a response that appropriately completes the request.";
    let without = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
    assert_eq!(
        alpaca_prompt(Instruct, None, "Add.", Some("2, 2")),
        format!("{with}\n\n### Instruction:\nAdd.\n\n### Input:\n2, 2\n\n### Response:\n")
    );
    assert_eq!(
        alpaca_prompt(Chat, None, "Add.", Some("2, 2")),
        format!("SYSTEM: {with}\nUSER: Add.\n2, 2\nASSISTANT:")
    );
    assert_eq!(
        alpaca_prompt(Chat, None, "Add.", None),
        format!("SYSTEM: {without}\nUSER: Add.\nASSISTANT:")
    );
    assert_eq!(
        alpaca_prompt(Chatml, Some("Be brief."), "Add.", None),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        alpaca_prompt(Phi, None, "Add.", Some("2, 2")),
        format!("<|system|>\n{with}<|end|>\n<|user|>\nAdd.<|end|>2, 2<|assistant|>")
    );
    assert_eq!(
        alpaca_prompt(Phi, None, "Add.", None),
        format!("<|system|>\n{without}<|end|>\n<|user|>\nAdd.<|end|>\n<|assistant|>\n")
    );
    assert_eq!(
        DataFormat::parse("alpaca:phi").unwrap().alpaca_style(),
        Some(Phi)
    );
}

/// `split: train[a:b]` keeps records a+1..=b (1-based record numbers), percentages of the file's records.
#[test]
fn split_slices_select_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let f = chat_jsonl(dir.path(), "d.jsonl", 40);
    let run = |split: &str| {
        let mut src = DatasetSource::new(f.to_string_lossy(), DataFormat::Chat);
        src.rows = crate::data::slice::RowSlice::parse(split).unwrap();
        let p = pipeline(vec![src], opts(), &dir.path().join("c"));
        let st = p.stats().unwrap();
        let c = &st.train_counts;
        let cache = &p.prepared().unwrap().train_cache;
        let records: Vec<u64> = (0..cache.len())
            .map(|i| cache.entry(i).unwrap().record)
            .collect();
        (c.records, c.samples, records)
    };
    let (read, kept, records) = run("train[10:15]");
    assert_eq!((read, kept), (5, 5));
    assert_eq!(records, vec![11, 12, 13, 14, 15]);
    let (_, kept, records) = run("train[-10%:]");
    assert_eq!(kept, 4);
    assert_eq!(records, vec![37, 38, 39, 40]);
    assert_eq!(run("train[:25%]").1, 10);
}

/// `curriculum_sampling`: no shuffle, the data order; `dataset_exact_deduplication`: repeated samples are dropped
/// and counted.
#[test]
fn curriculum_order_and_exact_deduplication() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..12 {
        text.push_str(&chat_line(&format!("Q{}", i % 8), &format!("A{}", i % 8)));
        text.push('\n');
    }
    let f = write(dir.path(), "d.jsonl", &text);
    let src = vec![DatasetSource::new(f.to_string_lossy(), DataFormat::Chat)];
    let p = pipeline(
        src.clone(),
        DataOptions {
            shuffle: false,
            deduplicate: true,
            ..opts()
        },
        &dir.path().join("c"),
    );
    let st = p.stats().unwrap();
    assert_eq!(
        (st.train_counts.samples, st.train_counts.duplicates),
        (8, 4)
    );
    assert!(
        st.to_string().contains("dropped (exact duplicates)  4"),
        "{st}"
    );
    assert_eq!(
        p.prepared().unwrap().epoch_samples(0),
        (0..8).collect::<Vec<u32>>()
    );
    assert_eq!(
        p.prepared().unwrap().epoch_samples(3),
        (0..8).collect::<Vec<u32>>()
    );
    let plain = pipeline(src, opts(), &dir.path().join("c"));
    assert_eq!(plain.stats().unwrap().train_counts.samples, 12);
}

/// `eot_tokens` replace the end-of-turn ids; a token the tokenizer lacks is an error naming it.
#[test]
fn eot_tokens_choose_the_trained_turn_ends() {
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let tok = crate::tokenizer::load_for_model(&model).unwrap();
    let b = SampleBuilder::from_tokenizer(&tok, None, false)
        .unwrap()
        .with_eot_tokens(&tok, Some(&["<pad>".to_string(), "<|im_end|>".to_string()]))
        .unwrap();
    assert_eq!(b.tok.end_of_turn_ids, vec![3, 2]);
    let e = SampleBuilder::from_tokenizer(&tok, None, false)
        .unwrap()
        .with_eot_tokens(&tok, Some(&["<end_of_turn>".to_string()]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("eot_tokens: `<end_of_turn>` is not a token"),
        "{e}"
    );
}
