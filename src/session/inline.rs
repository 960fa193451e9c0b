//! Images returned inline with a call's result, so clients that show images
//! (and multimodal models) see a figure without fetching its file.
//!
//! Which images: every image the cell displayed (saved as `figure_N.png`),
//! then PNG, JPEG and GIF files the call created or changed, at most
//! [`InlineBudget::max_images`] per call. Each is fitted to the budget: an
//! image over the pixel limits, or over the byte limit, is scaled down (and
//! re-encoded, as JPEG if PNG stays too big); the file on disk keeps its full
//! size. SVG is never inlined (vision models and most clients take raster
//! images only). Decoding runs on a blocking thread, with the decoder's
//! memory bounded.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use crate::workspace::{FileInfo, Workspace};

/// Files bigger than this are not read to be inlined.
const MAX_SOURCE_BYTES: u64 = 32 * 1024 * 1024;
/// Images wider or taller than this are not decoded.
const MAX_SOURCE_SIDE: u32 = 16_384;
/// Most memory one decode may allocate.
const MAX_DECODE_ALLOC: u64 = 256 * 1024 * 1024;
/// Each retry of an image still too big in bytes shrinks it by this factor.
const SHRINK: f64 = 0.75;
/// Retries before an image is given up on.
const MAX_SHRINKS: usize = 8;
/// JPEG quality for images that PNG cannot fit into the byte budget.
const JPEG_QUALITY: u8 = 85;

/// How many images a call returns inline, and how big each may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineBudget {
    /// Most images per call; 0 turns inline images off.
    pub max_images: usize,
    /// Longest side of an inline image, in pixels.
    pub max_side: u32,
    /// Most pixels (width × height) of an inline image.
    pub max_pixels: u64,
    /// Most bytes of one encoded inline image (before base64).
    pub max_bytes: usize,
}

impl Default for InlineBudget {
    /// 4 images of at most 1568 px a side and 1.15 megapixels (what common
    /// vision models take without scaling themselves) and 1 MB each.
    fn default() -> Self {
        Self {
            max_images: 4,
            max_side: 1568,
            max_pixels: 1_150_000,
            max_bytes: 1_000_000,
        }
    }
}

/// An image to return with the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineImage {
    /// The session file it shows (relative path).
    pub file: String,
    /// `image/png`, `image/jpeg` or `image/gif`.
    pub mime: &'static str,
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The file's own size, when the inline copy was scaled down.
    pub scaled_from: Option<(u32, u32)>,
}

/// Picks the call's inline images: `shown` (images the cell displayed, each
/// with the file it was saved as) first, then image files among `files`.
/// Returns them with notes for the model (scaled or left out).
pub async fn choose(
    workspace: &Workspace,
    shown: Vec<(FileInfo, Vec<u8>)>,
    files: &[FileInfo],
    budget: &InlineBudget,
) -> (Vec<InlineImage>, Vec<String>) {
    let mut images = Vec::new();
    let mut notes = Vec::new();
    if budget.max_images == 0 {
        return (images, notes);
    }
    let shown_names: Vec<String> = shown.iter().map(|(f, _)| f.path.clone()).collect();
    let mut candidates: Vec<(FileInfo, Option<Vec<u8>>)> = shown
        .into_iter()
        .filter(|(f, _)| is_raster(&f.mime))
        .map(|(f, bytes)| (f, Some(bytes)))
        .collect();
    candidates.extend(
        files
            .iter()
            .filter(|f| is_raster(&f.mime) && !shown_names.contains(&f.path))
            .map(|f| (f.clone(), None)),
    );
    let mut left_out = 0;
    for (file, bytes) in candidates {
        if images.len() >= budget.max_images {
            left_out += 1;
            continue;
        }
        let bytes = match bytes {
            Some(b) => b,
            None => match workspace.read_file(&file.path, MAX_SOURCE_BYTES).await {
                Ok((b, _)) => b,
                // Gone, too big, or no longer a regular file: not shown.
                Err(_) => continue,
            },
        };
        let budget_copy = budget.clone();
        let path = file.path.clone();
        let fitted = tokio::task::spawn_blocking(move || fit(&path, bytes, &budget_copy)).await;
        match fitted {
            Ok(Ok(img)) => {
                if let Some((w, h)) = img.scaled_from {
                    notes.push(format!(
                        "Image {} shown inline scaled down to {}x{} (the file is {w}x{h})",
                        img.file, img.width, img.height
                    ));
                }
                images.push(img);
            }
            Ok(Err(why)) => notes.push(format!("Image {} not shown inline: {why}", file.path)),
            Err(e) => tracing::warn!("fitting an inline image failed: {e}"),
        }
    }
    if left_out > 0 {
        notes.push(format!(
            "{left_out} more image(s) not shown inline (at most {} per call); \
             they are listed in files",
            budget.max_images
        ));
    }
    (images, notes)
}

fn is_raster(mime: &str) -> bool {
    matches!(mime, "image/png" | "image/jpeg" | "image/gif")
}

/// Why an image is not returned inline.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotInlined {
    #[error("not a PNG, JPEG or GIF image")]
    Unsupported,
    #[error("it could not be decoded ({0})")]
    Undecodable(String),
    #[error("it is {0}x{1} pixels, too large to decode")]
    TooLarge(u32, u32),
    #[error("it does not fit in {0} bytes")]
    OverBytes(usize),
}

/// `bytes` (the image in `file`) as it fits the budget: unchanged when it
/// does, else scaled down and re-encoded.
pub fn fit(file: &str, bytes: Vec<u8>, budget: &InlineBudget) -> Result<InlineImage, NotInlined> {
    let format = image::guess_format(&bytes).map_err(|_| NotInlined::Unsupported)?;
    let mime = match format {
        ImageFormat::Png => "image/png",
        ImageFormat::Jpeg => "image/jpeg",
        ImageFormat::Gif => "image/gif",
        _ => return Err(NotInlined::Unsupported),
    };
    let (width, height) = if format == ImageFormat::Gif {
        gif_size(&bytes).ok_or(NotInlined::Undecodable("no GIF header".into()))?
    } else {
        ImageReader::with_format(Cursor::new(&bytes), format)
            .into_dimensions()
            .map_err(|e| NotInlined::Undecodable(e.to_string()))?
    };
    let (tw, th) = target_size(width, height, budget);
    if (tw, th) == (width, height) && bytes.len() <= budget.max_bytes {
        return Ok(InlineImage {
            file: file.to_string(),
            mime,
            bytes,
            width,
            height,
            scaled_from: None,
        });
    }
    if format == ImageFormat::Gif {
        // Decoding GIFs is not compiled in (an animated GIF would lose its
        // animation anyway): a GIF over budget is not inlined.
        return Err(NotInlined::OverBytes(budget.max_bytes));
    }
    if width > MAX_SOURCE_SIDE || height > MAX_SOURCE_SIDE {
        return Err(NotInlined::TooLarge(width, height));
    }
    let mut reader = ImageReader::with_format(Cursor::new(&bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE);
    limits.max_image_height = Some(MAX_SOURCE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => NotInlined::TooLarge(width, height),
        e => NotInlined::Undecodable(e.to_string()),
    })?;
    drop(bytes);
    let (mut tw, mut th) = (tw, th);
    for _ in 0..MAX_SHRINKS {
        let scaled = if (tw, th) == (width, height) {
            decoded.clone()
        } else {
            decoded.resize_exact(tw, th, image::imageops::FilterType::Triangle)
        };
        if let Some((mime, bytes)) = encode(&scaled, format, budget.max_bytes) {
            return Ok(InlineImage {
                file: file.to_string(),
                mime,
                bytes,
                width: tw,
                height: th,
                scaled_from: Some((width, height)),
            });
        }
        tw = ((tw as f64 * SHRINK) as u32).max(1);
        th = ((th as f64 * SHRINK) as u32).max(1);
    }
    Err(NotInlined::OverBytes(budget.max_bytes))
}

/// The largest size with the image's aspect ratio within both pixel limits.
fn target_size(width: u32, height: u32, budget: &InlineBudget) -> (u32, u32) {
    let (w, h) = (width.max(1) as f64, height.max(1) as f64);
    let by_side = budget.max_side.max(1) as f64 / w.max(h);
    let by_area = (budget.max_pixels.max(1) as f64 / (w * h)).sqrt();
    let scale = by_side.min(by_area);
    if scale >= 1.0 {
        return (width, height);
    }
    (
        ((w * scale).floor() as u32).max(1),
        ((h * scale).floor() as u32).max(1),
    )
}

/// PNG for PNG sources (sharp lines and text), JPEG when that is too big or
/// the source was a JPEG; `None` if neither fits in `max_bytes`.
fn encode(
    img: &DynamicImage,
    source: ImageFormat,
    max_bytes: usize,
) -> Option<(&'static str, Vec<u8>)> {
    if source == ImageFormat::Png {
        let mut png = Vec::new();
        if img
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .is_ok()
            && png.len() <= max_bytes
        {
            return Some(("image/png", png));
        }
    }
    // JPEG has no alpha: transparent parts become white, as on a page.
    let rgb = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        image::RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = rgba.get_pixel(x, y).0;
            let a = p[3] as u32;
            image::Rgb(std::array::from_fn(|c| {
                ((p[c] as u32 * a + 255 * (255 - a)) / 255) as u8
            }))
        })
    } else {
        img.to_rgb8()
    };
    let mut jpeg = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY);
    rgb.write_with_encoder(encoder).ok()?;
    (jpeg.len() <= max_bytes).then_some(("image/jpeg", jpeg))
}

/// Width and height from a GIF's logical screen descriptor.
fn gif_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 10 || !(bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a")) {
        return None;
    }
    let w = u16::from_le_bytes([bytes[6], bytes[7]]) as u32;
    let h = u16::from_le_bytes([bytes[8], bytes[9]]) as u32;
    Some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| {
            image::Rgba([(x % 256) as u8, (y % 256) as u8, 128, 255])
        });
        let mut out = Vec::new();
        DynamicImage::ImageRgba8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn size_of(bytes: &[u8]) -> (u32, u32) {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .unwrap()
            .into_dimensions()
            .unwrap()
    }

    #[test]
    fn small_images_pass_unchanged() {
        let bytes = png(64, 48);
        let img = fit("a.png", bytes.clone(), &InlineBudget::default()).unwrap();
        assert_eq!(img.bytes, bytes);
        assert_eq!((img.width, img.height, img.mime), (64, 48, "image/png"));
        assert_eq!(img.scaled_from, None);
    }

    #[test]
    fn large_images_are_scaled_to_the_pixel_budget() {
        let budget = InlineBudget {
            max_side: 300,
            max_pixels: 40_000,
            ..Default::default()
        };
        // Longest side: 600x200 -> 300x100 (30 000 px).
        let img = fit("wide.png", png(600, 200), &budget).unwrap();
        assert_eq!((img.width, img.height), (300, 100));
        assert_eq!(size_of(&img.bytes), (300, 100));
        assert_eq!(img.scaled_from, Some((600, 200)));
        // Area: 400x400 -> 200x200.
        let img = fit("square.png", png(400, 400), &budget).unwrap();
        assert_eq!((img.width, img.height), (200, 200));
        assert_eq!(size_of(&img.bytes), (200, 200));
    }

    #[test]
    fn images_over_the_byte_budget_shrink_until_they_fit() {
        let noise = image::RgbImage::from_fn(500, 500, |x, y| {
            let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) as u8;
            image::Rgb([v, v.wrapping_mul(7), v.wrapping_mul(13)])
        });
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(noise)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        let budget = InlineBudget {
            max_bytes: 60_000,
            ..Default::default()
        };
        assert!(bytes.len() > budget.max_bytes);
        let img = fit("noise.png", bytes, &budget).unwrap();
        assert!(img.bytes.len() <= budget.max_bytes, "{}", img.bytes.len());
        assert_eq!(size_of(&img.bytes), (img.width, img.height));
        assert_eq!(img.scaled_from, Some((500, 500)));
    }

    #[test]
    fn non_images_are_refused() {
        assert_eq!(
            fit("x.png", b"not a png".to_vec(), &InlineBudget::default()),
            Err(NotInlined::Unsupported)
        );
        let mut gif = b"GIF89a".to_vec();
        gif.extend([0x10, 0, 0x08, 0, 0, 0, 0]);
        let img = fit("a.gif", gif, &InlineBudget::default()).unwrap();
        assert_eq!((img.width, img.height, img.mime), (16, 8, "image/gif"));
    }
}
