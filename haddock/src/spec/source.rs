//! Maps dotted key paths of a TOML document (`rollout.steps[1].weight`) to `line:col`.
//!
//! serde's model forgets where a value came from, so we parse the text a second time with
//! `toml_edit`, which keeps spans, and record every key path it contains. Semantic checks then
//! report by path, and type errors (which carry only a byte span) are given their path back.

use std::ops::Range;
use toml_edit::{ImDocument, Item, Table, Value};

/// Every key path of one document with the byte span of its value.
#[derive(Debug, Default)]
pub struct SourceMap {
    text: String,
    spans: Vec<(String, Range<usize>)>,
}

impl SourceMap {
    /// Builds the map; a document that does not even parse yields an empty map (the parse
    /// error itself carries the position).
    pub fn new(text: &str) -> SourceMap {
        let mut spans = Vec::new();
        if let Ok(doc) = ImDocument::parse(text.to_string()) {
            walk_table(doc.as_table(), "", &mut spans);
        }
        SourceMap {
            text: text.to_string(),
            spans,
        }
    }

    /// Byte span of the value at `path`, falling back to the nearest parent that exists
    /// (a missing key is reported where its table is).
    pub fn span_of(&self, path: &str) -> Option<Range<usize>> {
        let mut p = path;
        loop {
            if let Some(span) = self.span_of_exact(p) {
                return Some(span);
            }
            p = parent(p)?;
        }
    }

    /// Byte span of the value at exactly `path`.
    pub fn span_of_exact(&self, path: &str) -> Option<Range<usize>> {
        self.spans
            .iter()
            .find(|(k, _)| k == path)
            .map(|(_, s)| s.clone())
    }

    /// The deepest key path whose value contains byte `offset`.
    pub fn path_at(&self, offset: usize) -> Option<&str> {
        self.spans
            .iter()
            .filter(|(_, s)| s.start <= offset && offset < s.end.max(s.start + 1))
            .max_by_key(|(k, s)| (k.len(), usize::MAX - (s.end - s.start)))
            .map(|(k, _)| k.as_str())
    }

    /// 1-based line and column (in characters) of byte `offset`.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']') {
        return path.rfind('[').map(|i| &path[..i]);
    }
    Some(path.rfind('.').map_or("", |i| &path[..i]))
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Records every key of a table or inline table, then descends into its value.
fn walk_table_like<'a>(
    keys: Vec<String>,
    get: impl Fn(&str) -> Option<(Option<Range<usize>>, &'a Item)>,
    prefix: &str,
    out: &mut Vec<(String, Range<usize>)>,
) {
    for k in keys {
        let Some((key_span, item)) = get(&k) else {
            continue;
        };
        let path = join(prefix, &k);
        // A value span is the best anchor ("150" in `weight = 150`); tables only have their
        // header, and dotted keys only their key.
        if let Some(span) = item.span().or(key_span) {
            out.push((path.clone(), span));
        }
        walk_item(item, &path, out);
    }
}

fn walk_item(item: &Item, path: &str, out: &mut Vec<(String, Range<usize>)>) {
    match item {
        Item::Table(t) => walk_table(t, path, out),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(span) = t.span() {
                    out.push((p.clone(), span));
                }
                walk_table(t, &p, out);
            }
        }
        Item::Value(v) => walk_value(v, path, out),
        Item::None => {}
    }
}

fn walk_table(t: &Table, path: &str, out: &mut Vec<(String, Range<usize>)>) {
    walk_table_like(
        t.iter().map(|(k, _)| k.to_string()).collect(),
        |k| t.get_key_value(k).map(|(key, item)| (key.span(), item)),
        path,
        out,
    )
}

fn walk_value(value: &Value, path: &str, out: &mut Vec<(String, Range<usize>)>) {
    match value {
        Value::InlineTable(t) => walk_table_like(
            t.iter().map(|(k, _)| k.to_string()).collect(),
            |k| t.get_key_value(k).map(|(key, item)| (key.span(), item)),
            path,
            out,
        ),
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(span) = v.span() {
                    out.push((p.clone(), span));
                }
                walk_value(v, &p, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[rollout]\nsteps = [\n  { weight = 10, pause = \"1s\" },\n  { weight = 150 },\n]\n\n[[targets]]\nhost = \"unix:///x\"\n";

    #[test]
    fn finds_nested_paths_with_positions() {
        let map = SourceMap::new(DOC);
        let span = map.span_of("rollout.steps[1].weight").unwrap();
        assert_eq!(&DOC[span.clone()], "150");
        assert_eq!(map.line_col(span.start), (4, 14));
        assert_eq!(map.path_at(span.start), Some("rollout.steps[1].weight"));
        let host = map.span_of("targets[0].host").unwrap();
        assert_eq!(map.line_col(host.start).0, 8);
    }

    #[test]
    fn missing_keys_fall_back_to_their_table() {
        let map = SourceMap::new(DOC);
        let span = map.span_of("rollout.steps[0].nope").unwrap();
        assert_eq!(map.line_col(span.start), (3, 3));
    }
}
