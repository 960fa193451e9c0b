//! A session's history: per completed call, its code, whether it succeeded,
//! and its outputs (streams, displays, the last expression's value, the
//! error), in order; and that history written as a Jupyter notebook.
//!
//! [`Recorder`] collects one call's outputs from the kernel's events (with
//! `clear_output` honoured); [`History::record`] keeps the finished cell;
//! [`History::cells`] reads code and success back (e.g. to replay the code
//! of successful cells in a new kernel); [`History::to_notebook`] writes
//! nbformat 4.5 JSON. Building that JSON here is deliberate: a notebook is a
//! file format the session writes into its folder, not MCP, which only
//! `src/mcp` speaks.
//!
//! Bounded, so a long session cannot grow the server without limit:
//!
//! - stream text of one cell: the server's output limit
//!   (`--max-output-chars`), then a note; the full text of a longer output
//!   is in its `output_N.txt` file;
//! - one representation of one output (an image, a big HTML table): at most
//!   [`MAX_ITEM_BYTES`], else left out with a note (the figure file is kept
//!   in the session folder);
//! - all outputs of all cells: [`MAX_OUTPUT_BYTES`]; over it, the outputs
//!   of the oldest cells are dropped first (their code is kept) and replaced
//!   by a note;
//! - cells: [`MAX_CELLS`], code of all cells: [`MAX_CODE_BYTES`]; over
//!   either, the oldest cells are dropped whole and counted
//!   ([`History::dropped`]); the notebook then starts with a note saying so.

use std::collections::VecDeque;

use serde_json::{Map, Value, json};

use crate::kernel::{KernelEvent, MimeData};

/// Most cells kept.
pub const MAX_CELLS: usize = 1000;
/// Most bytes of code of all kept cells.
pub const MAX_CODE_BYTES: usize = 4 * 1024 * 1024;
/// Most bytes of outputs of all kept cells (images count by their base64 size).
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024 * 1024;
/// Most bytes of one representation of one output (e.g. one image).
pub const MAX_ITEM_BYTES: usize = 2 * 1024 * 1024;

/// One output of a cell, in the order the kernel sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stream {
        stderr: bool,
        text: String,
    },
    /// A rich display: its representations by MIME type.
    Display(Vec<MimeData>),
    /// The value of the cell's last expression.
    Result(Vec<MimeData>),
    /// The cell raised, timed out, or its kernel died.
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
    /// What was left out to keep the history bounded, said in words.
    Omitted(String),
}

/// One completed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The code as it was sent.
    pub code: String,
    /// Whether the call succeeded (no exception, timeout or kernel death).
    pub success: bool,
    /// 1 for the session's first call, then one more per call.
    pub execution_count: u64,
    pub outputs: Vec<Output>,
}

/// The completed calls of one session, oldest first.
#[derive(Debug, Default)]
pub struct History {
    cells: VecDeque<Cell>,
    /// Cells dropped from the front to stay within the bounds.
    dropped: usize,
    /// Execution count of the last recorded cell.
    count: u64,
    code_bytes: usize,
    output_bytes: usize,
}

impl History {
    /// Keeps a completed call; drops what the bounds require.
    pub fn record(&mut self, code: String, success: bool, outputs: Vec<Output>) {
        self.count += 1;
        self.code_bytes += code.len();
        self.output_bytes += outputs_size(&outputs);
        self.cells.push_back(Cell {
            code,
            success,
            execution_count: self.count,
            outputs,
        });
        while self.cells.len() > MAX_CELLS || self.code_bytes > MAX_CODE_BYTES {
            let Some(old) = self.cells.pop_front() else {
                break;
            };
            self.code_bytes -= old.code.len();
            self.output_bytes -= outputs_size(&old.outputs);
            self.dropped += 1;
        }
        for cell in self.cells.iter_mut() {
            if self.output_bytes <= MAX_OUTPUT_BYTES {
                break;
            }
            if matches!(cell.outputs.as_slice(), [Output::Omitted(_)] | []) {
                continue;
            }
            let note = vec![Output::Omitted(
                "[the outputs of this cell were dropped to keep the session's history bounded]"
                    .into(),
            )];
            self.output_bytes -= outputs_size(&cell.outputs);
            self.output_bytes += outputs_size(&note);
            cell.outputs = note;
        }
    }

    /// The kept cells, oldest first.
    pub fn cells(&self) -> impl Iterator<Item = &Cell> {
        self.cells.iter()
    }

    /// How many of the oldest cells were dropped to stay within the bounds.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The history as a Jupyter notebook (nbformat 4.5, JSON text).
    pub fn to_notebook(&self) -> String {
        let mut cells: Vec<Value> = Vec::with_capacity(self.cells.len() + 1);
        if self.dropped > 0 {
            cells.push(json!({
                "cell_type": "markdown",
                "id": "dropped-cells",
                "metadata": {},
                "source": format!(
                    "*The {} earliest calls of this session are not included: the server \
                     keeps the last {MAX_CELLS} calls and {} MiB of code.*",
                    self.dropped,
                    MAX_CODE_BYTES / (1024 * 1024)
                ),
            }));
        }
        for cell in &self.cells {
            cells.push(json!({
                "cell_type": "code",
                "id": format!("cell-{}", cell.execution_count),
                "metadata": {},
                "execution_count": cell.execution_count,
                "source": cell.code,
                "outputs": cell
                    .outputs
                    .iter()
                    .map(|o| output_json(o, cell.execution_count))
                    .collect::<Vec<_>>(),
            }));
        }
        let notebook = json!({
            "nbformat": 4,
            "nbformat_minor": 5,
            "metadata": {
                "kernelspec": {
                    "name": "python3",
                    "display_name": "Python 3 (ipykernel)",
                    "language": "python",
                },
                "language_info": { "name": "python" },
            },
            "cells": cells,
        });
        let mut text = serde_json::to_string_pretty(&notebook).expect("JSON values serialise");
        text.push('\n');
        text
    }
}

fn output_json(output: &Output, execution_count: u64) -> Value {
    match output {
        Output::Stream { stderr, text } => json!({
            "output_type": "stream",
            "name": if *stderr { "stderr" } else { "stdout" },
            "text": text,
        }),
        Output::Display(data) => json!({
            "output_type": "display_data",
            "data": bundle(data),
            "metadata": {},
        }),
        Output::Result(data) => json!({
            "output_type": "execute_result",
            "execution_count": execution_count,
            "data": bundle(data),
            "metadata": {},
        }),
        Output::Error {
            ename,
            evalue,
            traceback,
        } => json!({
            "output_type": "error",
            "ename": ename,
            "evalue": evalue,
            "traceback": traceback,
        }),
        Output::Omitted(note) => json!({
            "output_type": "display_data",
            "data": { "text/plain": note },
            "metadata": {},
        }),
    }
}

/// A MIME bundle: JSON types as JSON values (as nbformat requires), the
/// rest as text (base64 for binary images).
fn bundle(data: &[MimeData]) -> Value {
    let mut map = Map::new();
    for m in data {
        let value = if is_json_mime(&m.mime) {
            match serde_json::from_str::<Value>(&m.data) {
                Ok(v) => v,
                Err(_) => continue,
            }
        } else {
            Value::String(m.data.clone())
        };
        map.insert(m.mime.clone(), value);
    }
    Value::Object(map)
}

/// `application/json` and `application/…+json` (nbformat's rule).
fn is_json_mime(mime: &str) -> bool {
    mime.strip_prefix("application/")
        .is_some_and(|rest| rest == "json" || rest.ends_with("+json"))
}

fn outputs_size(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .map(|o| match o {
            Output::Stream { text, .. } => text.len(),
            Output::Display(data) | Output::Result(data) => {
                data.iter().map(|m| m.mime.len() + m.data.len()).sum()
            }
            Output::Error {
                ename,
                evalue,
                traceback,
            } => ename.len() + evalue.len() + traceback.iter().map(String::len).sum::<usize>(),
            Output::Omitted(note) => note.len(),
        })
        .sum()
}

/// Collects one call's outputs for the history, bounded.
#[derive(Debug)]
pub struct Recorder {
    outputs: Vec<Output>,
    /// A `clear_output(wait=True)` waiting for the next output.
    pending_clear: bool,
    /// Stream and traceback text kept so far, and the most kept.
    text_bytes: usize,
    text_limit: usize,
    /// Set once stream text was cut (noted once).
    cut: bool,
}

impl Recorder {
    /// Keeps at most `text_limit` bytes of stream text (and as much traceback).
    pub fn new(text_limit: usize) -> Self {
        Self {
            outputs: Vec::new(),
            pending_clear: false,
            text_bytes: 0,
            text_limit,
            cut: false,
        }
    }

    pub fn push(&mut self, event: &KernelEvent) {
        match event {
            KernelEvent::ClearOutput { wait: true } => self.pending_clear = true,
            KernelEvent::ClearOutput { wait: false } => self.clear(),
            KernelEvent::Stream { stderr, text } => {
                self.before_output();
                self.stream(*stderr, text);
            }
            KernelEvent::Display(data) => {
                self.before_output();
                let data = self.bounded(data);
                if !data.is_empty() {
                    self.outputs.push(Output::Display(data));
                }
            }
            KernelEvent::Result(data) => {
                let data = self.bounded(data);
                if !data.is_empty() {
                    self.outputs.push(Output::Result(data));
                }
            }
            KernelEvent::Error {
                ename,
                evalue,
                traceback,
            } => {
                let mut kept = Vec::new();
                let mut bytes = 0;
                for line in traceback {
                    if bytes + line.len() > self.text_limit {
                        kept.push(format!(
                            "[... {} more traceback entries left out ...]",
                            traceback.len() - kept.len()
                        ));
                        break;
                    }
                    bytes += line.len();
                    kept.push(line.clone());
                }
                self.outputs.push(Output::Error {
                    ename: ename.clone(),
                    evalue: evalue.clone(),
                    traceback: kept,
                });
            }
        }
    }

    fn stream(&mut self, stderr: bool, text: &str) {
        if self.cut {
            return;
        }
        let room = self.text_limit.saturating_sub(self.text_bytes);
        let mut keep = text.len().min(room);
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        let kept = &text[..keep];
        self.text_bytes += kept.len();
        match self.outputs.last_mut() {
            Some(Output::Stream { stderr: s, text: t }) if *s == stderr => t.push_str(kept),
            _ if kept.is_empty() => {}
            _ => self.outputs.push(Output::Stream {
                stderr,
                text: kept.to_string(),
            }),
        }
        if keep < text.len() {
            self.cut = true;
            self.outputs.push(Output::Omitted(
                "[the rest of this cell's output is left out of the history; \
                 the full text is in the session's output_N.txt file]"
                    .into(),
            ));
        }
    }

    /// The representations of a display within [`MAX_ITEM_BYTES`] each.
    fn bounded(&mut self, data: &[MimeData]) -> Vec<MimeData> {
        let mut kept = Vec::with_capacity(data.len());
        for m in data {
            if m.data.len() <= MAX_ITEM_BYTES {
                kept.push(m.clone());
            } else {
                self.outputs.push(Output::Omitted(format!(
                    "[a {} output of {} bytes is left out of the history (over {} bytes); \
                     images are kept as files in the session folder]",
                    m.mime,
                    m.data.len(),
                    MAX_ITEM_BYTES
                )));
            }
        }
        kept
    }

    fn before_output(&mut self) {
        if std::mem::take(&mut self.pending_clear) {
            self.clear();
        }
    }

    fn clear(&mut self) {
        // Errors and results are not cleared by clear_output in Jupyter
        // either; they come after the displays they would clear anyway.
        self.outputs
            .retain(|o| matches!(o, Output::Error { .. } | Output::Result(_)));
        self.text_bytes = 0;
        self.cut = false;
    }

    /// The outputs; `error` is the call's error as the model read it
    /// (`Name: message`), recorded when the kernel sent none (a timeout, a
    /// dead kernel, the disk quota).
    pub fn finish(mut self, error: Option<&str>) -> Vec<Output> {
        let has_error = self
            .outputs
            .iter()
            .any(|o| matches!(o, Output::Error { .. }));
        if let (Some(error), false) = (error, has_error) {
            let (ename, evalue) = error.split_once(": ").unwrap_or((error, ""));
            self.outputs.push(Output::Error {
                ename: ename.to_string(),
                evalue: evalue.to_string(),
                traceback: Vec::new(),
            });
        }
        self.outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(t: &str) -> KernelEvent {
        KernelEvent::Stream {
            stderr: false,
            text: t.into(),
        }
    }

    fn mime(mime: &str, data: &str) -> MimeData {
        MimeData {
            mime: mime.into(),
            data: data.into(),
        }
    }

    #[test]
    fn recorder_keeps_order_and_merges_streams() {
        let mut r = Recorder::new(1000);
        r.push(&stream("a"));
        r.push(&stream("b\n"));
        r.push(&KernelEvent::Display(vec![mime("image/png", "iVBO")]));
        r.push(&KernelEvent::Stream {
            stderr: true,
            text: "warn\n".into(),
        });
        r.push(&KernelEvent::Result(vec![mime("text/plain", "42")]));
        let out = r.finish(None);
        assert_eq!(
            out,
            vec![
                Output::Stream {
                    stderr: false,
                    text: "ab\n".into()
                },
                Output::Display(vec![mime("image/png", "iVBO")]),
                Output::Stream {
                    stderr: true,
                    text: "warn\n".into()
                },
                Output::Result(vec![mime("text/plain", "42")]),
            ]
        );
    }

    #[test]
    fn recorder_bounds_text_and_items_and_honours_clear_output() {
        let mut r = Recorder::new(10);
        r.push(&stream("0123456789abcdef"));
        r.push(&stream("more"));
        let big = "x".repeat(MAX_ITEM_BYTES + 1);
        r.push(&KernelEvent::Display(vec![
            mime("text/plain", "<Figure>"),
            mime("image/png", &big),
        ]));
        let out = r.finish(Some("TimeoutError: too slow"));
        assert_eq!(
            out[0],
            Output::Stream {
                stderr: false,
                text: "0123456789".into()
            }
        );
        assert!(matches!(&out[1], Output::Omitted(n) if n.contains("output_N.txt")));
        assert!(matches!(&out[2], Output::Omitted(n) if n.contains("image/png")));
        assert_eq!(
            out[3],
            Output::Display(vec![mime("text/plain", "<Figure>")])
        );
        assert_eq!(
            out[4],
            Output::Error {
                ename: "TimeoutError".into(),
                evalue: "too slow".into(),
                traceback: vec![]
            }
        );

        let mut r = Recorder::new(100);
        r.push(&stream("10%"));
        r.push(&KernelEvent::ClearOutput { wait: true });
        r.push(&stream("100%"));
        assert_eq!(
            r.finish(None),
            vec![Output::Stream {
                stderr: false,
                text: "100%".into()
            }]
        );
    }

    #[test]
    fn history_drops_oldest_outputs_then_oldest_cells() {
        let mut h = History::default();
        let big = "y".repeat(MAX_OUTPUT_BYTES / 2 - 1000);
        for i in 0..3 {
            h.record(
                format!("print({i})"),
                true,
                vec![Output::Stream {
                    stderr: false,
                    text: big.clone(),
                }],
            );
        }
        let cells: Vec<&Cell> = h.cells().collect();
        assert!(matches!(cells[0].outputs[..], [Output::Omitted(_)]));
        assert!(matches!(cells[1].outputs[..], [Output::Stream { .. }]));
        assert!(matches!(cells[2].outputs[..], [Output::Stream { .. }]));
        assert!(h.output_bytes <= MAX_OUTPUT_BYTES);

        let mut h = History::default();
        for i in 0..MAX_CELLS + 5 {
            h.record(format!("x = {i}"), i % 2 == 0, Vec::new());
        }
        assert_eq!(h.len(), MAX_CELLS);
        assert_eq!(h.dropped(), 5);
        let first = h.cells().next().unwrap();
        assert_eq!((first.code.as_str(), first.success), ("x = 5", false));
        assert_eq!(first.execution_count, 6);
        assert!(h.to_notebook().contains("The 5 earliest calls"));
    }

    #[test]
    fn notebooks_are_nbformat_4_5() {
        let mut h = History::default();
        h.record(
            "import json\nprint('hi')\n{'a': 1}".into(),
            true,
            vec![
                Output::Stream {
                    stderr: false,
                    text: "hi\n".into(),
                },
                Output::Display(vec![
                    mime("image/png", "iVBO"),
                    mime("application/json", "{\"a\": 1}"),
                ]),
                Output::Result(vec![mime("text/plain", "{'a': 1}")]),
            ],
        );
        h.record(
            "1/0".into(),
            false,
            vec![Output::Error {
                ename: "ZeroDivisionError".into(),
                evalue: "division by zero".into(),
                traceback: vec!["line".into()],
            }],
        );
        let nb: Value = serde_json::from_str(&h.to_notebook()).unwrap();
        assert_eq!(
            (nb["nbformat"].as_u64(), nb["nbformat_minor"].as_u64()),
            (Some(4), Some(5))
        );
        let cells = nb["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 2);
        assert_eq!(cells[0]["id"], "cell-1");
        assert_eq!(cells[0]["execution_count"], 1);
        assert_eq!(cells[0]["source"], "import json\nprint('hi')\n{'a': 1}");
        let outs = cells[0]["outputs"].as_array().unwrap();
        assert_eq!(outs[0]["output_type"], "stream");
        assert_eq!(outs[0]["name"], "stdout");
        assert_eq!(outs[1]["output_type"], "display_data");
        assert_eq!(outs[1]["data"]["image/png"], "iVBO");
        assert_eq!(outs[1]["data"]["application/json"]["a"], 1);
        assert_eq!(outs[2]["output_type"], "execute_result");
        assert_eq!(outs[2]["execution_count"], 1);
        let err = &cells[1]["outputs"][0];
        assert_eq!(err["output_type"], "error");
        assert_eq!(err["ename"], "ZeroDivisionError");
        assert_eq!(err["traceback"][0], "line");
    }
}
