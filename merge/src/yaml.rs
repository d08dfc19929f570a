//! A small YAML tree with source positions, built from `saphyr-parser`
//! events, so that every configuration error can say where it is.
//!
//! Only what merge configurations use: scalars (kept as text with their
//! style, typed by the reader that asks), sequences, mappings with scalar
//! keys, anchors and aliases. Duplicate keys are an error (YAML forbids
//! them; PyYAML silently keeps the last one).

use saphyr_parser::{Event, Parser, ScalarStyle};
use std::collections::HashMap;
use std::fmt;

/// A position in the YAML text (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

/// A YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A scalar: its text and whether it was quoted (a quoted scalar is
    /// always a string).
    Scalar {
        /// The text.
        text: String,
        /// Quoted (`'...'`, `"..."`, block scalars).
        quoted: bool,
        /// Where it starts.
        pos: Pos,
    },
    /// A sequence.
    Seq {
        /// The items.
        items: Vec<Node>,
        /// Where it starts.
        pos: Pos,
    },
    /// A mapping with scalar keys, in document order.
    Map {
        /// `(key, key position, value)`.
        entries: Vec<(String, Pos, Node)>,
        /// Where it starts.
        pos: Pos,
    },
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// What is wrong.
    pub message: String,
    /// Where.
    pub pos: Pos,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.pos)
    }
}

/// Deepest nesting accepted (a guard against hostile inputs).
const MAX_DEPTH: usize = 64;
/// Most nodes accepted, aliases expanded (a guard against alias bombs).
const MAX_NODES: usize = 1_000_000;

impl Node {
    /// Where the node starts.
    pub fn pos(&self) -> Pos {
        match self {
            Node::Scalar { pos, .. } | Node::Seq { pos, .. } | Node::Map { pos, .. } => *pos,
        }
    }

    /// A short name of the node's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Scalar { .. } if self.is_null() => "null",
            Node::Scalar { .. } => "a scalar",
            Node::Seq { .. } => "a list",
            Node::Map { .. } => "a mapping",
        }
    }

    /// True for an unquoted `null`, `~` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { text, quoted: false, .. }
            if text.is_empty() || text == "~" || text == "null" || text == "Null" || text == "NULL")
    }

    fn count(&self) -> usize {
        match self {
            Node::Scalar { .. } => 1,
            Node::Seq { items, .. } => 1 + items.iter().map(Node::count).sum::<usize>(),
            Node::Map { entries, .. } => 1 + entries.iter().map(|(_, _, v)| 1 + v.count()).sum::<usize>(),
        }
    }
}

fn pos_of(span: &saphyr_parser::Span) -> Pos {
    Pos {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(String, Pos, Node)>, Option<(String, Pos)>, Pos, usize),
}

/// Parses one YAML document into a [`Node`]. An empty document is an
/// empty mapping; more than one document is an error.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut docs = 0usize;
    let mut nodes = 0usize;
    for ev in Parser::new_from_str(text) {
        let (ev, span) = ev.map_err(|e| SyntaxError {
            message: e.info().to_string(),
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
        })?;
        let pos = pos_of(&span);
        let done: Option<(Node, usize)> = match ev {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(SyntaxError {
                        message: "more than one YAML document (`---`): give one merge configuration per file"
                            .into(),
                        pos,
                    });
                }
                None
            }
            Event::Alias(id) => {
                let n = anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    message: "alias of an unknown anchor".into(),
                    pos,
                })?;
                nodes += n.count();
                Some((n, 0))
            }
            Event::Scalar(v, style, anchor, _tag) => Some((
                Node::Scalar {
                    text: v.into_owned(),
                    quoted: !matches!(style, ScalarStyle::Plain),
                    pos,
                },
                anchor,
            )),
            Event::SequenceStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError {
                        message: format!("nested deeper than {MAX_DEPTH} levels"),
                        pos,
                    });
                }
                stack.push(Frame::Seq(Vec::new(), pos, anchor));
                None
            }
            Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError {
                        message: format!("nested deeper than {MAX_DEPTH} levels"),
                        pos,
                    });
                }
                stack.push(Frame::Map(Vec::new(), None, pos, anchor));
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, p, anchor)) => Some((Node::Seq { items, pos: p }, anchor)),
                _ => unreachable!("the parser balances sequences"),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(entries, _, p, anchor)) => Some((Node::Map { entries, pos: p }, anchor)),
                _ => unreachable!("the parser balances mappings"),
            },
        };
        let Some((node, anchor)) = done else { continue };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(SyntaxError {
                message: format!("more than {MAX_NODES} nodes (aliases expanded)"),
                pos,
            });
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(items, ..)) => items.push(node),
            Some(Frame::Map(entries, key, ..)) => match key.take() {
                None => match node {
                    Node::Scalar { text, pos, .. } => {
                        if entries.iter().any(|(k, _, _)| *k == text) {
                            return Err(SyntaxError {
                                message: format!("duplicate key `{text}`"),
                                pos,
                            });
                        }
                        *key = Some((text, pos));
                    }
                    other => {
                        return Err(SyntaxError {
                            message: format!("a mapping key must be a scalar, found {}", other.kind()),
                            pos: other.pos(),
                        });
                    }
                },
                Some((k, kp)) => entries.push((k, kp, node)),
            },
        }
    }
    Ok(root.unwrap_or(Node::Map {
        entries: Vec::new(),
        pos: Pos { line: 1, col: 1 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_structure() {
        let n = parse("a: 1\nb:\n  - x\n  - 'y'\n").unwrap();
        let Node::Map { entries, .. } = n else { panic!() };
        assert_eq!(entries[0].0, "a");
        assert_eq!(entries[1].1, Pos { line: 2, col: 1 });
        let Node::Seq { items, .. } = &entries[1].2 else {
            panic!()
        };
        assert_eq!(
            items[1],
            Node::Scalar {
                text: "y".into(),
                quoted: true,
                pos: Pos { line: 4, col: 5 }
            }
        );
        assert_eq!(items[1].pos(), Pos { line: 4, col: 5 });
    }

    #[test]
    fn duplicate_keys_and_many_documents_are_errors() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate key `a`"), "{e}");
        assert_eq!(e.pos.line, 2);
        assert!(
            parse("a: 1\n---\nb: 2\n")
                .unwrap_err()
                .message
                .contains("more than one")
        );
        assert!(parse("a: [1, 2\n").is_err());
    }

    #[test]
    fn aliases_expand() {
        let n = parse("p: &w {weight: 0.5}\nq: *w\n").unwrap();
        let Node::Map { entries, .. } = n else { panic!() };
        assert_eq!(entries[0].2, entries[1].2);
    }
}
