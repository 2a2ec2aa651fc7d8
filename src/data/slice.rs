//! Dataset `split` slicing as the Hugging Face `datasets` library reads it: `train`, `train[:20%]`,
//! `train[100:200]`, `train[-10%:]`, `train[10%:90%]` (Axolotl passes the string to `load_dataset`).
//!
//! Bounds are absolute record numbers or percentages of the split's records; negative bounds count from the end;
//! percentages are rounded to the closest record (ties to even, as Python's `round`), as `ReadInstruction`'s default
//! `closest` rounding does.

use serde::{Deserialize, Serialize};

/// One end of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Bound {
    /// A record number (negative: from the end).
    Abs(i64),
    /// A percentage of the records (negative: from the end).
    Pct(f64),
}

/// `[start:end]` over a dataset's records, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RowSlice {
    pub start: Option<Bound>,
    pub end: Option<Bound>,
}

impl RowSlice {
    /// Parse a `split` value. `Ok(None)` for the whole split (`train`); an error names what is accepted.
    pub fn parse(split: &str) -> Result<Option<RowSlice>, String> {
        let s = split.trim();
        let (name, rest) = match s.find('[') {
            Some(i) => (&s[..i], Some(&s[i..])),
            None => (s, None),
        };
        if name.trim() != "train" {
            return Err(format!(
                "local files have only the `train` split (got `{split}`); point `path` at the file you want, or slice \
                 it: train[:20%], train[100:200]"
            ));
        }
        let Some(rest) = rest else { return Ok(None) };
        let inner = rest
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| {
                format!("`{split}`: a slice is written train[start:end], e.g. train[:20%]")
            })?;
        let Some((a, b)) = inner.split_once(':') else {
            return Err(format!(
                "`{split}`: a slice needs a colon, e.g. train[:20%] or train[100:200]"
            ));
        };
        let bound = |t: &str| -> Result<Option<Bound>, String> {
            let t = t.trim();
            if t.is_empty() {
                return Ok(None);
            }
            let bad =
                || format!("`{split}`: `{t}` is not a record number or a percentage such as 20%");
            match t.strip_suffix('%') {
                Some(p) => {
                    let v: f64 = p.trim().parse().map_err(|_| bad())?;
                    if !v.is_finite() || v.abs() > 100.0 {
                        return Err(format!("`{split}`: a percentage is between -100% and 100%"));
                    }
                    Ok(Some(Bound::Pct(v)))
                }
                None => t
                    .parse::<i64>()
                    .map(|v| Some(Bound::Abs(v)))
                    .map_err(|_| bad()),
            }
        };
        Ok(Some(RowSlice {
            start: bound(a)?,
            end: bound(b)?,
        }))
    }

    /// Whether resolving needs the number of records (a percentage or a bound from the end).
    pub fn needs_total(&self) -> bool {
        [self.start, self.end].iter().any(|b| match b {
            Some(Bound::Pct(_)) => true,
            Some(Bound::Abs(v)) => *v < 0,
            None => false,
        })
    }

    /// The record range `start..end` of a split of `total` records (`total` may be `usize::MAX` when
    /// [`RowSlice::needs_total`] is false).
    pub fn resolve(&self, total: usize) -> std::ops::Range<usize> {
        let abs = |b: Bound| -> i64 {
            match b {
                Bound::Abs(v) => v,
                Bound::Pct(p) => (p * total as f64 / 100.0).round_ties_even() as i64,
            }
        };
        let clamp = |v: i64| -> usize {
            if v < 0 {
                (total as i64 + v).max(0) as usize
            } else {
                (v as usize).min(total)
            }
        };
        let start = self.start.map(|b| clamp(abs(b))).unwrap_or(0);
        let end = self.end.map(|b| clamp(abs(b))).unwrap_or(total);
        start..end.max(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges by hand, as `datasets` computes them (`ReadInstruction`, closest rounding) for 10 and 7 records.
    #[test]
    fn split_slices_select_rows_as_hf_datasets() {
        let r = |s: &str, n: usize| RowSlice::parse(s).unwrap().unwrap().resolve(n);
        assert_eq!(r("train[:20%]", 10), 0..2);
        assert_eq!(r("train[100:200]", 1000), 100..200);
        assert_eq!(r("train[100:200]", 150), 100..150);
        assert_eq!(r("train[-10%:]", 10), 9..10);
        assert_eq!(r("train[10%:90%]", 10), 1..9);
        assert_eq!(r("train[:-3]", 10), 0..7);
        // 7 × 50% = 3.5 → 4 (ties to even), 7 × 25% = 1.75 → 2.
        assert_eq!(r("train[:50%]", 7), 0..4);
        assert_eq!(r("train[25%:]", 7), 2..7);
        assert_eq!(r("train[ 2 : ]", 7), 2..7);
        assert!(!RowSlice::parse("train[2:5]")
            .unwrap()
            .unwrap()
            .needs_total());
        assert!(RowSlice::parse("train[:5%]")
            .unwrap()
            .unwrap()
            .needs_total());
        assert_eq!(RowSlice::parse("train").unwrap(), None);
        for bad in [
            "test",
            "validation[:10%]",
            "train[5]",
            "train[:x%]",
            "train[:200%]",
            "train[:10%",
        ] {
            assert!(RowSlice::parse(bad).is_err(), "{bad}");
        }
    }
}
