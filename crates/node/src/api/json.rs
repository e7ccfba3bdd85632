//! Reading request bodies from JSON, for every dialect. The request types refuse fields
//! they do not know (`#[serde(deny_unknown_fields)]`): crisp never drops part of a request
//! without saying so, and a misspelt field (`max_token`) is not taken for a request
//! without it. When a body does not fit its type, it is read once more to say where
//! (`messages[0].content`) and, for an unknown field, which one was probably meant.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// A request of type `T` read from `text`; the error says what was wrong and where.
pub(crate) fn from_json<'de, T: Deserialize<'de>>(text: &'de str) -> Result<T, String> {
    let first = match serde_json::from_str(text) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    // Only failed bodies pay for tracking the path.
    let mut de = serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(_) => Err(first.to_string()),
        Err(e) => Err(explain(&e.path().to_string(), e.inner())),
    }
}

/// A body-reading error in words: the place, and for an unknown field the one meant.
fn explain(path: &str, err: &serde_json::Error) -> String {
    let text = err.to_string();
    let Some((field, rest)) = text
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    else {
        return match path {
            "" | "." => text,
            p => format!("`{p}`: {text}"),
        };
    };
    // serde lists what it expected in backquotes: ", expected one of `a`, `b` at line ..."
    let known: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    // The path ends with the unknown field itself.
    let full = match path {
        "" | "." => field,
        p => p,
    };
    unknown_field(full, field, &known)
}

/// The refusal of the unknown field `field`, at `path` (which ends with it), where the
/// fields `known` are allowed.
pub(crate) fn unknown_field(path: &str, field: &str, known: &[&str]) -> String {
    let hint = match nearest(field, known) {
        Some(meant) => format!("did you mean `{meant}`?"),
        None if known.is_empty() => "nothing else is allowed there.".to_owned(),
        None if known.len() <= 16 => format!("the fields there are `{}`.", known.join("`, `")),
        None => "see the README for what crisp carries to a model.".to_owned(),
    };
    format!(
        "unknown field `{path}`; {hint} crisp refuses a field it does not carry rather than drop it: correct or remove it and send the request again (nothing was run)"
    )
}

/// The known field `field` was most likely meant to be: the same but for case and
/// separators (`max_tokens` for `maxTokens`), or a small typo away.
fn nearest<'a>(field: &str, known: &[&'a str]) -> Option<&'a str> {
    let fold = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let folded = fold(field);
    if let Some(same) = known.iter().find(|k| fold(k) == folded) {
        return Some(same);
    }
    let allowed = (field.chars().count() / 4).clamp(1, 3);
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&folded, &fold(k)), *k))
        .filter(|(d, _)| *d <= allowed)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// What a list of `Self` is for, in the error of a value that is neither a string nor
/// such a list.
pub(crate) trait Listed {
    /// "a string, or a list of ... like ...".
    const EXPECTING: &'static str;
}

/// A string, or a list of `T`: OpenAI's `content` and `input`. Read by the JSON type it
/// finds, so an error inside the list is reported as itself, with its place, rather than
/// as "matched no variant" (and nothing is buffered to try a second variant).
pub(crate) enum TextOr<T> {
    Text(String),
    List(Vec<T>),
}

impl<'de, T: Deserialize<'de> + Listed> Deserialize<'de> for TextOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de> + Listed> Visitor<'de> for Either<T> {
            type Value = TextOr<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<TextOr<T>, E> {
                Ok(TextOr::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<TextOr<T>, E> {
                Ok(TextOr::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextOr<T>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(TextOr::List(items))
            }
        }

        deserializer.deserialize_any(Either(PhantomData))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        messages: Vec<Inner>,
        #[serde(default, alias = "max_new_tokens")]
        max_tokens: Option<u32>,
        #[serde(default)]
        temperature: Option<f32>,
        #[serde(default, rename = "topP", alias = "top_p")]
        top_p: Option<f32>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        role: String,
        content: String,
    }

    #[test]
    fn a_misspelt_field_is_named_with_the_one_meant() {
        let e = from_json::<Outer>(r#"{"messages": [], "max_token": 5}"#).unwrap_err();
        assert!(
            e.starts_with("unknown field `max_token`; did you mean `max_tokens`?"),
            "{e}"
        );
        assert!(e.contains("nothing was run"), "{e}");
        let e = from_json::<Outer>(r#"{"messages": [], "maxTokens": 5}"#).unwrap_err();
        assert!(e.contains("did you mean `max_tokens`?"), "{e}");
        // Aliases are among the names suggested.
        let e = from_json::<Outer>(r#"{"messages": [], "max_new_token": 5}"#).unwrap_err();
        assert!(e.contains("did you mean `max_new_tokens`?"), "{e}");
    }

    #[test]
    fn an_unknown_field_deeper_in_says_where_and_what_is_taken() {
        let e = from_json::<Outer>(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": []}]}"#,
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "unknown field `messages[1].tool_calls`; the fields there are `role`, `content`."
            ),
            "{e}"
        );
    }

    #[test]
    fn other_errors_keep_serdes_words_and_gain_the_place() {
        let e =
            from_json::<Outer>(r#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert!(
            e.starts_with("`messages[0].content`: invalid type: integer `5`"),
            "{e}"
        );
        let e = from_json::<Outer>(r#"{"max_tokens": 5}"#).unwrap_err();
        assert!(e.starts_with("missing field `messages`"), "{e}");
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Part {
        text: String,
    }

    impl Listed for Part {
        const EXPECTING: &'static str = "a string, or a list of parts";
    }

    #[derive(Deserialize)]
    struct WithContent {
        content: TextOr<Part>,
    }

    #[test]
    fn text_or_a_list_reads_both_and_says_what_is_wrong_inside_the_list() {
        let read = |body: &str| from_json::<WithContent>(body).map(|w| w.content);
        assert!(matches!(read(r#"{"content": "hi"}"#), Ok(TextOr::Text(t)) if t == "hi"));
        assert!(matches!(
            read(r#"{"content": [{"text": "a"}, {"text": "b"}]}"#),
            Ok(TextOr::List(parts)) if parts.len() == 2
        ));
        let e = read(r#"{"content": 5}"#).err().unwrap();
        assert!(
            e.starts_with(
                "`content`: invalid type: integer `5`, expected a string, or a list of parts"
            ),
            "{e}"
        );
        let e = read(r#"{"content": [{"text": "a"}, {"text": "b", "colour": 1}]}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("unknown field `content[1].colour`"), "{e}");
    }

    #[test]
    fn a_good_body_is_read() {
        let o = from_json::<Outer>(
            r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}"#,
        )
        .unwrap();
        assert_eq!(o.messages.len(), 1);
    }

    #[test]
    fn nearest_wants_a_close_match() {
        let known = ["model", "messages", "stream", "max_tokens"];
        assert_eq!(nearest("mesages", &known), Some("messages"));
        assert_eq!(nearest("Stream", &known), Some("stream"));
        assert_eq!(nearest("top_k", &known), None);
        assert_eq!(nearest("x", &known), None);
    }
}
