//! Turning a cell's kernel events into what the model reads.
//!
//! Pure logic, no I/O: stream text is merged in order, `clear_output` is
//! honoured, images are set aside to be saved as files, and ANSI colour codes
//! are removed from tracebacks.
//!
//! A rich display (or the last expression's value) is shown by its best
//! textual form: `text/plain`, unless that is only a default repr such as
//! `<IPython.core.display.Markdown object>`; then `text/markdown`, else
//! `text/latex`, else the text of `text/html`, whose document is also set
//! aside to be saved as `display_N.html` ([`Collector::take_html`]).

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

pub struct Collector {
    out: CellOutput,
    /// Which stream the last output element came from, for merging.
    last_stream: Option<bool>,
    /// The last stream text ended with `\r` (dropped when collapsing): text
    /// merged next into the same element starts by overwriting that line,
    /// however the kernel cut its messages.
    cr_pending: bool,
    /// A `clear_output(wait=True)` waiting for the next output.
    pending_clear: bool,
    /// Most bytes of stream text returned to the model.
    limit: usize,
    /// Bytes of text now in `out.output`.
    kept: usize,
    /// Set once the text outgrew `limit`: `out.output` is then the frozen head.
    overflow: Option<Overflow>,
    /// Full text not yet written to the spill file (drained by the caller).
    spill: String,
    /// Counts output events, so progress reports only send what is new.
    seq: u64,
    /// An HTML document to save as a file (taken by the caller).
    pending_html: Option<String>,
    /// HTML documents set aside so far.
    html_count: usize,
}

/// At most this many HTML displays of one call are saved as files.
pub const MAX_HTML_FILES: usize = 20;

/// The last part of an overflowing output, and how much was seen in all.
struct Overflow {
    tail: String,
    total: usize,
}

impl Collector {
    /// Keeps at most `limit` bytes of stream text: the head and the tail.
    pub fn new(limit: usize) -> Self {
        Self {
            out: CellOutput::default(),
            last_stream: None,
            cr_pending: false,
            pending_clear: false,
            limit: limit.max(64),
            kept: 0,
            overflow: None,
            spill: String::new(),
            seq: 0,
            pending_html: None,
            html_count: 0,
        }
    }

    pub fn push(&mut self, event: KernelEvent) {
        self.seq += 1;
        match event {
            KernelEvent::ClearOutput { wait: true } => self.pending_clear = true,
            KernelEvent::ClearOutput { wait: false } => self.clear(),
            KernelEvent::Stream { stderr, text } => {
                self.before_output();
                self.stream(stderr, &text);
            }
            KernelEvent::Display(data) => {
                self.before_output();
                self.last_stream = None;
                match shown(data) {
                    Shown::Image(img) => self.out.images.push(img),
                    Shown::Text(text) => self.stream_element(&text),
                    Shown::Html { text, html } => {
                        if !text.is_empty() {
                            self.stream_element(&text);
                        }
                        self.set_html_aside(html);
                    }
                    Shown::Nothing => {}
                }
            }
            KernelEvent::Result(data) => {
                if let Some(img) = image(&data) {
                    self.out.images.push(img);
                    self.out.result = plain(&data).map(|t| truncate_middle(&t, self.limit));
                    return;
                }
                self.out.result = match shown(data) {
                    Shown::Text(text) => Some(text),
                    Shown::Html { text, html } => {
                        self.set_html_aside(html);
                        Some(text)
                    }
                    Shown::Image(_) | Shown::Nothing => None,
                }
                .map(|t| truncate_middle(&t, self.limit));
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
                    let text = if evalue.is_empty() {
                        ename.clone()
                    } else {
                        format!("{ename}: {evalue}")
                    };
                    truncate_middle(&text, self.limit)
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

    fn stream(&mut self, stderr: bool, text: &str) {
        let merge = self.last_stream == Some(stderr) && !self.out.output.is_empty();
        let carried = merge && std::mem::take(&mut self.cr_pending);
        if self.overflow.is_none() {
            if !carried && !text.contains('\r') {
                if self.kept + text.len() <= self.limit {
                    self.kept += text.len();
                    match self.out.output.last_mut() {
                        Some(last) if merge => last.push_str(text),
                        _ => self.out.output.push(text.to_string()),
                    }
                    self.last_stream = Some(stderr);
                    return;
                }
            } else {
                // Measured once collapsed: a batch of progress redraws may
                // be long and still leave one short line.
                let prev = match self.out.output.last() {
                    Some(last) if merge => last.as_str(),
                    _ => "",
                };
                let mut joined = String::with_capacity(prev.len() + 1 + text.len());
                joined.push_str(prev);
                if carried {
                    joined.push('\r');
                }
                joined.push_str(text);
                let t = collapse_cr(&joined);
                let kept = self.kept - prev.len() + t.len();
                if kept <= self.limit {
                    self.kept = kept;
                    match self.out.output.last_mut() {
                        Some(last) if merge => *last = t,
                        _ => self.out.output.push(t),
                    }
                    self.cr_pending = text.ends_with('\r') || (carried && text.is_empty());
                    self.last_stream = Some(stderr);
                    return;
                }
            }
        }
        if carried {
            self.overflowing(&format!("\r{text}"));
        } else {
            self.overflowing(text);
        }
    }

    /// A display's text: its own element, also subject to the limit.
    fn stream_element(&mut self, text: &str) {
        if self.overflow.is_none() && self.kept + text.len() <= self.limit {
            self.kept += text.len();
            self.out.output.push(text.to_string());
        } else {
            self.overflowing(text);
        }
    }

    fn overflowing(&mut self, text: &str) {
        self.last_stream = None;
        self.spill.push_str(text);
        let keep = self.limit / 2;
        if let Some(ov) = &mut self.overflow {
            ov.total += text.len();
            ov.tail.push_str(text);
            if ov.tail.len() > keep * 2 {
                let start = ceil_boundary(&ov.tail, ov.tail.len() - keep);
                ov.tail.drain(..start);
            }
            return;
        }
        // First overflow: everything so far goes to the spill file (before
        // this text), the first `keep` bytes stay as the head, the last
        // `keep` bytes start the tail.
        let mut elems = std::mem::take(&mut self.out.output);
        let earlier: String = elems.concat();
        self.spill.insert_str(0, &earlier);
        elems.push(text.to_string());
        let all = elems.concat();
        let mut budget = keep;
        for e in elems {
            if budget == 0 {
                break;
            }
            let cut = floor_boundary(&e, budget);
            budget -= cut;
            self.out.output.push(e[..cut].to_string());
        }
        let tail_start = ceil_boundary(&all, all.len().saturating_sub(keep));
        self.overflow = Some(Overflow {
            tail: all[tail_start..].to_string(),
            total: all.len(),
        });
    }

    fn set_html_aside(&mut self, html: String) {
        if self.html_count < MAX_HTML_FILES {
            self.html_count += 1;
            self.pending_html = Some(html);
        } else if self.html_count == MAX_HTML_FILES {
            self.html_count += 1;
            self.stream_element(&format!(
                "[HTML output beyond the first {MAX_HTML_FILES} of this call is not saved]"
            ));
        }
    }

    /// The HTML document of the display just pushed, to be saved; say where
    /// with [`Collector::html_saved`].
    pub fn take_html(&mut self) -> Option<String> {
        self.pending_html.take()
    }

    /// Notes in the output where the HTML taken last was saved (`None`: it
    /// could not be).
    pub fn html_saved(&mut self, name: Option<&str>) {
        self.last_stream = None;
        match name {
            Some(name) => self.stream_element(&format!("[HTML output saved as {name}]")),
            None => self.stream_element("[HTML output could not be saved]"),
        }
    }

    /// How many events were pushed so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The newest output, up to about `max` bytes, starting at a line.
    pub fn recent(&self, max: usize) -> String {
        let text: &str = match &self.overflow {
            Some(ov) => &ov.tail,
            None => self.out.output.last().map(String::as_str).unwrap_or(""),
        };
        let start = ceil_boundary(text, text.len().saturating_sub(max));
        let cut = &text[start..];
        match (start > 0, cut.find('\n')) {
            (true, Some(i)) if i + 1 < cut.len() => cut[i + 1..].to_string(),
            _ => cut.to_string(),
        }
    }

    /// Text to append to the full-output file, if the output overflowed.
    pub fn take_spill(&mut self) -> Option<String> {
        (!self.spill.is_empty()).then(|| std::mem::take(&mut self.spill))
    }

    pub fn overflowed(&self) -> bool {
        self.overflow.is_some()
    }

    fn before_output(&mut self) {
        if std::mem::take(&mut self.pending_clear) {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.out.output.clear();
        self.last_stream = None;
        self.kept = 0;
        self.overflow = None;
    }

    /// The assembled output; `spilled_to` names the file with the full text.
    pub fn finish(mut self, spilled_to: Option<&str>) -> CellOutput {
        if let Some(ov) = self.overflow.take() {
            let keep = self.limit / 2;
            let tail = &ov.tail[ceil_boundary(&ov.tail, ov.tail.len().saturating_sub(keep))..];
            let head: usize = self.out.output.iter().map(String::len).sum();
            let omitted = ov.total.saturating_sub(head + tail.len());
            let saved = match spilled_to {
                Some(name) => format!("the full output is in the file {name}"),
                None => "the full output could not be saved".to_string(),
            };
            self.out.output.push(format!(
                "\n[... {omitted} characters of output omitted ({} in all); {saved} ...]\n",
                ov.total
            ));
            self.out.output.push(collapse_cr(tail));
        }
        self.out
    }
}

/// Progress bars redraw a line with `\r`: keep each line's last state.
fn collapse_cr(s: &str) -> String {
    if !s.contains('\r') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        // A trailing '\r' (bar about to redraw) keeps the current state.
        out.push_str(line.rsplit('\r').find(|p| !p.is_empty()).unwrap_or(""));
    }
    out
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Keeps the head and tail of a long text.
fn truncate_middle(s: &str, limit: usize) -> String {
    if s.len() <= limit {
        return s.to_string();
    }
    let head = floor_boundary(s, limit / 2);
    let tail = ceil_boundary(s, s.len() - limit / 2);
    format!(
        "{}\n[... {} characters omitted ...]\n{}",
        &s[..head],
        tail - head,
        &s[tail..]
    )
}

fn plain(data: &[MimeData]) -> Option<String> {
    data.iter()
        .find(|m| m.mime == "text/plain")
        .map(|m| m.data.clone())
}

/// What a rich display shows the model.
enum Shown {
    Image(Image),
    Text(String),
    /// Only HTML says more than a default repr: its text, and the document.
    Html {
        text: String,
        html: String,
    },
    Nothing,
}

fn shown(data: Vec<MimeData>) -> Shown {
    if let Some(img) = image(&data) {
        return Shown::Image(img);
    }
    let find = |mime: &str| data.iter().find(|m| m.mime == mime).map(|m| m.data.clone());
    let plain = find("text/plain");
    if let Some(p) = plain.as_ref().filter(|p| !is_default_repr(p)) {
        return Shown::Text(p.clone());
    }
    if let Some(text) = find("text/markdown").or_else(|| find("text/latex")) {
        return Shown::Text(text);
    }
    if let Some(html) = find("text/html") {
        return Shown::Html {
            text: super::html::to_text(&html),
            html,
        };
    }
    plain.map_or(Shown::Nothing, Shown::Text)
}

/// `<IPython.core.display.Markdown object>`, `<pandas...Styler at 0x7f...>`:
/// the repr Python gives objects that define no better one.
fn is_default_repr(plain: &str) -> bool {
    let t = plain.trim();
    t.starts_with('<')
        && t.ends_with('>')
        && !t.contains('\n')
        && (t.contains(" object") || t.contains(" at 0x"))
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
        let mut c = Collector::new(20_000);
        c.push(stream(false, "a\n"));
        c.push(stream(false, "b\n"));
        c.push(stream(true, "warn\n"));
        c.push(stream(false, "c\n"));
        assert_eq!(c.finish(None).output, vec!["a\nb\n", "warn\n", "c\n"]);
    }

    #[test]
    fn clear_output_is_honoured() {
        let mut c = Collector::new(20_000);
        c.push(stream(false, "10%"));
        c.push(KernelEvent::ClearOutput { wait: true });
        c.push(stream(false, "100%"));
        c.push(KernelEvent::ClearOutput { wait: false });
        c.push(stream(false, "done"));
        assert_eq!(c.finish(None).output, vec!["done"]);
    }

    #[test]
    fn an_error_without_message_is_its_name() {
        let mut c = Collector::new(20_000);
        c.push(KernelEvent::Error {
            ename: "KeyboardInterrupt".into(),
            evalue: String::new(),
            traceback: vec![],
        });
        assert_eq!(c.finish(None).error.as_deref(), Some("KeyboardInterrupt"));
    }

    #[test]
    fn errors_have_clean_tracebacks() {
        let mut c = Collector::new(20_000);
        c.push(KernelEvent::Error {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "\u{1b}[0;31mZeroDivisionError\u{1b}[0m   Traceback\nline 2".into(),
                "\u{1b}]8;;file:///x\u{7}link\u{1b}]8;;\u{7} text".into(),
            ],
        });
        let out = c.finish(None);
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
        let mut c = Collector::new(20_000);
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
        let out = c.finish(None);
        assert_eq!(out.images.len(), 1);
        assert_eq!(out.images[0].ext, "png");
        assert_eq!(out.images[0].bytes, vec![0x89, 0x50, 0x4e, 0x47]);
        assert_eq!(out.output, vec!["   a\n0  1"]);
        assert_eq!(out.result.as_deref(), Some("42"));
    }
    fn bundle(items: &[(&str, &str)]) -> Vec<MimeData> {
        items
            .iter()
            .map(|(m, d)| MimeData {
                mime: m.to_string(),
                data: d.to_string(),
            })
            .collect()
    }

    #[test]
    fn markdown_and_latex_replace_default_reprs() {
        let mut c = Collector::new(20_000);
        c.push(KernelEvent::Display(bundle(&[
            ("text/plain", "<IPython.core.display.Markdown object>"),
            ("text/markdown", "# hi"),
        ])));
        c.push(KernelEvent::Display(bundle(&[
            ("text/plain", "<IPython.core.display.Math object>"),
            ("text/latex", "$\\displaystyle x^2$"),
        ])));
        // A meaningful plain text (sympy's) stays.
        c.push(KernelEvent::Result(bundle(&[
            ("text/plain", "2*sqrt(2)"),
            ("text/latex", "$\\displaystyle 2 \\sqrt{2}$"),
        ])));
        assert!(c.take_html().is_none());
        let out = c.finish(None);
        assert_eq!(out.output, vec!["# hi", "$\\displaystyle x^2$"]);
        assert_eq!(out.result.as_deref(), Some("2*sqrt(2)"));
    }

    #[test]
    fn html_only_displays_are_set_aside_with_their_text() {
        let mut c = Collector::new(20_000);
        // A DataFrame: its plain text is the table, no file.
        c.push(KernelEvent::Display(bundle(&[
            ("text/plain", "   a\n0  1"),
            ("text/html", "<table><tr><td>1</td></tr></table>"),
        ])));
        assert!(c.take_html().is_none());
        let styler = "<style>td {color: red}</style><table><thead><tr><th>a</th><th>b</th></tr></thead>\
                      <tbody><tr><td>1</td><td>x &amp; y</td></tr></tbody></table>";
        c.push(KernelEvent::Display(bundle(&[
            ("text/plain", "<pandas.io.formats.style.Styler at 0x7f00>"),
            ("text/html", styler),
        ])));
        assert_eq!(c.take_html().as_deref(), Some(styler));
        c.html_saved(Some("display_1.html"));
        c.push(KernelEvent::Result(bundle(&[
            ("text/plain", "<IPython.core.display.HTML object>"),
            ("text/html", "<b>bold</b>"),
        ])));
        assert_eq!(c.take_html().as_deref(), Some("<b>bold</b>"));
        c.html_saved(None);
        let out = c.finish(None);
        assert_eq!(
            out.output,
            vec![
                "   a\n0  1",
                "a\tb\n1\tx & y",
                "[HTML output saved as display_1.html]",
                "[HTML output could not be saved]",
            ]
        );
        assert_eq!(out.result.as_deref(), Some("bold"));
    }

    #[test]
    fn html_files_per_call_are_bounded() {
        let mut c = Collector::new(20_000);
        for _ in 0..MAX_HTML_FILES + 3 {
            c.push(KernelEvent::Display(bundle(&[("text/html", "<i>x</i>")])));
            if c.take_html().is_some() {
                c.html_saved(Some("display_n.html"));
            }
        }
        let out = c.finish(None).output;
        assert_eq!(
            out.iter().filter(|o| o.contains("saved as")).count(),
            MAX_HTML_FILES
        );
        assert_eq!(out.iter().filter(|o| o.contains("not saved")).count(), 1);
    }

    #[test]
    fn carriage_returns_collapse_to_the_last_state() {
        let mut c = Collector::new(20_000);
        c.push(stream(false, "start\n"));
        for i in 0..=100 {
            c.push(stream(false, &format!("\r{i:3}%|")));
        }
        c.push(stream(false, "\nend\n"));
        assert_eq!(c.finish(None).output, vec!["start\n100%|\nend\n"]);
    }

    #[test]
    fn carriage_returns_collapse_across_messages() {
        // `print(f"{i}%", end="\r", flush=True)`, cut into messages anywhere.
        let mut c = Collector::new(20_000);
        c.push(stream(false, "start\n0%\r1%\r"));
        c.push(stream(false, "2%\r3"));
        c.push(stream(false, "%\r"));
        c.push(stream(false, "4%\r"));
        c.push(stream(false, ""));
        c.push(stream(false, "100%\r"));
        c.push(stream(false, "\nend\n"));
        assert_eq!(c.finish(None).output, vec!["start\n100%\nend\n"]);
    }

    #[test]
    fn a_long_batch_of_redraws_counts_as_its_last_state() {
        let mut c = Collector::new(100);
        let bar: String = (0..=1000).map(|i| format!("{i}%\r")).collect();
        c.push(stream(false, "start\n"));
        c.push(stream(false, &bar));
        c.push(stream(false, "\n"));
        assert!(!c.overflowed());
        assert_eq!(c.finish(None).output, vec!["start\n1000%\n"]);
    }

    #[test]
    fn huge_output_keeps_head_and_tail_and_spills_everything() {
        let mut c = Collector::new(1000);
        let mut spilled = String::new();
        let mut all = String::new();
        for i in 0..10_000 {
            let line = format!("line {i}\n");
            all.push_str(&line);
            c.push(stream(false, &line));
            if let Some(s) = c.take_spill() {
                spilled.push_str(&s);
            }
        }
        assert!(c.overflowed());
        assert_eq!(spilled, all);
        let out = c.finish(Some("output_1.txt")).output;
        let joined = out.concat();
        assert!(joined.len() < 1200, "{}", joined.len());
        assert!(joined.starts_with("line 0\n"));
        assert!(joined.ends_with("line 9999\n"));
        assert!(joined.contains("characters of output omitted"));
        assert!(joined.contains("output_1.txt"));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut c = Collector::new(100);
        for _ in 0..200 {
            c.push(stream(false, "äöü€"));
        }
        let out = c.finish(None).output.concat();
        assert!(out.contains("omitted"));
        assert!(out.starts_with('ä'));
    }
}
