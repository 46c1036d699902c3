//! Drawing detections on an image: a box outline per detection, a filled
//! label with "name 0.87" above it, one colour per class, and JPEG encoding.
//!
//! Sizes scale with the image: the outline is about 0.4% of the shorter
//! side (at least 1 pixel) and the text is an embedded 5x8 bitmap font
//! scaled by an integer factor (8 pixels tall up to ~600 pixel images, 16 at
//! 640, 24 at 1080, ...). The label text is black or white, whichever reads
//! better on the class colour, so labels stay readable on light and dark
//! photos alike. Everything is clipped to the image: boxes partly or wholly
//! outside it, non-finite coordinates and empty images are fine.

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, Rgb, RgbImage};

use crate::detection::Detection;

/// Class colours, cycled by class id.
pub const PALETTE: [[u8; 3]; 20] = [
    [230, 57, 70],
    [255, 159, 28],
    [46, 196, 182],
    [58, 134, 255],
    [131, 56, 236],
    [255, 0, 110],
    [251, 86, 7],
    [255, 208, 0],
    [6, 214, 160],
    [17, 138, 178],
    [7, 59, 76],
    [239, 120, 160],
    [160, 220, 90],
    [118, 200, 147],
    [52, 100, 164],
    [200, 85, 61],
    [106, 76, 147],
    [141, 153, 174],
    [188, 108, 37],
    [30, 30, 200],
];

/// The colour of `class_id`.
pub fn class_color(class_id: usize) -> [u8; 3] {
    PALETTE[class_id % PALETTE.len()]
}

/// Black or white, whichever contrasts more with `fill` (Rec. 601 luma).
pub fn text_color(fill: [u8; 3]) -> [u8; 3] {
    let luma = 0.299 * f32::from(fill[0]) + 0.587 * f32::from(fill[1]) + 0.114 * f32::from(fill[2]);
    if luma > 140.0 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    }
}

/// Glyph cell of the embedded font: 5 columns, 8 rows (the last for
/// descenders), one blank column between characters.
const GLYPH_WIDTH: i64 = 5;
const GLYPH_HEIGHT: i64 = 8;
const ADVANCE: i64 = GLYPH_WIDTH + 1;

/// Printable ASCII (' ' to '~'), one row per byte, bit 4 = leftmost column.
const FONT: [[u8; 8]; 95] = [
    [
        0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000,
    ], // ' '
    [
        0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100, 0b00000,
    ], // '!'
    [
        0b01010, 0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000,
    ], // '"'
    [
        0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010, 0b00000,
    ], // '#'
    [
        0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100, 0b00000,
    ], // '$'
    [
        0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011, 0b00000,
    ], // '%'
    [
        0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101, 0b00000,
    ], // '&'
    [
        0b00100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000,
    ], // '\''
    [
        0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010, 0b00000,
    ], // '('
    [
        0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000, 0b00000,
    ], // ')'
    [
        0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000, 0b00000,
    ], // '*'
    [
        0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000, 0b00000,
    ], // '+'
    [
        0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000,
    ], // ','
    [
        0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000,
    ], // '-'
    [
        0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00000,
    ], // '.'
    [
        0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000, 0b00000,
    ], // '/'
    [
        0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110, 0b00000,
    ], // '0'
    [
        0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000,
    ], // '1'
    [
        0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000,
    ], // '2'
    [
        0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110, 0b00000,
    ], // '3'
    [
        0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010, 0b00000,
    ], // '4'
    [
        0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110, 0b00000,
    ], // '5'
    [
        0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110, 0b00000,
    ], // '6'
    [
        0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00000,
    ], // '7'
    [
        0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110, 0b00000,
    ], // '8'
    [
        0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100, 0b00000,
    ], // '9'
    [
        0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000,
    ], // ':'
    [
        0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b00100, 0b01000, 0b00000,
    ], // ';'
    [
        0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00000,
    ], // '<'
    [
        0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000,
    ], // '='
    [
        0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000, 0b00000,
    ], // '>'
    [
        0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100, 0b00000,
    ], // '?'
    [
        0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110, 0b00000,
    ], // '@'
    [
        0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000,
    ], // 'A'
    [
        0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110, 0b00000,
    ], // 'B'
    [
        0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000,
    ], // 'C'
    [
        0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100, 0b00000,
    ], // 'D'
    [
        0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, 0b00000,
    ], // 'E'
    [
        0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000,
    ], // 'F'
    [
        0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111, 0b00000,
    ], // 'G'
    [
        0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000,
    ], // 'H'
    [
        0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000,
    ], // 'I'
    [
        0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100, 0b00000,
    ], // 'J'
    [
        0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, 0b00000,
    ], // 'K'
    [
        0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, 0b00000,
    ], // 'L'
    [
        0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001, 0b00000,
    ], // 'M'
    [
        0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b00000,
    ], // 'N'
    [
        0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000,
    ], // 'O'
    [
        0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000,
    ], // 'P'
    [
        0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101, 0b00000,
    ], // 'Q'
    [
        0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, 0b00000,
    ], // 'R'
    [
        0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110, 0b00000,
    ], // 'S'
    [
        0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000,
    ], // 'T'
    [
        0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000,
    ], // 'U'
    [
        0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000,
    ], // 'V'
    [
        0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, 0b00000,
    ], // 'W'
    [
        0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001, 0b00000,
    ], // 'X'
    [
        0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00000,
    ], // 'Y'
    [
        0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111, 0b00000,
    ], // 'Z'
    [
        0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110, 0b00000,
    ], // '['
    [
        0b00000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00000, 0b00000,
    ], // '\\'
    [
        0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110, 0b00000,
    ], // ']'
    [
        0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000,
    ], // '^'
    [
        0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111, 0b00000,
    ], // '_'
    [
        0b01000, 0b00100, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000,
    ], // '`'
    [
        0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111, 0b00000,
    ], // 'a'
    [
        0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110, 0b00000,
    ], // 'b'
    [
        0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000,
    ], // 'c'
    [
        0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111, 0b00000,
    ], // 'd'
    [
        0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110, 0b00000,
    ], // 'e'
    [
        0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000, 0b00000,
    ], // 'f'
    [
        0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110,
    ], // 'g'
    [
        0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000,
    ], // 'h'
    [
        0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000,
    ], // 'i'
    [
        0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100,
    ], // 'j'
    [
        0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b00000,
    ], // 'k'
    [
        0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000,
    ], // 'l'
    [
        0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10101, 0b10101, 0b00000,
    ], // 'm'
    [
        0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000,
    ], // 'n'
    [
        0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000,
    ], // 'o'
    [
        0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000,
    ], // 'p'
    [
        0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001,
    ], // 'q'
    [
        0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000, 0b00000,
    ], // 'r'
    [
        0b00000, 0b00000, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110, 0b00000,
    ], // 's'
    [
        0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110, 0b00000,
    ], // 't'
    [
        0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101, 0b00000,
    ], // 'u'
    [
        0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000,
    ], // 'v'
    [
        0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010, 0b00000,
    ], // 'w'
    [
        0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b00000,
    ], // 'x'
    [
        0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110,
    ], // 'y'
    [
        0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000,
    ], // 'z'
    [
        0b00010, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00010, 0b00000,
    ], // '{'
    [
        0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000,
    ], // '|'
    [
        0b01000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b01000, 0b00000,
    ], // '}'
    [
        0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000, 0b00000,
    ], // '~'
];

/// The glyph of `c`; anything outside printable ASCII shows as '?'.
fn glyph(c: char) -> &'static [u8; 8] {
    let index = match c {
        ' '..='~' => c as usize - 32,
        _ => '?' as usize - 32,
    };
    &FONT[index]
}

/// Box outline thickness and text scale for an image of this size.
fn sizes(width: u32, height: u32) -> (i64, i64) {
    let short = i64::from(width.min(height));
    let line = ((short + 125) / 250).max(1);
    let text = ((short + 200) / 400).max(1);
    (line, text)
}

/// A copy of `image` with `detections` drawn on it. `labels[class_id]` names
/// the classes; a class without a label is shown by its number.
pub fn render(image: &RgbImage, detections: &[Detection], labels: &[String]) -> RgbImage {
    let mut out = image.clone();
    if out.width() == 0 || out.height() == 0 {
        return out;
    }
    let (line, scale) = sizes(out.width(), out.height());
    // Boxes first, then every label on top, so no outline crosses a label.
    let boxes: Vec<(&Detection, [i64; 4])> = detections
        .iter()
        .filter_map(|d| pixel_box(&out, d).map(|b| (d, b)))
        .collect();
    for (d, [x1, y1, x2, y2]) in &boxes {
        let color = class_color(d.class_id);
        // The outline grows inwards, so boxes at the image edge keep it.
        let t = line.min((x2 - x1 + 1).max(1)).min((y2 - y1 + 1).max(1));
        fill_rect(&mut out, *x1, *y1, *x2, y1 + t - 1, color);
        fill_rect(&mut out, *x1, y2 - t + 1, *x2, *y2, color);
        fill_rect(&mut out, *x1, *y1, x1 + t - 1, *y2, color);
        fill_rect(&mut out, x2 - t + 1, *y1, *x2, *y2, color);
    }
    for (d, [x1, y1, _, _]) in &boxes {
        let name = labels
            .get(d.class_id)
            .cloned()
            .unwrap_or_else(|| d.class_id.to_string());
        draw_label(
            &mut out,
            &format!("{name} {:.2}", d.score),
            *x1,
            *y1,
            scale,
            class_color(d.class_id),
        );
    }
    out
}

/// Inclusive pixel corners of `d` clipped to the image, or None when the box
/// has non-finite corners or lies wholly outside.
fn pixel_box(image: &RgbImage, d: &Detection) -> Option<[i64; 4]> {
    let corners = [d.x1, d.y1, d.x2, d.y2];
    if corners.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let (w, h) = (f64::from(image.width()), f64::from(image.height()));
    let (x1, x2) = (f64::from(d.x1.min(d.x2)), f64::from(d.x1.max(d.x2)));
    let (y1, y2) = (f64::from(d.y1.min(d.y2)), f64::from(d.y1.max(d.y2)));
    if x2 < 0.0 || y2 < 0.0 || x1 >= w || y1 >= h {
        return None;
    }
    // Corner coordinates are pixel edges: the last covered pixel is x2 - 1.
    let clip = |v: f64, max: f64| v.clamp(0.0, max - 1.0).round() as i64;
    let (px1, py1) = (clip(x1, w), clip(y1, h));
    let (px2, py2) = (clip(x2 - 1.0, w).max(px1), clip(y2 - 1.0, h).max(py1));
    Some([px1, py1, px2, py2])
}

/// Fill the inclusive rectangle, clipped to the image.
fn fill_rect(image: &mut RgbImage, x1: i64, y1: i64, x2: i64, y2: i64, color: [u8; 3]) {
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    let (x1, y1, x2, y2) = (x1.max(0), y1.max(0), x2.min(w - 1), y2.min(h - 1));
    if x1 > x2 || y1 > y2 {
        return;
    }
    for y in y1..=y2 {
        for x in x1..=x2 {
            image.put_pixel(x as u32, y as u32, Rgb(color));
        }
    }
}

/// Draw `text` in a filled box of `fill` whose bottom-left sits on the box
/// corner (x, y): above the box, or inside it when there is no room above;
/// shifted left when it would run past the right edge.
fn draw_label(image: &mut RgbImage, text: &str, x: i64, y: i64, scale: i64, fill: [u8; 3]) {
    let chars = text.chars().count() as i64;
    let pad = scale;
    let label_w = chars * ADVANCE * scale - scale + 2 * pad;
    let label_h = GLYPH_HEIGHT * scale + 2 * pad;
    let w = i64::from(image.width());
    let left = x.min(w - label_w).max(0);
    let top = if y >= label_h { y - label_h } else { y };
    fill_rect(
        image,
        left,
        top,
        left + label_w - 1,
        top + label_h - 1,
        fill,
    );
    let ink = text_color(fill);
    for (i, c) in text.chars().enumerate() {
        let gx = left + pad + i as i64 * ADVANCE * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..GLYPH_WIDTH {
                if bits & (1 << (GLYPH_WIDTH - 1 - col)) != 0 {
                    let px = gx + col * scale;
                    let py = top + pad + row as i64 * scale;
                    fill_rect(image, px, py, px + scale - 1, py + scale - 1, ink);
                }
            }
        }
    }
}

/// JPEG bytes of `image` at `quality` (clamped to 1..=100). Empty when the
/// image cannot be a JPEG: a zero side, or a side above 65535 pixels.
pub fn encode_jpeg(image: &RgbImage, quality: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    if image.width() == 0 || image.height() == 0 {
        return bytes;
    }
    let mut encoder = JpegEncoder::new_with_quality(&mut bytes, quality.clamp(1, 100));
    match encoder.encode(
        image.as_raw(),
        image.width(),
        image.height(),
        ExtendedColorType::Rgb8,
    ) {
        Ok(()) => bytes,
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_glyph_fits_its_cell() {
        assert!(FONT.iter().flatten().all(|&row| row < 1 << GLYPH_WIDTH));
        assert_eq!(glyph('é'), glyph('?'));
        assert_ne!(glyph('A'), glyph('?'));
        assert!(glyph(' ').iter().all(|&r| r == 0));
    }

    #[test]
    fn text_color_contrasts() {
        assert_eq!(text_color([255, 255, 255]), [0, 0, 0]);
        assert_eq!(text_color([255, 208, 0]), [0, 0, 0]);
        assert_eq!(text_color([0, 0, 0]), [255, 255, 255]);
        assert_eq!(text_color([7, 59, 76]), [255, 255, 255]);
    }

    #[test]
    fn sizes_grow_with_the_image() {
        assert_eq!(sizes(320, 240), (1, 1));
        assert_eq!(sizes(640, 640), (3, 2));
        assert_eq!(sizes(1920, 1080), (4, 3));
        assert_eq!(sizes(1, 100_000), (1, 1));
    }
}
