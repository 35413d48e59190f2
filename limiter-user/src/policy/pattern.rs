//! Wildcard patterns for recipients and HELO names.
//!
//! The syntax operators write in `relay.accept`, `limits.helo[].pattern` and
//! `lists.reject_helo`: `?` matches exactly one character, `*` matches any
//! run of characters (the empty run included), everything else matches
//! itself, ASCII letters without regard to case. There is no escape and no
//! regular expression.
//!
//! Matching is iterative: one pass over the text that remembers the last `*`
//! and backtracks to it on a mismatch. That is O(text × pattern) in the worst
//! case, with no recursion and no allocation, so a hostile HELO name or
//! recipient cannot make it blow up (`a*a*a*a*b` against a long run of `a`s
//! stays linear-ish, see the tests).

use std::fmt;
use std::str::FromStr;

/// One step of a compiled pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// `*`: any run of characters, possibly empty (runs of `*` collapse).
    Star,
    /// `?`: exactly one character (one UTF-8 scalar, however many bytes).
    One,
    /// A literal byte, ASCII letters lower-cased. Multi-byte characters are
    /// kept as their UTF-8 bytes, which match byte for byte.
    Byte(u8),
}

/// A compiled wildcard pattern (`?` one character, `*` any run, ASCII case
/// ignored).
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The pattern as written, for logs and error messages.
    text: String,
    /// What the matcher walks.
    tokens: Vec<Token>,
}

impl Pattern {
    /// Compiles `pattern`. Every string is a valid pattern; the empty one
    /// matches only the empty text.
    #[must_use]
    pub fn new(pattern: &str) -> Self {
        let mut tokens = Vec::with_capacity(pattern.len());
        for &byte in pattern.as_bytes() {
            let token = match byte {
                b'*' => Token::Star,
                b'?' => Token::One,
                other => Token::Byte(other.to_ascii_lowercase()),
            };
            if token == Token::Star && tokens.last() == Some(&Token::Star) {
                continue;
            }
            tokens.push(token);
        }
        Self {
            text: pattern.to_owned(),
            tokens,
        }
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the whole of `text` matches (not a substring search).
    #[must_use]
    pub fn matches(&self, text: &str) -> bool {
        let tokens = &self.tokens;
        let text = text.as_bytes();
        let (mut p, mut t) = (0, 0);
        // After the last `*` seen: the token following it, and the text
        // position that `*` would stop at if we backtrack to it.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match tokens.get(p) {
                Some(Token::Star) => {
                    star = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                Some(Token::One) => {
                    p += 1;
                    t += char_width(text[t]);
                    continue;
                }
                Some(Token::Byte(b)) if *b == text[t].to_ascii_lowercase() => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
            // Mismatch (or pattern exhausted): let the last `*` swallow one
            // more character and retry from just after it.
            match star {
                Some((after_star, resume)) => {
                    let resume = resume + char_width(text[resume]);
                    star = Some((after_star, resume));
                    p = after_star;
                    t = resume;
                }
                None => return false,
            }
        }
        // The text is consumed: only `*`s may be left in the pattern.
        tokens[p.min(tokens.len())..]
            .iter()
            .all(|token| *token == Token::Star)
    }
}

/// Bytes in the UTF-8 character that starts with `lead`. Positions in the
/// matcher always sit on character boundaries (the text is a `str`, and every
/// step advances by a whole character or by a literal byte that matched), so
/// `lead` is never a continuation byte; if it were, 1 keeps the loop moving.
const fn char_width(lead: u8) -> usize {
    match lead {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.text).finish()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<&str> for Pattern {
    fn from(pattern: &str) -> Self {
        Self::new(pattern)
    }
}

/// Several patterns; a text matches the list when it matches any of them.
/// The empty list matches nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatternList {
    /// In the order written: [`PatternList::find`] reports the first match.
    patterns: Vec<Pattern>,
}

impl PatternList {
    /// Parses blank-separated patterns, e.g. `"*@example.com postmaster@*"`
    /// (the `relay.accept` form). A blank string gives the empty list.
    #[must_use]
    pub fn parse(patterns: &str) -> Self {
        patterns.split_whitespace().collect()
    }

    /// Whether `text` matches any pattern (never, for the empty list).
    #[must_use]
    pub fn matches(&self, text: &str) -> bool {
        self.find(text).is_some()
    }

    /// The first pattern that `text` matches, to say which rule applied.
    #[must_use]
    pub fn find(&self, text: &str) -> Option<&Pattern> {
        self.patterns.iter().find(|pattern| pattern.matches(text))
    }

    /// Whether the list holds no pattern.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// How many patterns the list holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// The patterns, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Pattern> {
        self.patterns.iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for PatternList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Self {
            patterns: iter
                .into_iter()
                .map(|pattern| Pattern::new(pattern.as_ref()))
                .collect(),
        }
    }
}

impl From<Vec<String>> for PatternList {
    /// One pattern per element (the `lists.reject_helo` form); elements are
    /// taken whole, blanks included.
    fn from(patterns: Vec<String>) -> Self {
        patterns.iter().collect()
    }
}

impl From<&[String]> for PatternList {
    /// One pattern per element, as [`From<Vec<String>>`](PatternList#impl-From<Vec<String>>-for-PatternList).
    fn from(patterns: &[String]) -> Self {
        patterns.iter().collect()
    }
}

impl FromStr for PatternList {
    type Err = std::convert::Infallible;

    /// As [`PatternList::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::parse(s))
    }
}

impl<'a> IntoIterator for &'a PatternList {
    type Item = &'a Pattern;
    type IntoIter = std::slice::Iter<'a, Pattern>;

    fn into_iter(self) -> Self::IntoIter {
        self.patterns.iter()
    }
}

impl fmt::Display for PatternList {
    /// The patterns separated by single blanks (the `relay.accept` form).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pattern) in self.patterns.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(pattern.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn matches_table() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, bool)] = &[
            // literals, case
            ("abc", "abc", true),
            ("abc", "ABC", true),
            ("AbC", "aBc", true),
            ("abc", "abcd", false),
            ("abc", "ab", false),
            // `?` is exactly one character
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a?c", "abbc", false),
            ("???", "abc", true),
            ("???", "ab", false),
            ("a?c", "a\u{e9}c", true),   // é is two bytes, one character
            ("a??c", "a\u{e9}c", false),
            ("?", "\u{1F600}", true),    // four bytes, one character
            // `*` is any run, the empty one included
            ("*", "", true),
            ("*", "anything at all", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ba", false),
            ("*c", "abc", true),
            ("*c", "abcd", false),
            ("a*c", "ac", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbd", false),
            ("**", "x", true),
            // several `*`
            ("*@example.com", "user@example.com", true),
            ("*@example.com", "USER@EXAMPLE.COM", true),
            ("*@example.com", "user@example.com.evil", false),
            ("*@example.com", "user@sub.example.com", false),
            ("*@*.example.com", "user@sub.example.com", true),
            ("postmaster@*", "postmaster@anything", true),
            ("postmaster@*", "postmaster", false),
            ("*.bounces.example.net", "mta7.bounces.example.net", true),
            ("*.bounces.example.net", "bounces.example.net", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*ab", "aab", true),        // backtracking into the `*`
            ("*aab", "aaab", true),
            ("*?b", "ab", true),
            ("*?b", "b", false),
            ("a*?", "a", false),
            ("a*?", "a\u{e9}", true),
            ("*\u{e9}", "caf\u{e9}", true),
            ("caf\u{c9}", "caf\u{e9}", false), // only ASCII ignores case
            // empty
            ("", "", true),
            ("", "a", false),
            ("a", "", false),
            ("?", "", false),
        ];
        for &(pattern, text, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(text),
                expected,
                "{pattern:?} against {text:?}"
            );
        }
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let text = "a".repeat(20_000);
        let started = Instant::now();
        assert!(!Pattern::new("a*a*a*a*a*a*a*a*b").matches(&text));
        assert!(!Pattern::new("*a*a*a*a*a*a*a*a*a*a*a*a*b").matches(&text));
        assert!(Pattern::new("a*a*a*a*a").matches(&text));
        let many_stars = "*a".repeat(500) + "b";
        assert!(!Pattern::new(&many_stars).matches(&text));
        // Exponential backtracking would take ages; O(n·m) is milliseconds.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn lists_parse_blanks_and_match_any() {
        let list = PatternList::parse("  *@example.com\tpostmaster@*  ");
        assert_eq!(list.len(), 2);
        assert_eq!(list.to_string(), "*@example.com postmaster@*");
        assert!(list.matches("a@example.com"));
        assert!(list.matches("postmaster@other.org"));
        assert!(!list.matches("a@other.org"));
        assert_eq!(
            list.find("POSTMASTER@x").map(Pattern::as_str),
            Some("postmaster@*")
        );
        let from_vec = PatternList::from(vec!["*.dynamic.example".to_owned()]);
        assert!(from_vec.matches("host-1.DYNAMIC.example"));
        assert_eq!("a b".parse::<PatternList>().map(|l| l.len()), Ok(2));
    }

    #[test]
    fn empty_lists_match_nothing() {
        for list in [
            PatternList::parse(""),
            PatternList::parse("   "),
            PatternList::from(Vec::new()),
        ] {
            assert!(list.is_empty());
            assert!(!list.matches(""));
            assert!(!list.matches("a@example.com"));
        }
    }
}
