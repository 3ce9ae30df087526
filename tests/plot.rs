//! Every chart kind renders to PNG and SVG with Chinese text, and bad input is an error.

use genlab::data::{load_digits, ring8, Scale};
use genlab::math::{linspace, normal_pdf};
use genlab::plot::{Figure, PALETTE};
use plotters::style::colors::colormaps::ViridisRGB;
use plotters::style::RGBColor;
use std::path::PathBuf;

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plot-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Renders to both formats, checks the files are real PNG/SVG with the Chinese title in the
/// SVG, that the PNG is not blank (the title's glyphs put dark pixels in the top band), and
/// that each of `legend` is a text element of the SVG.
fn check(fig: &Figure, name: &str, legend: &[&str]) {
    let dir = out_dir();
    let png = fig.save(dir.join(format!("{name}.png"))).unwrap();
    let svg = fig.save(dir.join(format!("{name}.svg"))).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "{name}: not a PNG");
    assert!(bytes.len() > 5_000, "{name}: PNG suspiciously small");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{name}: not an SVG");
    assert!(
        text.contains("中文标题"),
        "{name}: Chinese title missing from SVG"
    );
    assert!(
        text.contains("WenQuanYi Micro Hei"),
        "{name}: SVG names no CJK font"
    );
    assert!(
        dark_pixels_in_title(&bytes) > 50,
        "{name}: no title glyphs drawn in the PNG"
    );
    for entry in legend {
        assert!(
            text.contains(&format!(">\n{entry}\n</text>")),
            "{name}: legend entry {entry:?} missing from the SVG"
        );
    }
}

/// The PNG's pixels as (width, height, RGB rows).
fn decode(png_bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width as usize, info.height as usize, buf)
}

fn pixel(img: &(usize, usize, Vec<u8>), x: usize, y: usize) -> [u8; 3] {
    let i = 3 * (y * img.0 + x);
    [img.2[i], img.2[i + 1], img.2[i + 2]]
}

fn rgb(c: RGBColor) -> [u8; 3] {
    [c.0, c.1, c.2]
}

/// The mean (x, y) and the number of the pixels of exactly colour `c` (rows from `top` down).
fn centroid(img: &(usize, usize, Vec<u8>), c: [u8; 3], top: usize) -> (f64, f64, usize) {
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0);
    for y in top..img.1 {
        for x in 0..img.0 {
            if pixel(img, x, y) == c {
                sx += x as f64;
                sy += y as f64;
                n += 1;
            }
        }
    }
    (sx / n.max(1) as f64, sy / n.max(1) as f64, n)
}

fn dark_pixels_in_title(png_bytes: &[u8]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let row = info.line_size;
    buf[..row * 35]
        .chunks(3)
        .filter(|p| p.len() == 3 && (p[0] as u32 + p[1] as u32 + p[2] as u32) < 300)
        .count()
}

#[test]
fn line_chart_with_legend() {
    let xs = linspace(-3.0, 3.0, 200);
    let a: Vec<f64> = xs.iter().map(|&x| normal_pdf(x, 0.0, 1.0)).collect();
    let b: Vec<f64> = xs.iter().map(|&x| normal_pdf(x, 1.0, 0.5)).collect();
    let fig = Figure::new("中文标题：两条曲线 (lines)")
        .x_label("横轴 x")
        .y_label("纵轴 y")
        .line("先验", &xs, &a)
        .dashed_line("后验", &xs, &b)
        .hline("水平线", 0.3)
        .vline("竖线", 0.5);
    check(&fig, "lines", &["先验", "后验", "水平线", "竖线"]);
}

#[test]
fn scatter_by_label() {
    let p = ring8(400, 0.05, 0);
    let fig = Figure::new("中文标题：八个高斯 (scatter)")
        .scatter_labeled("k = ", &p.xy, &p.labels)
        .scatter("原点", &[0.0f64], &[0.0f64]);
    let names = ["k = 0", "k = 3", "k = 7", "原点"];
    check(&fig, "scatter", &names);
}

#[test]
fn histogram_and_density() {
    let (xs, _) =
        genlab::data::gaussian_mixture_1d(2000, &[0.5, 0.5], &[-2.0, 2.0], &[0.7, 0.7], 1).unwrap();
    let fig = Figure::new("中文标题：直方图 (histogram)")
        .density_histogram("样本", &xs, 40)
        .density(
            "密度",
            |x| 0.5 * normal_pdf(x, -2.0, 0.7) + 0.5 * normal_pdf(x, 2.0, 0.7),
            -5.0,
            5.0,
        );
    check(&fig, "histogram", &["样本", "密度"]);
    check(
        &Figure::new("中文标题：计数 (counts)").histogram("计数", &xs, 30),
        "counts",
        &["计数"],
    );
}

#[test]
fn heatmap_of_a_2d_density() {
    let fig = Figure::new("中文标题：二维密度 (heatmap)")
        .density_2d(
            |x, y| (-(x * x + 2.0 * y * y) / 2.0).exp(),
            (-3.0, 3.0),
            (-2.0, 2.0),
            60,
        )
        .scatter("点", &[0.0f64, 1.0], &[0.0f64, 0.5]);
    check(&fig, "heatmap", &["点"]);
}

#[test]
fn image_grid_of_digits() {
    let digits = load_digits(Scale::Unit).unwrap();
    let first = digits.train.gather(&(0..20).collect::<Vec<_>>()).unwrap();
    let captions: Vec<String> = digits.train.labels[..20]
        .iter()
        .map(|l| format!("数字 {l}"))
        .collect();
    let fig = Figure::image_grid("中文标题：手写数字 (digits)", &first, 8, 10)
        .captions(&captions)
        .image_range(0.0, 1.0);
    check(&fig, "digits", &[]);
}

#[test]
fn bad_figures_are_errors_not_panics() {
    let err = Figure::new("x")
        .line("a", &[1.0f64, 2.0], &[1.0f64])
        .to_svg()
        .unwrap_err()
        .to_string();
    assert!(err.contains("series `a`"), "{err}");
    let err = Figure::new("x")
        .save(out_dir().join("figure.jpg"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(".png or .svg"), "{err}");
    assert!(Figure::image_grid("x", &[0.0; 10], 8, 2).to_png().is_err());
    assert!(Figure::new("x")
        .histogram("h", &[1.0f64], 0)
        .to_png()
        .is_err());
    assert!(Figure::new("x")
        .histogram("h", &[f64::NAN], 5)
        .to_png()
        .is_err());
    assert!(Figure::new("x")
        .x_range(1.0, 1.0)
        .line("a", &[1.0f64], &[1.0f64])
        .to_svg()
        .is_err());
    // An empty figure and non-finite values still draw.
    assert!(Figure::new("空").to_png().is_ok());
    assert!(Figure::new("x")
        .line("a", &[0.0f64, 1.0, 2.0], &[1.0f64, f64::INFINITY, 0.5])
        .to_svg()
        .is_ok());
}

/// The title band of a figure titled `title`, as pixels.
fn title_band(title: &str) -> Vec<u8> {
    let png = Figure::new(title).size(400, 200).to_png().unwrap();
    let img = decode(&png);
    img.2[..3 * img.0 * 35].to_vec()
}

#[test]
fn chinese_titles_are_drawn_with_chinese_glyphs() {
    // A font without these glyphs draws every one of them as the same "missing glyph" box, so
    // two different four-character titles would look alike; a title of four characters no
    // font has (plane-16 private use) is refused before it is drawn (the glyph check).
    let (a, b) = (title_band("变分推断"), title_band("后验分布"));
    let refused = Figure::new("\u{10FFFD}\u{10FFFD}")
        .to_png()
        .unwrap_err()
        .to_string();
    assert!(refused.contains("U+10FFFD"), "{refused}");
    let ink = |band: &[u8]| {
        band.chunks(3)
            .filter(|p| p.iter().map(|&v| v as u32).sum::<u32>() < 300)
            .count()
    };
    assert!(
        ink(&a) > 50 && ink(&b) > 50,
        "no glyphs drawn: {} {}",
        ink(&a),
        ink(&b)
    );
    assert_ne!(a, b, "two Chinese titles rendered alike");
}

#[test]
fn heatmap_cells_and_points_sit_at_their_data_coordinates() {
    // rows[i][j]: row 0 at the bottom, column 0 at the left; four different values, so a
    // flipped or transposed axis moves a colour to the wrong corner.
    let rows = vec![vec![0.0, 1.0], vec![2.0, 3.0]];
    let base = || {
        Figure::new("热图方向")
            .size(400, 300)
            .x_range(0.0, 4.0)
            .y_range(0.0, 2.0)
    };
    let img = decode(
        &base()
            .heatmap((0.0, 4.0), (0.0, 2.0), rows)
            .to_png()
            .unwrap(),
    );
    let colours: Vec<[u8; 3]> = (0..4)
        .map(|v| rgb(ViridisRGB::get_color(v as f32 / 3.0)))
        .collect();
    // The heatmap fills the plotting area: its pixels' bounding box maps data to pixels.
    let (mut left, mut right, mut top, mut bottom) = (usize::MAX, 0, usize::MAX, 0);
    for y in 0..img.1 {
        for x in 0..img.0 {
            if colours.contains(&pixel(&img, x, y)) {
                (left, right) = (left.min(x), right.max(x));
                (top, bottom) = (top.min(y), bottom.max(y));
            }
        }
    }
    assert!(
        right > left + 200 && bottom > top + 150,
        "plot area {left}..{right} × {top}..{bottom}"
    );
    let at = |x: f64, y: f64| {
        (
            (left as f64 + x / 4.0 * (right - left) as f64).round() as usize,
            (bottom as f64 - y / 2.0 * (bottom - top) as f64).round() as usize,
        )
    };
    for (x, y, value) in [(1.0, 0.5, 0), (3.0, 0.5, 1), (1.0, 1.5, 2), (3.0, 1.5, 3)] {
        let (px, py) = at(x, y);
        assert_eq!(
            pixel(&img, px, py),
            colours[value],
            "cell at data ({x}, {y}) should show value {value}"
        );
    }
    // Points drawn on the same axes land where the same map puts them.
    let xs = [1.3f64, 3.1];
    let ys = [1.3f64, 0.4];
    let img = decode(&base().scatter("点", &xs, &ys).to_png().unwrap());
    let series = rgb(PALETTE[0]);
    for (&x, &y) in xs.iter().zip(&ys) {
        let (px, py) = at(x, y);
        let p = pixel(&img, px, py);
        // The point is PALETTE[0] at 70 % over white.
        let want = series.map(|c| (0.7 * c as f64 + 0.3 * 255.0) as i32);
        assert!(
            p.iter().zip(want).all(|(&a, b)| (a as i32 - b).abs() <= 3),
            "point ({x}, {y}) at pixel ({px}, {py}) is {p:?}, want {want:?}"
        );
        let (mx, my) = at(x, 2.0 - y);
        assert_eq!(
            pixel(&img, mx, my),
            [255, 255, 255],
            "mirror of ({x}, {y}) is not blank"
        );
    }
}

#[test]
fn image_grids_are_dark_for_low_values_and_row_major() {
    // One 2×2 image [0, 0.25; 0.5, 0.75] on the fixed scale 0..1: black, then lighter greys
    // left to right and top to bottom (white is the background, so 1.0 is left out).
    let fig = Figure::image_grid("灰度", &[0.0, 0.25, 0.5, 0.75], 2, 1).image_range(0.0, 1.0);
    let img = decode(&fig.to_png().unwrap());
    let spots: Vec<(f64, f64, usize)> = [0u8, 64, 128, 191]
        .iter()
        .map(|&g| centroid(&img, [g, g, g], 35))
        .collect();
    for (k, s) in spots.iter().enumerate() {
        assert!(s.2 > 400, "grey of pixel {k} drawn on {} pixels only", s.2);
    }
    let (tl, tr, bl, br) = (spots[0], spots[1], spots[2], spots[3]);
    assert!(
        tl.0 < tr.0 - 20.0 && bl.0 < br.0 - 20.0,
        "columns: {spots:?}"
    );
    assert!(tl.1 < bl.1 - 20.0 && tr.1 < br.1 - 20.0, "rows: {spots:?}");
}

/// A character the figure font has no glyph for is an error naming it (and the font) instead
/// of a wrong sign in the picture: "½" in a legend drew "⅟" with wqy-microhei. Every tick
/// label's characters are in the font.
#[test]
fn a_missing_glyph_is_an_error_naming_the_character() {
    use ab_glyph::Font as _;
    let xs = [0.0, 1.0];
    let ok = Figure::new("中文标题 θ μ σ² ≈ ≡ ≤ ≥ √ ∞ − → ‖ ∂ ∑ ε x₁ z₂ （）：，").line(
        "KL(q‖p)",
        &xs,
        &xs,
    );
    ok.to_png().unwrap();
    // ᾱ (no glyph in wqy-microhei, the default font here) and ½ (a defective one there), in
    // each place a figure draws text; U+10FFFD (private use) is in no font.
    let wqy = genlab::plot::font_path()
        .unwrap()
        .to_string_lossy()
        .contains("wqy-microhei");
    let mut bad = vec!['\u{10FFFD}'];
    if wqy {
        bad.extend(['½', 'ᾱ']);
    }
    for c in bad {
        for (what, fig) in [
            ("title", Figure::new(format!("D = {c} 时的 L_D"))),
            (
                "legend",
                Figure::new("t").line(format!("D = {c}"), &xs, &xs),
            ),
            ("axis label", Figure::new("t").y_label(format!("{c} log"))),
            ("line", Figure::new("t").hline(c.to_string(), 0.5)),
        ] {
            for drawn in [fig.to_png().map(|_| ()), fig.to_svg().map(|_| ())] {
                let e = drawn.expect_err(what).to_string();
                assert!(
                    e.contains(&format!("'{c}' (U+{:04X})", c as u32)),
                    "{what}: {e}"
                );
                assert!(e.contains("1/2"), "{what}: the fix is named: {e}");
            }
        }
    }
    let bytes = std::fs::read(genlab::plot::font_path().unwrap()).unwrap();
    let font = ab_glyph::FontRef::try_from_slice(&bytes).unwrap();
    for (lo, hi) in [
        (0.0, 5000.0),
        (-3.0, 3.0),
        (1e-9, 2e-9),
        (-1e12, 1e12),
        (0.0, 0.25),
    ] {
        for k in 0..=10 {
            let label = genlab::plot::tick_label(lo + (hi - lo) * k as f64 / 10.0, lo, hi);
            assert!(
                label.chars().all(|c| font.glyph_id(c).0 != 0),
                "tick label {label}"
            );
        }
    }
}
