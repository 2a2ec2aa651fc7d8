//! Seeded mutations: byte-level (bit flips, interesting integers, cuts, splices, dictionary insertions) and
//! structural (JSON values replaced, deleted, retyped, duplicated or nested; text lines shuffled).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Integers that break size arithmetic: zero, one, sign bits, type maxima, and bounds loratune enforces.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    31,
    32,
    255,
    256,
    512,
    513,
    1024,
    4097,
    65535,
    65536,
    (1 << 20) + 1,
    (1 << 24) + 1,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1_000_000_000,
    (1 << 40),
    (1 << 62),
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 7,
    u64::MAX,
];

pub fn pick<'a, T>(rng: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

/// A position, biased into `hot` (the header of a binary file) three times in four.
fn pos(rng: &mut ChaCha8Rng, len: usize, hot: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let hot = hot.clamp(1, len);
    if rng.random_bool(0.75) {
        rng.random_range(0..hot)
    } else {
        rng.random_range(0..len)
    }
}

/// 1–4 byte-level mutations; `hot` bytes at the start get most of them, `dict` snippets are inserted or
/// overwritten.
pub fn bytes(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, hot: usize, dict: &[&[u8]]) {
    let n = rng.random_range(1..=4);
    for _ in 0..n {
        let len = data.len();
        match rng.random_range(0..10) {
            0 if len > 0 => {
                let p = pos(rng, len, hot);
                data[p] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let p = pos(rng, len, hot);
                data[p] = *pick(rng, &[0u8, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'\n']);
            }
            2 | 3 if len >= 8 => {
                // An interesting integer, little-endian, as u32 or u64, aligned or not.
                let wide = rng.random_bool(0.5);
                let w = if wide { 8 } else { 4 };
                let mut p = pos(rng, len - w + 1, hot).min(len - w);
                if rng.random_bool(0.5) {
                    p -= p % w;
                }
                let mut v = *pick(rng, INTERESTING);
                if rng.random_bool(0.2) {
                    v = v.wrapping_add(rng.random_range(0..3)).wrapping_sub(1);
                }
                let b = v.to_le_bytes();
                data[p..p + w].copy_from_slice(&b[..w]);
            }
            4 if len > 1 => {
                let p = pos(rng, len, hot);
                let k = rng.random_range(1..=64.min(len - p));
                data.drain(p..p + k);
            }
            5 if len > 1 => {
                let p = pos(rng, len, hot);
                let k = rng.random_range(1..=64.min(len - p));
                let chunk: Vec<u8> = data[p..p + k].to_vec();
                let at = pos(rng, len, hot);
                let reps = rng.random_range(1..=4);
                for _ in 0..reps {
                    data.splice(at..at, chunk.iter().copied());
                }
            }
            6 if len > 0 => {
                let cut = rng.random_range(0..len);
                data.truncate(cut);
            }
            7 | 8 if !dict.is_empty() => {
                let s = *pick(rng, dict);
                let at = pos(rng, len, hot);
                if rng.random_bool(0.5) && at + s.len() <= len {
                    data[at..at + s.len()].copy_from_slice(s);
                } else {
                    data.splice(at..at, s.iter().copied());
                }
            }
            _ => {
                let p = pos(rng, len + 1, hot).min(len);
                let k = rng.random_range(1..=8);
                for _ in 0..k {
                    data.insert(p, rng.random());
                }
            }
        }
    }
}

/// Every JSON path (indices into objects by key, arrays by position), as pointers.
fn pointers(v: &Value, here: String, out: &mut Vec<String>, budget: &mut usize) {
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(x, format!("{here}/{k}"), out, budget);
            }
        }
        Value::Array(a) => {
            // Long arrays (vocabularies, merges): a sample of elements, not all.
            let step = (a.len() / 64).max(1);
            for (i, x) in a.iter().enumerate().step_by(step) {
                pointers(x, format!("{here}/{i}"), out, budget);
            }
        }
        _ => {}
    }
}

/// A replacement value: extreme numbers, odd strings (regexes that backtrack, control characters), other types.
fn interesting_value(rng: &mut ChaCha8Rng, old: &Value, strings: &[&str]) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 | 3 => Value::from(*pick(rng, INTERESTING)),
        4 => {
            let f = *pick(
                rng,
                &[-1.0, -1e308, 1e308, 0.5, 1e-300, 3.5, -0.0, 1e30, 2.0e9],
            );
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        5 => Value::from(-(rng.random_range(1..1_000_000_000i64))),
        6 | 7 => Value::String(pick(rng, strings).to_string()),
        8 => Value::Array(vec![]),
        9 => Value::Object(serde_json::Map::new()),
        10 => {
            // Nest the old value deeply.
            let mut v = old.clone();
            for _ in 0..rng.random_range(1..200) {
                v = Value::Array(vec![v]);
            }
            v
        }
        _ => match old {
            Value::Number(n) => Value::String(n.to_string()),
            Value::String(s) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(
                    Value::String(s.repeat(rng.random_range(2..50))),
                    Value::Number,
                ),
            Value::Array(a) if !a.is_empty() => {
                // Duplicate elements.
                let mut b = a.clone();
                let k = rng.random_range(0..a.len());
                for _ in 0..rng.random_range(1..8) {
                    b.insert(k, a[k].clone());
                }
                Value::Array(b)
            }
            other => other.clone(),
        },
    }
}

/// 1–3 structural mutations of a JSON document.
pub fn json(rng: &mut ChaCha8Rng, v: &mut Value, strings: &[&str]) {
    let n = rng.random_range(1..=3);
    for _ in 0..n {
        let mut ptrs = Vec::new();
        let mut budget = 20_000;
        pointers(v, String::new(), &mut ptrs, &mut budget);
        let p = pick(rng, &ptrs).clone();
        if p.is_empty() {
            continue;
        }
        let (parent, key) = p.rsplit_once('/').unwrap_or(("", &p));
        let key = key.replace("~1", "/").replace("~0", "~");
        let delete = rng.random_bool(0.2);
        let Some(target) = v.pointer(&p).cloned() else {
            continue;
        };
        let new = interesting_value(rng, &target, strings);
        match v.pointer_mut(parent) {
            Some(Value::Object(m)) => {
                if delete {
                    m.remove(&key);
                } else {
                    m.insert(key, new);
                }
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = key.parse::<usize>() {
                    if i < a.len() {
                        if delete {
                            a.remove(i);
                        } else {
                            a[i] = new;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// 1–3 line-level mutations of a text (YAML, Jinja, CSV): lines deleted, duplicated or swapped, a value after a
/// `key:` replaced, a dictionary snippet inserted at a line start.
pub fn lines(rng: &mut ChaCha8Rng, text: &str, dict: &[&str]) -> String {
    let mut ls: Vec<String> = text.lines().map(str::to_string).collect();
    let n = rng.random_range(1..=3);
    for _ in 0..n {
        if ls.is_empty() {
            ls.push(String::new());
        }
        let i = rng.random_range(0..ls.len());
        match rng.random_range(0..6) {
            0 => {
                ls.remove(i);
            }
            1 => {
                let l = ls[i].clone();
                ls.insert(i, l);
            }
            2 => {
                let j = rng.random_range(0..ls.len());
                ls.swap(i, j);
            }
            3 => {
                if let Some((k, _)) = ls[i].split_once(':') {
                    let v = match rng.random_range(0..3) {
                        0 => pick(rng, INTERESTING).to_string(),
                        1 => format!("-{}", pick(rng, INTERESTING)),
                        _ => pick(rng, dict).to_string(),
                    };
                    ls[i] = format!("{k}: {v}");
                }
            }
            _ => {
                let s = pick(rng, dict).to_string();
                ls.insert(i, s);
            }
        }
    }
    let mut out = ls.join("\n");
    out.push('\n');
    out
}

/// Seed the case generator from the run seed, the format and the case number.
pub fn case_rng(seed: u64, format: &str, case: u64) -> ChaCha8Rng {
    use rand::SeedableRng;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in format.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ h ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}
