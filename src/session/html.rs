//! The text of an HTML document, for a model that reads text: what an
//! HTML-only display (an IPython `HTML` object, a pandas Styler) shows.
//! A small tag stripper, not a parser: good enough for tables and prose.

/// The text of an HTML document: tags dropped (`<script>`, `<style>` and
/// comments with their content), table cells separated by tabs, block
/// elements on lines of their own, common entities decoded.
pub fn to_text(html: &str) -> String {
    #[rustfmt::skip]
    const BLOCKS: &[&str] = &[
        "p", "div", "br", "tr", "li", "ul", "ol", "table", "thead", "tbody", "tfoot", "caption",
        "h1", "h2", "h3", "h4", "h5", "h6", "pre", "hr", "blockquote", "section", "dt", "dd",
    ];
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        push_text(&mut out, &rest[..lt]);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |i| &after[i + 3..]);
            continue;
        }
        let Some(gt) = tag_end(rest) else {
            push_text(&mut out, rest);
            rest = "";
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if !closing && (name == "script" || name == "style") {
            let end = format!("</{name}");
            rest = match find_ascii_ci(rest, &end) {
                Some(i) => rest[i..].find('>').map_or("", |j| &rest[i + j + 1..]),
                None => "",
            };
            continue;
        }
        if BLOCKS.contains(&name.as_str()) {
            newline(&mut out);
        } else if !closing && (name == "td" || name == "th") {
            while out.ends_with(' ') {
                out.pop();
            }
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\t');
            }
        }
    }
    push_text(&mut out, rest);
    let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    let mut text = String::new();
    let mut blank = true;
    for line in lines {
        if line.trim().is_empty() {
            if !blank {
                text.push('\n');
            }
            blank = true;
            continue;
        }
        text.push_str(line.trim_start_matches(' '));
        text.push('\n');
        blank = false;
    }
    text.trim_end().to_string()
}

/// Where the tag starting at `s[0] == '<'` ends (quotes may hide a `>`).
fn tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices().skip(1) {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    hay.as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn newline(out: &mut String) {
    while out.ends_with(' ') || out.ends_with('\t') {
        out.pop();
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

/// Text between tags: whitespace runs become one space, entities decoded.
fn push_text(out: &mut String, text: &str) {
    let mut rest = text;
    while !rest.is_empty() {
        let c = rest.chars().next().expect("not empty");
        if c.is_whitespace() {
            if !(out.is_empty() || out.ends_with([' ', '\n', '\t'])) {
                out.push(' ');
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '&'
            && let Some(semi) = rest[..prefix(rest, 12)].find(';')
            && let Some(ch) = entity(&rest[1..semi])
        {
            out.push(ch);
            rest = &rest[semi + 1..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
}

fn entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => ' ',
        _ => {
            let num = name.strip_prefix('#')?;
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code)?
        }
    })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn prefix(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_text_drops_scripts_comments_and_tags() {
        assert_eq!(
            to_text(
                "<div>Title</div><!-- <b>no</b> --><script>var a = '<p>';</script>\
                 <p>one   two<br>three &lt;4&gt; &#233;&#x41;</p><SCRIPT>x</SCRIPT>tail"
            ),
            "Title\none two\nthree <4> éA\ntail"
        );
        assert_eq!(
            to_text("<a href='x>y'>link</a> &unknown; &amp"),
            "link &unknown; &amp"
        );
    }
}
