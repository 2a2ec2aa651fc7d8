//! Did-you-mean suggestions: the closest candidate by optimal-string-alignment distance
//! (Levenshtein plus adjacent transpositions, so `lora_alpah` → `lora_alpha` is one edit).

/// Optimal-string-alignment distance between two strings, on Unicode scalar values.
pub fn osa_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let (n, m) = (a.len(), b.len());
    // d[i][j] = distance between a[..i] and b[..j]
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[n][m]
}

/// The candidate closest to `input`, if it is close enough to be a plausible typo: at most 3 edits and at
/// most a third of the input's length (at least 1 edit allowed), compared case-insensitively. Failing that, a
/// candidate that contains the input (inputs of 4+ characters: `epochs` → `num_epochs`). Ties keep the first.
pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let input = input.to_lowercase();
    let len = input.chars().count();
    let limit = (len / 3).clamp(1, 3);
    let mut best: Option<(usize, &'a str)> = None;
    let mut containing: Option<&'a str> = None;
    for c in candidates {
        let lc = c.to_lowercase();
        if lc == input {
            return Some(c);
        }
        let d = osa_distance(&input, &lc);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
        if containing.is_none() && len >= 4 && lc.contains(&input) {
            containing = Some(c);
        }
    }
    best.map(|(_, c)| c).or(containing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(osa_distance("lora_alpah", "lora_alpha"), 1);
        assert_eq!(osa_distance("kitten", "sitting"), 3);
        assert_eq!(osa_distance("", "abc"), 3);
        assert_eq!(osa_distance("abc", "abc"), 0);
    }

    #[test]
    fn suggestions() {
        let keys = [
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "num_epochs",
            "learning_rate",
        ];
        assert_eq!(did_you_mean("lora_alpah", keys), Some("lora_alpha"));
        assert_eq!(did_you_mean("learning_rte", keys), Some("learning_rate"));
        assert_eq!(did_you_mean("epochs", keys), Some("num_epochs"));
        assert_eq!(did_you_mean("LORA_R", keys), Some("lora_r"));
        assert_eq!(did_you_mean("completely_different", keys), None);
        assert_eq!(did_you_mean("xy", keys), None);
    }
}
