//! Inputs a record gives that herd does not act on: never silent. Each kind is counted over the
//! run and reported once at its end ("12 records had unknown field `temprature` (ignored)");
//! `--strict` makes each one an error of its record instead.

use std::collections::BTreeMap;

/// Something in one record that herd ignores.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ignored {
    /// A field herd does not know (a typo such as `temprature`).
    UnknownField(String),
    /// An OpenAI / vLLM request field herd does not implement, set to a value that changes the
    /// answer (`frequency_penalty: 0.5`; `0` would change nothing and is not reported).
    Unimplemented(String),
    /// Log-probs asked for, which a CSV output has no column for.
    LogprobsInCsv,
    /// An OpenAI request naming a model other than the one answering (never an error: the
    /// answer names the model that made it).
    OtherModel(String),
}

impl Ignored {
    /// What is wrong, as a record's error under `--strict`; `None` when `--strict` keeps it a
    /// warning.
    pub fn strict_error(&self) -> Option<String> {
        match self {
            Ignored::UnknownField(f) => Some(format!("unknown field `{f}`")),
            Ignored::Unimplemented(f) => Some(format!("`{f}` is not implemented by herd")),
            Ignored::LogprobsInCsv => Some(
                "log-probs were asked for, but a CSV output has no column for them; write a .jsonl output"
                    .into(),
            ),
            Ignored::OtherModel(_) => None,
        }
    }

    fn summary(&self, n: u64, served_model: &str, strict: bool) -> String {
        let records = if n == 1 {
            "1 record".to_string()
        } else {
            format!("{n} records")
        };
        let what = match self {
            Ignored::UnknownField(f) => format!("{records} had unknown field `{f}`"),
            Ignored::Unimplemented(f) => {
                format!("{records} set `{f}`, which herd does not implement")
            }
            Ignored::LogprobsInCsv => format!(
                "{records} asked for log-probs, which a CSV output has no column for (write a .jsonl output to keep them)"
            ),
            Ignored::OtherModel(m) => {
                return format!(
                    "{records} named model `{m}`; answered by `{served_model}`, the name their answers carry (--served-model-name sets it)"
                )
            }
        };
        if strict {
            format!("{what}: error records (--strict)")
        } else {
            format!("{what} (ignored); --strict makes them errors")
        }
    }
}

/// Most distinct kinds kept (a file of random field names must not grow memory).
const MAX_KINDS: usize = 64;

/// Counts of each kind over the records read.
#[derive(Debug, Default)]
pub struct Tally {
    counts: BTreeMap<Ignored, u64>,
    /// Records with kinds beyond [`MAX_KINDS`].
    more: u64,
}

impl Tally {
    /// Count one record's notes (each kind once per record).
    pub fn add(&mut self, notes: &[Ignored]) {
        for (i, note) in notes.iter().enumerate() {
            if notes[..i].contains(note) {
                continue;
            }
            if let Some(c) = self.counts.get_mut(note) {
                *c += 1;
            } else if self.counts.len() < MAX_KINDS {
                self.counts.insert(note.clone(), 1);
            } else {
                self.more += 1;
            }
        }
    }

    /// One line per kind, most frequent first.
    pub fn lines(&self, served_model: &str, strict: bool) -> Vec<String> {
        let mut kinds: Vec<(&Ignored, &u64)> = self.counts.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        let mut out: Vec<String> = kinds
            .into_iter()
            .map(|(k, &n)| k.summary(n, served_model, strict))
            .collect();
        if self.more > 0 {
            out.push(format!(
                "and {} more ignored fields in other records (only {MAX_KINDS} kinds are counted)",
                self.more
            ));
        }
        out
    }

    /// Log the lines as warnings (the world leader calls this once, at the end of the run).
    pub fn warn(&self, served_model: &str, strict: bool) {
        for l in self.lines(served_model, strict) {
            tracing::warn!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_records_per_kind_and_says_what_strict_does() {
        let mut t = Tally::default();
        let typo = Ignored::UnknownField("temprature".into());
        for _ in 0..12 {
            // Twice in one record still counts the record once.
            t.add(&[typo.clone(), typo.clone()]);
        }
        t.add(&[Ignored::Unimplemented("frequency_penalty".into())]);
        t.add(&[Ignored::OtherModel("gpt-4o".into())]);
        let l = t.lines("tiny", false);
        assert_eq!(
            l[0],
            "12 records had unknown field `temprature` (ignored); --strict makes them errors"
        );
        assert!(l.iter().any(|s| s.starts_with(
            "1 record set `frequency_penalty`, which herd does not implement (ignored)"
        )));
        assert!(l
            .iter()
            .any(|s| s.contains("model `gpt-4o`") && s.contains("`tiny`")));
        let s = t.lines("tiny", true);
        assert!(s[0].ends_with("error records (--strict)"), "{}", s[0]);
        assert!(Ignored::OtherModel("x".into()).strict_error().is_none());
    }

    #[test]
    fn kinds_are_bounded() {
        let mut t = Tally::default();
        for i in 0..1000 {
            t.add(&[Ignored::UnknownField(format!("f{i}"))]);
        }
        let l = t.lines("m", false);
        assert_eq!(l.len(), MAX_KINDS + 1);
        assert!(l[MAX_KINDS].contains("936 more"), "{}", l[MAX_KINDS]);
    }
}
