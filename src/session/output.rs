//! Turning a cell's kernel events into what the model reads.
//!
//! Pure logic, no I/O: stream text is merged in order, `clear_output` is
//! honoured, images are set aside to be saved as files, and ANSI colour codes
//! are removed from tracebacks.

use base64::Engine;

use crate::kernel::{KernelEvent, MimeData};

/// An image a cell displayed, to be saved in the session folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub ext: &'static str,
    pub bytes: Vec<u8>,
}

/// Everything a cell showed, assembled.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CellOutput {
    /// stdout/stderr and textual displays, in order; consecutive chunks of
    /// the same stream are merged.
    pub output: Vec<String>,
    /// `text/plain` of the last expression's value.
    pub result: Option<String>,
    /// `ExceptionName: message`.
    pub error: Option<String>,
    /// Traceback lines without ANSI codes.
    pub traceback: Vec<String>,
    pub images: Vec<Image>,
}

#[derive(Default)]
pub struct Collector {
    out: CellOutput,
    /// Which stream the last output element came from, for merging.
    last_stream: Option<bool>,
    /// A `clear_output(wait=True)` waiting for the next output.
    pending_clear: bool,
}

impl Collector {
    pub fn push(&mut self, event: KernelEvent) {
        match event {
            KernelEvent::ClearOutput { wait: true } => self.pending_clear = true,
            KernelEvent::ClearOutput { wait: false } => self.clear(),
            KernelEvent::Stream { stderr, text } => {
                self.before_output();
                match (self.last_stream, self.out.output.last_mut()) {
                    (Some(s), Some(last)) if s == stderr => last.push_str(&text),
                    _ => self.out.output.push(text),
                }
                self.last_stream = Some(stderr);
            }
            KernelEvent::Display(data) => {
                self.before_output();
                self.last_stream = None;
                if let Some(img) = image(&data) {
                    self.out.images.push(img);
                } else if let Some(text) = plain(&data) {
                    self.out.output.push(text);
                }
            }
            KernelEvent::Result(data) => {
                if let Some(img) = image(&data) {
                    self.out.images.push(img);
                }
                self.out.result = plain(&data);
            }
            KernelEvent::Error {
                ename,
                evalue,
                traceback,
            } => {
                self.out.error = Some(if ename == "StdinNotImplementedError" {
                    format!(
                        "{ename}: this interpreter has no interactive input (input(), getpass()); \
                         pass values in code instead"
                    )
                } else {
                    format!("{ename}: {evalue}")
                });
                self.out.traceback = traceback
                    .iter()
                    .flat_map(|t| {
                        strip_ansi(t)
                            .lines()
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    })
                    .collect();
            }
        }
    }

    fn before_output(&mut self) {
        if std::mem::take(&mut self.pending_clear) {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.out.output.clear();
        self.last_stream = None;
    }

    pub fn finish(self) -> CellOutput {
        self.out
    }
}

fn plain(data: &[MimeData]) -> Option<String> {
    data.iter()
        .find(|m| m.mime == "text/plain")
        .map(|m| m.data.clone())
}

fn image(data: &[MimeData]) -> Option<Image> {
    for (mime, ext) in [
        ("image/png", "png"),
        ("image/jpeg", "jpg"),
        ("image/gif", "gif"),
    ] {
        if let Some(m) = data.iter().find(|m| m.mime == mime) {
            let cleaned: String = m.data.chars().filter(|c| !c.is_whitespace()).collect();
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(cleaned) {
                return Some(Image { ext, bytes });
            }
        }
    }
    data.iter()
        .find(|m| m.mime == "image/svg+xml")
        .map(|m| Image {
            ext: "svg",
            bytes: m.data.clone().into_bytes(),
        })
}

/// Removes ANSI escape sequences (CSI `ESC [ ... letter` and two-byte escapes).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                // OSC: up to BEL or ESC \.
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stderr: bool, t: &str) -> KernelEvent {
        KernelEvent::Stream {
            stderr,
            text: t.into(),
        }
    }

    #[test]
    fn streams_merge_in_order() {
        let mut c = Collector::default();
        c.push(stream(false, "a\n"));
        c.push(stream(false, "b\n"));
        c.push(stream(true, "warn\n"));
        c.push(stream(false, "c\n"));
        assert_eq!(c.finish().output, vec!["a\nb\n", "warn\n", "c\n"]);
    }

    #[test]
    fn clear_output_is_honoured() {
        let mut c = Collector::default();
        c.push(stream(false, "10%"));
        c.push(KernelEvent::ClearOutput { wait: true });
        c.push(stream(false, "100%"));
        c.push(KernelEvent::ClearOutput { wait: false });
        c.push(stream(false, "done"));
        assert_eq!(c.finish().output, vec!["done"]);
    }

    #[test]
    fn errors_have_clean_tracebacks() {
        let mut c = Collector::default();
        c.push(KernelEvent::Error {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "\u{1b}[0;31mZeroDivisionError\u{1b}[0m   Traceback\nline 2".into(),
                "\u{1b}]8;;file:///x\u{7}link\u{1b}]8;;\u{7} text".into(),
            ],
        });
        let out = c.finish();
        assert_eq!(
            out.error.as_deref(),
            Some("ZeroDivisionError: division by zero")
        );
        assert_eq!(
            out.traceback,
            vec!["ZeroDivisionError   Traceback", "line 2", "link text"]
        );
    }

    #[test]
    fn images_are_decoded_and_text_displays_kept() {
        let mut c = Collector::default();
        c.push(KernelEvent::Display(vec![
            MimeData {
                mime: "text/plain".into(),
                data: "<Figure>".into(),
            },
            MimeData {
                mime: "image/png".into(),
                data: "iVBO\nRw==".into(),
            },
        ]));
        c.push(KernelEvent::Display(vec![MimeData {
            mime: "text/plain".into(),
            data: "   a\n0  1".into(),
        }]));
        c.push(KernelEvent::Result(vec![MimeData {
            mime: "text/plain".into(),
            data: "42".into(),
        }]));
        let out = c.finish();
        assert_eq!(out.images.len(), 1);
        assert_eq!(out.images[0].ext, "png");
        assert_eq!(out.images[0].bytes, vec![0x89, 0x50, 0x4e, 0x47]);
        assert_eq!(out.output, vec!["   a\n0  1"]);
        assert_eq!(out.result.as_deref(), Some("42"));
    }
}
