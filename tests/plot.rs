//! Every chart kind renders to PNG and SVG with Chinese text, and bad input is an error.

use genlab::data::{load_digits, ring8, Scale};
use genlab::math::{linspace, normal_pdf};
use genlab::plot::Figure;
use std::path::PathBuf;

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plot-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Renders to both formats, checks the files are real PNG/SVG with the Chinese title in the
/// SVG, and that the PNG is not blank: the title's glyphs put dark pixels in the top band.
fn check(fig: &Figure, name: &str) {
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
    check(&fig, "lines");
}

#[test]
fn scatter_by_label() {
    let p = ring8(400, 0.05, 0);
    let fig = Figure::new("中文标题：八个高斯 (scatter)")
        .scatter_labeled("k = ", &p.xy, &p.labels)
        .scatter("原点", &[0.0f64], &[0.0f64]);
    check(&fig, "scatter");
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
    check(&fig, "histogram");
    check(
        &Figure::new("中文标题：计数 (counts)").histogram("计数", &xs, 30),
        "counts",
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
    check(&fig, "heatmap");
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
    check(&fig, "digits");
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
