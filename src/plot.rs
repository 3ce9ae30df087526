//! Figures: one [`Figure`] type with one look for every chapter.
//!
//! A figure is a description (title, axis labels, layers) that is drawn only when it is shown
//! or saved, so the same figure displays inline in a notebook (SVG by default, PNG with
//! [`Figure::png`]) and saves with one call to `.png` or `.svg` ([`Figure::save`], or both at
//! once with [`Figure::export`]).
//!
//! ```no_run
//! use genlab::prelude::*;
//! let xs = linspace(0.0, 1.0, 101);
//! let ys: Vec<f64> = xs.iter().map(|t| 6.0 * t * (1.0 - t)).collect();
//! let fig = Figure::new("后验分布 (posterior)")
//!     .x_label("θ")
//!     .y_label("密度 (density)")
//!     .line("Beta(2, 2)", &xs, &ys);
//! fig.save("posterior.svg")?;
//! # Ok::<(), genlab::Error>(())
//! ```
//!
//! Chart kinds: lines ([`Figure::line`], [`Figure::dashed_line`], [`Figure::density`]), scatter
//! ([`Figure::scatter`], [`Figure::scatter_labeled`]), histograms ([`Figure::histogram`],
//! [`Figure::density_histogram`]), reference lines ([`Figure::hline`], [`Figure::vline`]), a 2-D
//! heatmap ([`Figure::heatmap`], [`Figure::density_2d`]) and an image grid
//! ([`Figure::image_grid`], for the 8×8 digits).
//!
//! Text is drawn with a font that has Chinese glyphs (found on the system, see
//! [`font_path`]), so Chinese titles render in PNG; SVG files name the same font family with
//! common CJK fallbacks. Nothing here panics: a figure that cannot be drawn is an
//! [`Error::Plot`], and inline display prints that error instead of an image.

use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The font family every figure uses. plotters registers the font under this key and the
/// SVG backend writes it verbatim as `font-family`, so it is also the CSS fallback list an
/// SVG viewer reads.
pub const FONT_FAMILY: &str =
    "WenQuanYi Micro Hei, Noto Sans CJK SC, Source Han Sans SC, Microsoft YaHei, PingFang SC, sans-serif";

/// Files tried, in order, for a font with Chinese glyphs (after `$GENLAB_FONT`).
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "C:\\Windows\\Fonts\\msyh.ttc",
];

/// The Tableau 10 palette: series colours, in order.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const GRID: RGBColor = RGBColor(225, 225, 225);

/// The font file used for figure text: `$GENLAB_FONT` when set, else the first known CJK font
/// on this machine, else what `fc-match` offers for Chinese, if it has Chinese glyphs.
pub fn font_path() -> Result<PathBuf> {
    font_path_given(std::env::var_os("GENLAB_FONT"))
}

/// [`font_path`] with `$GENLAB_FONT`'s value passed in (so tests need not set the variable).
fn font_path_given(genlab_font: Option<std::ffi::OsString>) -> Result<PathBuf> {
    if let Some(path) = genlab_font {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::Plot(format!(
                "GENLAB_FONT is set to {}, which is not a file: point it at a .ttf, .otf or .ttc font",
                path.display()
            )));
        }
        // A Latin-only font would draw every Chinese title as empty boxes, silently.
        if !has_chinese_glyphs(&path) {
            return Err(Error::Plot(format!(
                "GENLAB_FONT is set to {}, which is not a font with Chinese glyphs: point it at \
                 a CJK font (e.g. /usr/share/fonts/truetype/wqy/wqy-microhei.ttc) or unset it",
                path.display()
            )));
        }
        return Ok(path);
    }
    if let Some(path) = FONT_CANDIDATES.iter().map(Path::new).find(|p| p.is_file()) {
        return Ok(path.to_path_buf());
    }
    let matched = std::process::Command::new("fc-match")
        .args(["-f", "%{file}", "sans-serif:lang=zh-cn"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()));
    if let Some(path) = matched.filter(|p| has_chinese_glyphs(p)) {
        return Ok(path);
    }
    Err(Error::Plot(
        "no font with Chinese glyphs was found. Run `cargo xtask setup` (it installs \
         fonts-wqy-microhei), or `apt-get install fonts-wqy-microhei`, or set GENLAB_FONT to a \
         CJK .ttf/.otf/.ttc file"
            .into(),
    ))
}

fn has_chinese_glyphs(path: &Path) -> bool {
    use ab_glyph::Font;
    std::fs::read(path)
        .ok()
        .and_then(|bytes| {
            ab_glyph::FontRef::try_from_slice(&bytes)
                .ok()
                .map(|f| f.glyph_id('中').0 != 0)
        })
        .unwrap_or(false)
}

/// Registers the figure font with plotters, once per copy of this crate.
///
/// evcxr links a fresh copy of every dependency into each cell, plotters' font registry
/// included, so this runs once in every cell that draws. The font file is memory-mapped, not
/// copied, so each registration costs address space only.
fn ensure_font() -> Result<()> {
    loaded_font().map(|_| ())
}

/// The figure font as registered with plotters: its file and its bytes (mapped once per copy of
/// this crate, see [`ensure_font`]).
fn loaded_font() -> Result<(&'static Path, &'static [u8])> {
    type Loaded = std::result::Result<(&'static Path, &'static [u8]), String>;
    static REGISTERED: OnceLock<Loaded> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = font_path().map_err(|e| e.to_string())?;
            let file = std::fs::File::open(&path)
                .map_err(|e| format!("cannot open font {}: {e}", path.display()))?;
            // SAFETY: the font file is a read-only system file that nothing rewrites while
            // the process runs; the map is leaked so the bytes live as long as plotters' registry.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| format!("cannot map font {}: {e}", path.display()))?;
            let bytes: &'static [u8] = Box::leak(Box::new(map));
            for style in [
                FontStyle::Normal,
                FontStyle::Bold,
                FontStyle::Italic,
                FontStyle::Oblique,
            ] {
                plotters::style::register_font(FONT_FAMILY, style, bytes).map_err(|_| {
                    format!(
                        "{} is not a font plotters can read: set GENLAB_FONT to another",
                        path.display()
                    )
                })?;
            }
            let path: &'static Path = Box::leak(path.into_boxed_path());
            Ok((path, bytes))
        })
        .clone()
        .map_err(Error::Plot)
}

/// Characters WenQuanYi Micro Hei (the default figure font on Debian) maps to a defective
/// glyph: its "½" has no 2 and reads as "⅟" in a figure.
const DEFECTIVE_IN_WQY: &[char] = &['½'];

/// The first character of `text` that the font has no glyph for (whitespace and control
/// characters aside), or one in `defective`: the renderer would draw the font's "missing" box
/// or a wrong sign in its place (wqy-microhei has no ᾱ, ₀ or ₙ, and a defective ½).
fn missing_glyph(font: &impl ab_glyph::Font, defective: &[char], text: &str) -> Option<char> {
    text.chars().find(|&c| {
        !c.is_whitespace() && !c.is_control() && (font.glyph_id(c).0 == 0 || defective.contains(&c))
    })
}

/// Every string a figure draws besides its tick labels: the title, the axis labels, the
/// legend's series names and the image captions.
fn figure_texts(figure: &Figure) -> Vec<&str> {
    let mut texts = vec![
        figure.title.as_str(),
        figure.x_label.as_str(),
        figure.y_label.as_str(),
    ];
    for layer in &figure.layers {
        match layer {
            Layer::Line { name, .. }
            | Layer::Scatter { name, .. }
            | Layer::Histogram { name, .. }
            | Layer::HLine { name, .. }
            | Layer::VLine { name, .. } => texts.push(name),
            Layer::Heatmap { .. } => {}
        }
    }
    if let Some(grid) = &figure.images {
        texts.extend(grid.captions.iter().map(String::as_str));
    }
    texts
}

/// An error naming the first character of the figure's text that the font cannot draw.
fn check_glyphs(figure: &Figure) -> Result<()> {
    let (path, bytes) = loaded_font()?;
    let font = ab_glyph::FontRef::try_from_slice(bytes).map_err(plot_err)?;
    let wqy = path.to_string_lossy().contains("wqy-microhei");
    let defective = if wqy { DEFECTIVE_IN_WQY } else { &[] };
    for text in figure_texts(figure) {
        if let Some(c) = missing_glyph(&font, defective, text) {
            return Err(Error::Plot(format!(
                "the figure font {} has no glyph for '{c}' (U+{:04X}) in \"{text}\", or a \
                 defective one: it would draw a wrong sign there. Write it with characters the font has (e.g. 1/2 for ½), \
                 or set GENLAB_FONT to a font that has it",
                path.display(),
                c as u32
            )));
        }
    }
    Ok(())
}

/// One layer of a chart.
#[derive(Debug, Clone)]
enum Layer {
    Line {
        name: String,
        xs: Vec<f64>,
        ys: Vec<f64>,
        dashed: bool,
    },
    Scatter {
        name: String,
        xs: Vec<f64>,
        ys: Vec<f64>,
        labels: Option<Vec<usize>>,
    },
    Histogram {
        name: String,
        values: Vec<f64>,
        bins: usize,
        density: bool,
    },
    HLine {
        name: String,
        y: f64,
    },
    VLine {
        name: String,
        x: f64,
    },
    Heatmap {
        x: (f64, f64),
        y: (f64, f64),
        rows: Vec<Vec<f64>>,
    },
}

/// A grid of small grey-scale images (row-major pixels, `side`×`side` each).
#[derive(Debug, Clone)]
struct ImageGrid {
    pixels: Vec<f32>,
    side: usize,
    cols: usize,
    captions: Vec<String>,
    range: Option<(f32, f32)>,
}

/// A figure: a title, axis labels and layers, drawn when it is displayed or saved.
///
/// Build it with chained calls; show it by making it a cell's last expression; save it with
/// [`Figure::save`] or [`Figure::export`]. Introduced in chapter 1 (`01_bayes`).
#[derive(Clone)]
pub struct Figure {
    title: String,
    name: Option<String>,
    x_label: String,
    y_label: String,
    size: (u32, u32),
    x_range: Option<(f64, f64)>,
    y_range: Option<(f64, f64)>,
    layers: Vec<Layer>,
    images: Option<ImageGrid>,
    legend: Corner,
}

/// Where the legend box sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corner {
    /// Top right (the default).
    UpperRight,
    /// Top left.
    UpperLeft,
    /// Bottom right.
    LowerRight,
    /// Bottom left.
    LowerLeft,
}

impl std::fmt::Debug for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers = if self.images.is_some() {
            1
        } else {
            self.layers.len()
        };
        write!(
            f,
            "Figure({:?}, {layers} layers, {}x{})",
            self.title, self.size.0, self.size.1
        )
    }
}

/// A figure that displays inline as PNG instead of SVG (see [`Figure::png`]).
#[derive(Debug, Clone)]
pub struct Png(pub Figure);

fn to_f64<T: Copy + Into<f64>>(values: &[T]) -> Vec<f64> {
    values.iter().map(|&v| v.into()).collect()
}

/// A scatter series has at least one point and every coordinate is finite.
fn check_points(name: &str, xs: &[f64], ys: &[f64]) -> Result<()> {
    if xs.is_empty() {
        return Err(Error::shape(
            &format!("scatter `{name}`"),
            "at least one point (x, y)",
            "0 points",
        ));
    }
    for (axis, v) in [("x", xs), ("y", ys)] {
        if let Some(i) = v.iter().position(|v| !v.is_finite()) {
            return Err(Error::param(
                &format!("scatter `{name}`"),
                format!("{axis} = {} at point {i}", v[i]),
                "every coordinate must be a finite number",
            ));
        }
    }
    Ok(())
}

fn plot_err(e: impl std::fmt::Debug) -> Error {
    Error::Plot(format!("{e:?}"))
}

impl Figure {
    /// An empty 800×500 figure with a title.
    pub fn new(title: impl Into<String>) -> Self {
        Figure {
            title: title.into(),
            name: None,
            x_label: String::new(),
            y_label: String::new(),
            size: (800, 500),
            x_range: None,
            y_range: None,
            layers: vec![],
            images: None,
            legend: Corner::UpperRight,
        }
    }

    /// Names the figure's files in the exported notes (`cargo xtask export` writes
    /// `NAME.png` and `NAME.svg`); without a name they are named from the title. Give one when
    /// two figures of a chapter share a title, or to keep a link while the title changes.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Moves the legend to another corner (when it hides the data).
    pub fn legend(mut self, corner: Corner) -> Self {
        self.legend = corner;
        self
    }

    /// Labels the x axis (say what it is and its unit).
    pub fn x_label(mut self, label: impl Into<String>) -> Self {
        self.x_label = label.into();
        self
    }

    /// Labels the y axis.
    pub fn y_label(mut self, label: impl Into<String>) -> Self {
        self.y_label = label.into();
        self
    }

    /// Sets the size in pixels (PNG) or user units (SVG).
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.size = (width.clamp(100, 4000), height.clamp(100, 4000));
        self
    }

    /// Fixes the x range instead of fitting it to the data.
    pub fn x_range(mut self, lo: f64, hi: f64) -> Self {
        self.x_range = Some((lo, hi));
        self
    }

    /// Fixes the y range instead of fitting it to the data.
    pub fn y_range(mut self, lo: f64, hi: f64) -> Self {
        self.y_range = Some((lo, hi));
        self
    }

    /// A named line through the points (xsᵢ, ysᵢ).
    pub fn line<X: Copy + Into<f64>, Y: Copy + Into<f64>>(
        self,
        name: impl Into<String>,
        xs: &[X],
        ys: &[Y],
    ) -> Self {
        self.push_line(name.into(), to_f64(xs), to_f64(ys), false)
    }

    fn push_line(mut self, name: String, xs: Vec<f64>, ys: Vec<f64>, dashed: bool) -> Self {
        self.layers.push(Layer::Line {
            name,
            xs,
            ys,
            dashed,
        });
        self
    }

    /// A named dashed line (for a reference curve: a closed form, a target).
    pub fn dashed_line<X: Copy + Into<f64>, Y: Copy + Into<f64>>(
        self,
        name: impl Into<String>,
        xs: &[X],
        ys: &[Y],
    ) -> Self {
        self.push_line(name.into(), to_f64(xs), to_f64(ys), true)
    }

    /// The curve of a 1-D density (or any function) `f` on [lo, hi], at 400 points.
    pub fn density(
        self,
        name: impl Into<String>,
        f: impl Fn(f64) -> f64,
        lo: f64,
        hi: f64,
    ) -> Self {
        let xs = crate::math::linspace(lo, hi, 400);
        let ys: Vec<f64> = xs.iter().map(|&x| f(x)).collect();
        self.line(name, &xs, &ys)
    }

    /// Points (xsᵢ, ysᵢ) in one colour.
    pub fn scatter<X: Copy + Into<f64>, Y: Copy + Into<f64>>(
        mut self,
        name: impl Into<String>,
        xs: &[X],
        ys: &[Y],
    ) -> Self {
        self.layers.push(Layer::Scatter {
            name: name.into(),
            xs: to_f64(xs),
            ys: to_f64(ys),
            labels: None,
        });
        self
    }

    /// 2-D points coloured by an integer label (a class, a mixture component), with a legend
    /// entry `"{prefix}{label}"` for each label.
    pub fn scatter_labeled(
        mut self,
        prefix: impl Into<String>,
        xy: &[[f32; 2]],
        labels: &[usize],
    ) -> Self {
        self.layers.push(Layer::Scatter {
            name: prefix.into(),
            xs: xy.iter().map(|p| p[0] as f64).collect(),
            ys: xy.iter().map(|p| p[1] as f64).collect(),
            labels: Some(labels.to_vec()),
        });
        self
    }

    /// A histogram of counts with `bins` equal bins over the values' range.
    pub fn histogram<T: Copy + Into<f64>>(
        mut self,
        name: impl Into<String>,
        values: &[T],
        bins: usize,
    ) -> Self {
        self.layers.push(Layer::Histogram {
            name: name.into(),
            values: to_f64(values),
            bins,
            density: false,
        });
        self
    }

    /// A histogram scaled to unit area, so it sits on the same axes as a density curve.
    pub fn density_histogram<T: Copy + Into<f64>>(
        mut self,
        name: impl Into<String>,
        values: &[T],
        bins: usize,
    ) -> Self {
        self.layers.push(Layer::Histogram {
            name: name.into(),
            values: to_f64(values),
            bins,
            density: true,
        });
        self
    }

    /// A horizontal reference line at height `y` (a bound, a target value).
    pub fn hline(mut self, name: impl Into<String>, y: f64) -> Self {
        self.layers.push(Layer::HLine {
            name: name.into(),
            y,
        });
        self
    }

    /// A vertical reference line at `x` (a true parameter, a mean).
    pub fn vline(mut self, name: impl Into<String>, x: f64) -> Self {
        self.layers.push(Layer::VLine {
            name: name.into(),
            x,
        });
        self
    }

    /// A heatmap of `rows[i][j]` over the rectangle `x` × `y`: row 0 at the bottom (`y.0`),
    /// column 0 at the left (`x.0`). Colours run from dark (low) to yellow (high).
    pub fn heatmap(mut self, x: (f64, f64), y: (f64, f64), rows: Vec<Vec<f64>>) -> Self {
        self.layers.push(Layer::Heatmap { x, y, rows });
        self
    }

    /// The heatmap of a 2-D density `f(x, y)` on a `resolution`×`resolution` grid.
    pub fn density_2d(
        self,
        f: impl Fn(f64, f64) -> f64,
        x: (f64, f64),
        y: (f64, f64),
        resolution: usize,
    ) -> Self {
        let n = resolution.max(2);
        let cell = |lo: f64, hi: f64, i: usize| lo + (hi - lo) * (i as f64 + 0.5) / n as f64;
        let rows = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| f(cell(x.0, x.1, j), cell(y.0, y.1, i)))
                    .collect()
            })
            .collect();
        self.heatmap(x, y, rows)
    }

    /// A grid of grey-scale images, `cols` a row: `pixels` holds the images one after another,
    /// each `side`×`side` row-major (64 values for an 8×8 digit). Dark is low, white is high;
    /// the grey scale spans the values' range unless [`Figure::image_range`] fixes it.
    pub fn image_grid(title: impl Into<String>, pixels: &[f32], side: usize, cols: usize) -> Self {
        let mut fig = Figure::new(title);
        fig.images = Some(ImageGrid {
            pixels: pixels.to_vec(),
            side,
            cols,
            captions: vec![],
            range: None,
        });
        let rows = if side == 0 || cols == 0 {
            1
        } else {
            pixels.len().div_ceil(side * side).div_ceil(cols).max(1)
        };
        fig.size = (
            (cols.max(1) as u32 * 80 + 40).min(2000),
            (rows as u32 * 90 + 60).min(3000),
        );
        fig
    }

    /// Captions under the images of an image grid (a label, a value), one per image.
    pub fn captions<S: ToString>(mut self, captions: &[S]) -> Self {
        if let Some(grid) = self.images.as_mut() {
            grid.captions = captions.iter().map(|c| c.to_string()).collect();
        }
        self
    }

    /// Fixes the grey scale of an image grid to [lo, hi] (for example 0..1 for the digits).
    pub fn image_range(mut self, lo: f32, hi: f32) -> Self {
        if let Some(grid) = self.images.as_mut() {
            grid.range = Some((lo, hi));
        }
        self
    }

    /// Displays inline as PNG rather than SVG.
    pub fn png(&self) -> Png {
        Png(self.clone())
    }

    /// The figure as an SVG document.
    pub fn to_svg(&self) -> Result<String> {
        ensure_font()?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(plot_err)?;
        }
        Ok(svg)
    }

    /// The figure as PNG file bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        ensure_font()?;
        let (w, h) = self.size;
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(plot_err)?;
        }
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(plot_err)?;
        writer.write_image_data(&rgb).map_err(plot_err)?;
        writer.finish().map_err(plot_err)?;
        Ok(out)
    }

    /// Saves to `path`, as PNG or SVG by its extension; creates missing folders.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let bytes = match ext.as_deref() {
            Some("png") => self.to_png()?,
            Some("svg") => self.to_svg()?.into_bytes(),
            _ => {
                return Err(Error::param(
                    "path",
                    path.display(),
                    "end the file name in .png or .svg",
                ))
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(dir, e, "choose a folder you can write to"))?;
        }
        std::fs::write(path, bytes)
            .map_err(|e| Error::io(path, e, "choose a folder you can write to"))?;
        Ok(path.to_path_buf())
    }

    /// Saves `NAME.png` and `NAME.svg` into the export folder ([`export_dir`]) and returns both
    /// paths: the one call for putting a figure into your notes.
    pub fn export(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let stem = slug(name);
        if stem.is_empty() {
            return Err(Error::param(
                "name",
                format!("{name:?}"),
                "give the figure a file name with letters or digits",
            ));
        }
        let dir = export_dir();
        Ok((
            self.save(dir.join(format!("{stem}.png")))?,
            self.save(dir.join(format!("{stem}.svg")))?,
        ))
    }

    /// evcxr's display hook: the figure as inline SVG (or the error, as text).
    pub fn evcxr_display(&self) {
        let files = self.auto_export();
        match self.to_svg() {
            Ok(svg) => {
                self.display_record(files);
                println!("EVCXR_BEGIN_CONTENT image/svg+xml\n{svg}\nEVCXR_END_CONTENT");
            }
            Err(e) => display_error(&e),
        }
    }

    /// Sends, next to the image in the same output, what the notes exporter needs to name the
    /// figure's files stably: its title, its name and the stem of its auto-exported files.
    /// Jupyter front ends show the image and skip this MIME type.
    fn display_record(&self, files: Option<String>) {
        let record = serde_json::json!({ "title": self.title, "name": self.name, "files": files });
        println!("EVCXR_BEGIN_CONTENT {FIGURE_MIME}\n{record}\nEVCXR_END_CONTENT");
    }

    /// When the notebook runner sets `GENLAB_AUTO_EXPORT`, every displayed figure is also
    /// saved as `NN-title.png` and `.svg` into the export folder, numbered in display order.
    /// Returns the file stem when both files were written.
    fn auto_export(&self) -> Option<String> {
        std::env::var_os("GENLAB_AUTO_EXPORT")?;
        // Numbered by the files already there, not a counter: evcxr gives every cell its own
        // copy of this crate's statics.
        let dir = export_dir();
        let count = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "svg"))
                    .count()
            })
            .unwrap_or(0);
        let mut stem = slug(&self.title);
        if stem.is_empty() {
            stem = "figure".into();
        }
        let stem = format!("{:02}-{stem}", count + 1);
        let mut saved = true;
        for ext in ["svg", "png"] {
            if let Err(e) = self.save(dir.join(format!("{stem}.{ext}"))) {
                eprintln!("genlab: could not export {stem}.{ext}: {e}");
                record_figure_error(&format!("could not export {stem}.{ext}: {e}"));
                saved = false;
            }
        }
        saved.then_some(stem)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        check_glyphs(self)?;
        root.fill(&WHITE).map_err(plot_err)?;
        match &self.images {
            Some(grid) => self.draw_images(root, grid),
            None => self.draw_chart(root),
        }
    }

    fn data_ranges(&self) -> Result<((f64, f64), (f64, f64))> {
        let mut xs: Vec<f64> = vec![];
        let mut ys: Vec<f64> = vec![];
        for layer in &self.layers {
            match layer {
                Layer::Line {
                    name, xs: x, ys: y, ..
                }
                | Layer::Scatter {
                    name, xs: x, ys: y, ..
                } => {
                    if x.len() != y.len() {
                        return Err(Error::shape(
                            &format!("series `{name}`"),
                            format!("as many y values as x values ({})", x.len()),
                            format!("{} y values", y.len()),
                        ));
                    }
                    if let Layer::Scatter { .. } = layer {
                        check_points(name, x, y)?;
                    }
                    xs.extend(x);
                    ys.extend(y);
                }
                Layer::Histogram {
                    values,
                    bins,
                    density,
                    name,
                } => {
                    let (edges, heights) = histogram_bins(name, values, *bins, *density)?;
                    xs.extend(&edges);
                    ys.extend(&heights);
                    ys.push(0.0);
                }
                Layer::HLine { y, .. } => ys.push(*y),
                Layer::VLine { x, .. } => xs.push(*x),
                Layer::Heatmap { x, y, .. } => {
                    xs.extend([x.0, x.1]);
                    ys.extend([y.0, y.1]);
                }
            }
        }
        let finite = |v: &[f64]| {
            let v: Vec<f64> = v.iter().copied().filter(|v| v.is_finite()).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                (0.0, 1.0)
            } else if hi - lo < 1e-12 {
                (lo - 0.5, hi + 0.5)
            } else {
                let pad = 0.03 * (hi - lo);
                (lo - pad, hi + pad)
            }
        };
        let x = self.x_range.unwrap_or_else(|| finite(&xs));
        let mut y = self.y_range.unwrap_or_else(|| finite(&ys));
        if self.y_range.is_none()
            && self
                .layers
                .iter()
                .any(|l| matches!(l, Layer::Histogram { .. }))
        {
            y.0 = y.0.min(0.0);
        }
        for (name, r) in [("x_range", x), ("y_range", y)] {
            if r.0 >= r.1 || !r.0.is_finite() || !r.1.is_finite() {
                return Err(Error::param(
                    name,
                    format!("{r:?}"),
                    "a range needs finite lo < hi",
                ));
            }
        }
        Ok((x, y))
    }

    fn draw_chart<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let ((x0, x1), (y0, y1)) = self.data_ranges()?;
        let font = FONT_FAMILY;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (font, 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        let x_ticks = |v: &f64| tick_label(*v, x0, x1);
        let y_ticks = |v: &f64| tick_label(*v, y0, y1);
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .bold_line_style(GRID)
            .x_label_formatter(&x_ticks)
            .y_label_formatter(&y_ticks)
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .label_style((font, 14))
            .axis_desc_style((font, 16))
            .draw()
            .map_err(plot_err)?;
        let mut legend = false;
        let mut colour = 0usize;
        let mut next_colour = || {
            let c = PALETTE[colour % PALETTE.len()];
            colour += 1;
            c
        };
        for layer in &self.layers {
            match layer {
                Layer::Heatmap { x, y, rows } => {
                    let finite: Vec<f64> = rows
                        .iter()
                        .flatten()
                        .copied()
                        .filter(|v| v.is_finite())
                        .collect();
                    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let span = if hi > lo { hi - lo } else { 1.0 };
                    let ny = rows.len().max(1) as f64;
                    let cells = rows.iter().enumerate().flat_map(|(i, row)| {
                        let nx = row.len().max(1) as f64;
                        row.iter().enumerate().map(move |(j, v)| {
                            let t = if v.is_finite() { (v - lo) / span } else { 0.0 };
                            let c = ViridisRGB::get_color(t as f32);
                            let cx = |k: f64| x.0 + (x.1 - x.0) * k / nx;
                            let cy = |k: f64| y.0 + (y.1 - y.0) * k / ny;
                            Rectangle::new(
                                [
                                    (cx(j as f64), cy(i as f64)),
                                    (cx(j as f64 + 1.0), cy(i as f64 + 1.0)),
                                ],
                                c.filled(),
                            )
                        })
                    });
                    chart.draw_series(cells).map_err(plot_err)?;
                }
                Layer::Histogram {
                    name,
                    values,
                    bins,
                    density,
                } => {
                    let c = next_colour();
                    let (edges, heights) = histogram_bins(name, values, *bins, *density)?;
                    let bars = heights.iter().enumerate().map(|(i, h)| {
                        Rectangle::new([(edges[i], 0.0), (edges[i + 1], *h)], c.mix(0.45).filled())
                    });
                    let series = chart.draw_series(bars).map_err(plot_err)?;
                    if !name.is_empty() {
                        legend = true;
                        series.label(name.as_str()).legend(move |(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 16, y + 5)], c.mix(0.45).filled())
                        });
                    }
                }
                Layer::Line {
                    name,
                    xs,
                    ys,
                    dashed,
                } => {
                    let c = next_colour();
                    let style = c.stroke_width(2);
                    let points: Vec<(f64, f64)> = xs
                        .iter()
                        .zip(ys)
                        .map(|(x, y)| (*x, *y))
                        .filter(|(x, y)| x.is_finite() && y.is_finite())
                        .collect();
                    let series = if *dashed {
                        chart
                            .draw_series(DashedLineSeries::new(points, 8, 5, style))
                            .map_err(plot_err)?
                    } else {
                        chart
                            .draw_series(LineSeries::new(points, style))
                            .map_err(plot_err)?
                    };
                    if !name.is_empty() {
                        legend = true;
                        series.label(name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                        });
                    }
                }
                Layer::Scatter {
                    name,
                    xs,
                    ys,
                    labels,
                } => {
                    let points = xs.iter().zip(ys).map(|(x, y)| (*x, *y));
                    match labels {
                        None => {
                            let c = next_colour();
                            let series = chart
                                .draw_series(points.map(|p| Circle::new(p, 3, c.mix(0.7).filled())))
                                .map_err(plot_err)?;
                            if !name.is_empty() {
                                legend = true;
                                series
                                    .label(name.as_str())
                                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
                            }
                        }
                        Some(labels) => {
                            if labels.len() != xs.len() {
                                return Err(Error::shape(
                                    "scatter_labeled",
                                    format!("one label per point ({})", xs.len()),
                                    format!("{} labels", labels.len()),
                                ));
                            }
                            let mut distinct = labels.clone();
                            distinct.sort_unstable();
                            distinct.dedup();
                            for k in distinct {
                                let c = PALETTE[k % PALETTE.len()];
                                let mine = points
                                    .clone()
                                    .zip(labels)
                                    .filter(|(_, l)| **l == k)
                                    .map(|(p, _)| Circle::new(p, 3, c.mix(0.7).filled()));
                                legend = true;
                                chart
                                    .draw_series(mine)
                                    .map_err(plot_err)?
                                    .label(format!("{name}{k}"))
                                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
                            }
                        }
                    }
                }
                Layer::HLine { name, y } => {
                    let c = next_colour();
                    let series = chart
                        .draw_series(DashedLineSeries::new(
                            vec![(x0, *y), (x1, *y)],
                            6,
                            4,
                            c.stroke_width(2),
                        ))
                        .map_err(plot_err)?;
                    if !name.is_empty() {
                        legend = true;
                        series.label(name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                        });
                    }
                }
                Layer::VLine { name, x } => {
                    let c = next_colour();
                    let series = chart
                        .draw_series(DashedLineSeries::new(
                            vec![(*x, y0), (*x, y1)],
                            6,
                            4,
                            c.stroke_width(2),
                        ))
                        .map_err(plot_err)?;
                    if !name.is_empty() {
                        legend = true;
                        series.label(name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                        });
                    }
                }
            }
        }
        if legend {
            chart
                .configure_series_labels()
                .position(match self.legend {
                    Corner::UpperRight => SeriesLabelPosition::UpperRight,
                    Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
                    Corner::LowerRight => SeriesLabelPosition::LowerRight,
                    Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
                })
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font((font, 14))
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    }

    fn draw_images<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        grid: &ImageGrid,
    ) -> Result<()> {
        let per = grid.side * grid.side;
        if grid.side == 0
            || grid.cols == 0
            || grid.pixels.is_empty()
            || !grid.pixels.len().is_multiple_of(per)
        {
            return Err(Error::shape(
                "image_grid",
                format!(
                    "a whole number of {0}×{0} images and at least one column",
                    grid.side
                ),
                format!("{} values, {} columns", grid.pixels.len(), grid.cols),
            ));
        }
        if let Some(i) = grid.pixels.iter().position(|v| !v.is_finite()) {
            return Err(Error::param(
                "image_grid",
                format!(
                    "{} at index {i} (image {}, pixel {})",
                    grid.pixels[i],
                    i / per,
                    i % per
                ),
                format!(
                    "every pixel must be a finite number ({0}×{0} images)",
                    grid.side
                ),
            ));
        }
        let n = grid.pixels.len() / per;
        let rows = n.div_ceil(grid.cols);
        let (lo, hi) = grid.range.unwrap_or_else(|| {
            let lo = grid.pixels.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = grid
                .pixels
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            (lo, hi)
        });
        let span = if hi > lo { hi - lo } else { 1.0 };
        let body = root
            .titled(&self.title, (FONT_FAMILY, 20))
            .map_err(plot_err)?;
        let cells = body.split_evenly((rows, grid.cols));
        for (i, cell) in cells.iter().enumerate().take(n) {
            let (w, h) = cell.dim_in_pixel();
            let caption = grid.captions.get(i);
            let text_h = if caption.is_some() { 16 } else { 0 };
            let px = ((w.min(h.saturating_sub(text_h)) as usize).saturating_sub(6) / grid.side)
                .max(1) as i32;
            let x_off = (w as i32 - px * grid.side as i32) / 2;
            let image = &grid.pixels[i * per..(i + 1) * per];
            for (k, v) in image.iter().enumerate() {
                let t = ((v - lo) / span).clamp(0.0, 1.0);
                let g = (t * 255.0).round() as u8;
                let (r, c) = ((k / grid.side) as i32, (k % grid.side) as i32);
                cell.draw(&Rectangle::new(
                    [
                        (x_off + c * px, 3 + r * px),
                        (x_off + (c + 1) * px, 3 + (r + 1) * px),
                    ],
                    RGBColor(g, g, g).filled(),
                ))
                .map_err(plot_err)?;
            }
            if let Some(text) = caption {
                cell.draw(&Text::new(
                    text.clone(),
                    (x_off, 5 + px * grid.side as i32),
                    (FONT_FAMILY, 13),
                ))
                .map_err(plot_err)?;
            }
        }
        Ok(())
    }
}

impl Png {
    /// evcxr's display hook: the figure as an inline PNG.
    pub fn evcxr_display(&self) {
        let files = self.0.auto_export();
        match self.0.to_png() {
            Ok(bytes) => {
                use base64::Engine;
                self.0.display_record(files);
                let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                println!("EVCXR_BEGIN_CONTENT image/png\n{b64}\nEVCXR_END_CONTENT");
            }
            Err(e) => display_error(&e),
        }
    }
}

/// A tick's label on an axis from `lo` to `hi`: as many decimals as the ticks' spacing needs
/// (about a tenth of the range, the spacing plotters' ticks have), so that iterations and counts
/// read `5000`, not `5000.0`, and every tick of one axis has the same number of decimals;
/// scientific notation where the numbers are very large or the range very small.
pub fn tick_label(v: f64, lo: f64, hi: f64) -> String {
    let span = (hi - lo).abs();
    let biggest = lo.abs().max(hi.abs());
    if !v.is_finite() || !span.is_finite() || span == 0.0 {
        return format!("{v}");
    }
    if biggest >= 1e6 || span < 1e-4 {
        return format!("{v:.2e}");
    }
    // Decimals that show the spacing (0 for a spacing ≥ 1, 1 for 0.1 to 1, …), more only where
    // the tick itself needs them (0.25 on an axis whose other ticks are 0.5 apart).
    let base = (-(span / 10.0).log10().floor()).max(0.0) as usize;
    let v = if v.abs() < 1e-12 * biggest.max(1.0) {
        0.0
    } else {
        v
    };
    let decimals = (base..=base + 4)
        .find(|&d| {
            let unit = 10f64.powi(d as i32);
            ((v * unit).round() / unit - v).abs() <= 1e-9 * span
        })
        .unwrap_or(base + 4);
    format!("{v:.decimals$}")
}

/// Shows why a figure could not be drawn, on stderr (where notebook tests look for errors) and
/// as the cell's result, and records it for the notebook runner ([`FIGURE_ERRORS`]).
fn display_error(e: &Error) {
    eprintln!("genlab: the figure could not be drawn: {e}");
    record_figure_error(&format!("the figure could not be drawn: {e}"));
    println!("EVCXR_BEGIN_CONTENT text/plain\nfigure not drawn: {e}\nEVCXR_END_CONTENT");
}

/// The file in the export folder where, under the notebook runner (`GENLAB_AUTO_EXPORT` set),
/// a figure that could not be drawn or exported is recorded, one line each. evcxr sends stderr
/// late or never (evcxr #353), and such a cell still runs to its end; the runner reads this
/// file after every cell, before the next one starts, and fails the cell that wrote to it.
pub const FIGURE_ERRORS: &str = "genlab-figure-errors.txt";

fn record_figure_error(message: &str) {
    if std::env::var_os("GENLAB_AUTO_EXPORT").is_none() {
        return;
    }
    use std::io::Write;
    let path = export_dir().join(FIGURE_ERRORS);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{}", message.replace('\n', " ")));
    if let Err(e) = written {
        eprintln!(
            "genlab: could not record a figure error in {}: {e}",
            path.display()
        );
    }
}

/// The MIME type of the record each displayed figure carries next to its image (title, name,
/// auto-exported file stem), read by `cargo xtask export` to name the figure's files.
pub const FIGURE_MIME: &str = "application/vnd.genlab.figure+json";

/// Where [`Figure::export`] writes: the runner file's `export_dir` when there is one
/// ([`crate::error::runner_setting`]), else `$GENLAB_EXPORT_DIR` when set (the notebook runner
/// points either at `exports/<notebook>/`), else `exports/` under the current folder.
pub fn export_dir() -> PathBuf {
    crate::error::runner_setting("export_dir")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("GENLAB_EXPORT_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("exports"))
}

/// A file-name stem from a title: ASCII letters and digits kept, everything else one `-`.
pub fn slug(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(60).collect()
}

/// Bin edges and bar heights of a histogram (counts, or unit area when `density`).
fn histogram_bins(
    name: &str,
    values: &[f64],
    bins: usize,
    density: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if bins == 0 || bins > 100_000 {
        return Err(Error::param(
            "bins",
            bins,
            format!("histogram `{name}` needs between 1 and 100000 bins"),
        ));
    }
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Err(Error::param(
            "values",
            format!("{} values, none finite", values.len()),
            format!("histogram `{name}` needs at least one finite value"),
        ));
    }
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi <= lo {
        hi = lo + 1.0;
    }
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0.0; bins];
    for v in &finite {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1.0;
    }
    if density {
        let scale = 1.0 / (finite.len() as f64 * width);
        counts.iter_mut().for_each(|c| *c *= scale);
    }
    let edges = (0..=bins).map(|i| lo + width * i as f64).collect();
    Ok((edges, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_have_the_decimals_the_axis_needs() {
        // Iterations and counts: integers.
        assert_eq!(tick_label(5000.0, 0.0, 5000.0), "5000");
        assert_eq!(tick_label(10.0, 0.0, 12.0), "10");
        // A range of a few units: one decimal on every tick, 0 as "0.0".
        assert_eq!(tick_label(1.0, -3.0, 3.0), "1.0");
        assert_eq!(tick_label(-0.5, -3.0, 3.0), "-0.5");
        assert_eq!(tick_label(1e-17, -3.0, 3.0), "0.0");
        // A tick that needs more than the spacing's decimals keeps them.
        assert_eq!(tick_label(0.25, 0.0, 3.0), "0.25");
        assert_eq!(tick_label(0.02, 0.0, 0.1), "0.02");
        // Huge numbers and tiny ranges: scientific.
        assert_eq!(tick_label(2.5e7, 0.0, 3e7), "2.50e7");
        assert_eq!(tick_label(1.00001, 1.0, 1.00002), "1.00e0");
    }

    #[test]
    fn histogram_bins_count_known_values() {
        // Range [0, 4] in 4 bins of width 1: a value on an inner edge goes to the bin it
        // opens, the maximum to the last bin; NaN is left out.
        let values = [0.0, 0.1, 0.2, 1.5, 2.0, 3.99, 4.0, f64::NAN];
        let (edges, counts) = histogram_bins("h", &values, 4, false).unwrap();
        assert_eq!(edges, [0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(counts, [3.0, 1.0, 1.0, 2.0]);
        // Unit area: each count over (7 finite values × width 1).
        let (_, heights) = histogram_bins("h", &values, 4, true).unwrap();
        assert_eq!(heights, [3.0 / 7.0, 1.0 / 7.0, 1.0 / 7.0, 2.0 / 7.0]);
        // Width 0.5 on [−1, 1]: heights are counts / (n · 0.5).
        let (edges, heights) = histogram_bins("h", &[-1.0, -0.9, 0.2, 1.0], 4, true).unwrap();
        assert_eq!(edges, [-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(heights, [1.0, 0.0, 0.5, 0.5]);
    }

    /// A font file without Chinese glyphs on this machine (DejaVu comes with fontconfig on
    /// Debian and Ubuntu).
    fn latin_only_font() -> PathBuf {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("no Latin-only font to test with: apt-get install fonts-dejavu-core")
    }

    #[test]
    fn a_genlab_font_without_chinese_glyphs_is_an_error() {
        let latin = latin_only_font();
        assert!(!has_chinese_glyphs(&latin), "{latin:?} has Chinese glyphs");
        let err = font_path_given(Some(latin.clone().into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Chinese glyphs") && err.contains(&*latin.to_string_lossy()),
            "{err}"
        );
        // A file that is no font at all, and a missing file.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert!(font_path_given(Some(manifest.into())).is_err());
        let err = font_path_given(Some("/nonexistent/font.ttf".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a file"), "{err}");
        // The font figures use has them, and naming it in GENLAB_FONT is fine.
        let cjk = font_path_given(None).unwrap();
        assert!(has_chinese_glyphs(&cjk));
        assert_eq!(font_path_given(Some(cjk.clone().into())).unwrap(), cjk);
    }

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("后验分布 (posterior)"), "posterior");
        assert_eq!(slug("ELBO vs. steps"), "elbo-vs-steps");
        assert_eq!(slug("中文"), "");
    }
}
