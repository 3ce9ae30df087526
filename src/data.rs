//! Data for the chapters: the real 8×8 handwritten digits, seeded 2-D toy sets, and a
//! shuffling minibatch iterator.
//!
//! The digits file is `data/digits.csv.gz` (UCI Optical Recognition of Handwritten Digits,
//! provenance in `data/README.md`): 1,797 rows of 64 pixels in 0..=16 and a label. The split is
//! the one of the benchmark spec: row `i` is a test image when `i % 6 == 0` (300 rows), a
//! training image otherwise (1,497 rows).

use crate::error::{ensure, Error, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Pixels per digit image (8×8).
pub const PIXELS: usize = 64;
/// Rows in `digits.csv.gz`.
pub const DIGITS_ROWS: usize = 1797;

/// How pixel values 0..=16 are mapped to floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Scale {
    /// x = pixel, in 0..=16.
    Raw,
    /// x = pixel / 16, in [0, 1] (the VAE's Bernoulli likelihood).
    Unit,
    /// x = 2 · pixel / 16 − 1, in [−1, 1] (diffusion).
    Symmetric,
}

impl Scale {
    fn apply(self, pixel: f32) -> f32 {
        match self {
            Scale::Raw => pixel,
            Scale::Unit => pixel / 16.0,
            Scale::Symmetric => 2.0 * pixel / 16.0 - 1.0,
        }
    }
}

/// A set of images stored row-major: image `i` is `x[i * dim .. (i + 1) * dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Pixel values, `len() * dim` of them.
    pub x: Vec<f32>,
    /// The digit shown in each image.
    pub labels: Vec<u8>,
    /// Values per image (64 for the digits).
    pub dim: usize,
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` as a slice of `dim` values, or an error naming the index.
    pub fn image(&self, i: usize) -> Result<&[f32]> {
        if i >= self.len() {
            // (The message is formatted only here: this runs for every image of every
            // minibatch.)
            let n = self.len();
            return Err(Error::param(
                "index",
                i,
                format!("there are {n} images: use 0..{n}"),
            ));
        }
        Ok(&self.x[i * self.dim..(i + 1) * self.dim])
    }

    /// The images at `indices`, copied into one row-major buffer (a minibatch).
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            out.extend_from_slice(self.image(i)?);
        }
        Ok(out)
    }
}

/// The digits split into the benchmark's train (1,497) and test (300) sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// Rows whose index `i % 6 != 0`.
    pub train: Images,
    /// Rows whose index `i % 6 == 0`.
    pub test: Images,
}

/// Where the digits file is: `$GENLAB_DATA/digits.csv.gz` when that is set, else the
/// `data/` folder of this crate's checkout.
pub fn digits_path() -> PathBuf {
    match std::env::var_os("GENLAB_DATA") {
        Some(dir) => PathBuf::from(dir).join("digits.csv.gz"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz"),
    }
}

/// Loads the digits from [`digits_path`], scaled as asked, split into train and test.
pub fn load_digits(scale: Scale) -> Result<Digits> {
    load_digits_from(digits_path(), scale)
}

/// Loads the digits from a gzipped CSV file (65 integers a row: 64 pixels 0..=16, a label 0..=9).
pub fn load_digits_from(path: impl AsRef<Path>, scale: Scale) -> Result<Digits> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| {
        Error::io(
            path,
            e,
            "The digits ship in the repository's data/ folder; set GENLAB_DATA to the folder \
             that holds digits.csv.gz if you moved it.",
        )
    })?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("not a readable gzipped CSV file ({e})"),
        })?;
    let (rows, labels) = parse_digits_csv(&text).map_err(|message| Error::Data {
        path: path.to_path_buf(),
        message,
    })?;
    if labels.len() != DIGITS_ROWS {
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: format!(
                "expected {DIGITS_ROWS} rows, found {}: the file is truncated or not the digits set",
                labels.len()
            ),
        });
    }
    let mut train = Images {
        x: vec![],
        labels: vec![],
        dim: PIXELS,
    };
    let mut test = train.clone();
    for (i, label) in labels.into_iter().enumerate() {
        let set = if i % 6 == 0 { &mut test } else { &mut train };
        set.x.extend(
            rows[i * PIXELS..(i + 1) * PIXELS]
                .iter()
                .map(|&p| scale.apply(p)),
        );
        set.labels.push(label);
    }
    Ok(Digits { train, test })
}

/// Parses the CSV text into row-major pixels and labels, or says which line is wrong.
fn parse_digits_csv(text: &str) -> std::result::Result<(Vec<f32>, Vec<u8>), String> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != PIXELS + 1 {
            return Err(format!(
                "line {}: expected {} comma-separated values (64 pixels and a label), found {}",
                n + 1,
                PIXELS + 1,
                fields.len()
            ));
        }
        for (j, field) in fields.iter().enumerate() {
            let value: f32 = field.parse().map_err(|_| {
                format!(
                    "line {}, column {}: `{field}` is not a number",
                    n + 1,
                    j + 1
                )
            })?;
            let max = if j == PIXELS { 9.0 } else { 16.0 };
            if !(0.0..=max).contains(&value) || value.fract() != 0.0 {
                return Err(format!(
                    "line {}, column {}: {value} is outside 0..={max}",
                    n + 1,
                    j + 1
                ));
            }
            if j == PIXELS {
                labels.push(value as u8);
            } else {
                pixels.push(value);
            }
        }
    }
    Ok((pixels, labels))
}

/// 2-D points with an integer label each (the component or class they came from).
#[derive(Debug, Clone, PartialEq)]
pub struct Points {
    /// The points.
    pub xy: Vec<[f32; 2]>,
    /// Which component or class each point came from.
    pub labels: Vec<usize>,
}

impl Points {
    /// The points as a set of 2-value rows (labels cut to `u8`: the component index), the
    /// form the models that take images also take (e.g. [`crate::vae::Vae::with_data`]).
    pub fn images(&self) -> Images {
        Images {
            x: self.xy.iter().flatten().copied().collect(),
            labels: self.labels.iter().map(|&l| l.min(255) as u8).collect(),
            dim: 2,
        }
    }
}

/// A component k drawn with probability weightₖ / total (total = Σ weights).
pub(crate) fn pick_component(weights: &[f64], total: f64, rng: &mut impl Rng) -> usize {
    let mut u = rng.gen::<f64>() * total;
    for (j, w) in weights.iter().enumerate() {
        if u < *w {
            return j;
        }
        u -= w;
    }
    weights.len() - 1
}

/// Samples from the 1-D Gaussian mixture p(x) = Σₖ πₖ N(x | μₖ, σₖ²), with the component of each.
pub fn gaussian_mixture_1d(
    n: usize,
    weights: &[f64],
    means: &[f64],
    stds: &[f64],
    seed: u64,
) -> Result<(Vec<f64>, Vec<usize>)> {
    if weights.len() != means.len() || weights.len() != stds.len() || weights.is_empty() {
        return Err(Error::shape(
            "gaussian_mixture_1d (weights, means, stds)",
            "three non-empty slices of one length",
            format!("{}, {}, {}", weights.len(), means.len(), stds.len()),
        ));
    }
    let total: f64 = weights.iter().sum();
    ensure(
        weights.iter().all(|w| *w >= 0.0) && total > 0.0,
        "weights",
        format!("{weights:?}"),
        "mixture weights must be non-negative with a positive sum",
    )?;
    ensure(
        stds.iter().all(|s| *s > 0.0),
        "stds",
        format!("{stds:?}"),
        "standard deviations must be positive",
    )?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(n);
    let mut ks = Vec::with_capacity(n);
    for _ in 0..n {
        let k = pick_component(weights, total, &mut rng);
        let eps: f64 = StandardNormal.sample(&mut rng);
        xs.push(means[k] + stds[k] * eps);
        ks.push(k);
    }
    Ok((xs, ks))
}

/// The 8-Gaussian ring of workload W2: centre k uniform in 0..8 at radius 2, angle 2πk/8,
/// plus `std` · N(0, I) noise (W2 uses std = 0.02).
pub fn ring8(n: usize, std: f32, seed: u64) -> Points {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xy = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let k = rng.gen_range(0..8);
        let angle = 2.0 * std::f32::consts::PI * k as f32 / 8.0;
        let (e0, e1): (f32, f32) = (
            StandardNormal.sample(&mut rng),
            StandardNormal.sample(&mut rng),
        );
        xy.push([2.0 * angle.cos() + std * e0, 2.0 * angle.sin() + std * e1]);
        labels.push(k);
    }
    Points { xy, labels }
}

/// The swiss roll: t uniform in [1.5π, 4.5π], x = (t cos t, t sin t) / 5 + noise · N(0, I).
/// The label is the quarter turn the point lies on (0..6), for colouring.
pub fn swiss_roll(n: usize, noise: f32, seed: u64) -> Points {
    use std::f32::consts::PI;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xy = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let t = 1.5 * PI + 3.0 * PI * rng.gen::<f32>();
        let (e0, e1): (f32, f32) = (
            StandardNormal.sample(&mut rng),
            StandardNormal.sample(&mut rng),
        );
        xy.push([
            t * t.cos() / 5.0 + noise * e0,
            t * t.sin() / 5.0 + noise * e1,
        ]);
        labels.push((((t - 1.5 * PI) / (0.5 * PI)) as usize).min(5));
    }
    Points { xy, labels }
}

/// Two interleaved half circles (scikit-learn's `make_moons`): the upper moon (label 0) and
/// the lower one shifted by (1, −0.5) (label 1), plus `noise` · N(0, I).
pub fn two_moons(n: usize, noise: f32, seed: u64) -> Points {
    use std::f32::consts::PI;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xy = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = i % 2;
        let t = PI * rng.gen::<f32>();
        let (x, y) = if label == 0 {
            (t.cos(), t.sin())
        } else {
            (1.0 - t.cos(), 0.5 - t.sin())
        };
        let (e0, e1): (f32, f32) = (
            StandardNormal.sample(&mut rng),
            StandardNormal.sample(&mut rng),
        );
        xy.push([x + noise * e0, y + noise * e1]);
        labels.push(label);
    }
    Points { xy, labels }
}

/// Minibatches of indices into a data set of `n` items: one shuffled pass (an epoch) per
/// [`Batches::epoch`] call, the last incomplete batch dropped when `drop_last` is set (as the
/// benchmark's W1 does: 1,497 images, batch 100 → 14 batches).
///
/// The generator lives in the struct, so an epoch in one notebook cell and the next epoch in
/// a later cell continue the same random stream.
#[derive(Debug, Clone)]
pub struct Batches {
    n: usize,
    batch_size: usize,
    drop_last: bool,
    rng: StdRng,
}

impl Batches {
    /// A batcher over `n` items, or an error when the batch size does not fit the data.
    pub fn new(n: usize, batch_size: usize, drop_last: bool, seed: u64) -> Result<Self> {
        ensure(
            batch_size >= 1 && batch_size <= n,
            "batch_size",
            batch_size,
            &format!("use a batch size between 1 and the number of examples ({n})"),
        )?;
        Ok(Batches {
            n,
            batch_size,
            drop_last,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Batches per epoch.
    pub fn per_epoch(&self) -> usize {
        if self.drop_last {
            self.n / self.batch_size
        } else {
            self.n.div_ceil(self.batch_size)
        }
    }

    /// One epoch: a fresh permutation of 0..n cut into batches.
    pub fn epoch(&mut self) -> impl Iterator<Item = Vec<usize>> {
        let mut perm: Vec<usize> = (0..self.n).collect();
        perm.shuffle(&mut self.rng);
        let batch = self.batch_size;
        let count = self.per_epoch();
        (0..count).map(move |b| perm[b * batch..((b + 1) * batch).min(perm.len())].to_vec())
    }
}

/// The level index k of each value on `levels` evenly spaced values v_k = lo + k(hi − lo)/(levels − 1)
/// (the digits: 17 levels, on [0, 1] or [−1, 1]), or an error naming the first value that sits
/// off the grid (more than a hundredth of a step away): the discrete likelihoods of chapter 5
/// are probabilities of these levels.
pub fn level_indices(values: &[f32], (lo, hi): (f32, f32), levels: usize) -> Result<Vec<usize>> {
    if levels < 2 || lo.partial_cmp(&hi) != Some(std::cmp::Ordering::Less) {
        return Err(Error::param(
            "levels",
            format!("{levels} levels on [{lo}, {hi}]"),
            "use at least 2 levels on a range lo < hi, e.g. 17 on [−1, 1] for the digits",
        ));
    }
    let step = (hi - lo) / (levels - 1) as f32;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = ((v - lo) / step).round();
            if k >= 0.0 && k < levels as f32 && (v - lo - k * step).abs() <= 0.01 * step {
                Ok(k as usize)
            } else {
                Err(Error::param(
                    "values",
                    format!("{v} at index {i}"),
                    format!(
                        "a discrete likelihood needs data on {levels} levels from {lo} to {hi} \
                         (the digits: 17 levels; load them with the matching Scale)"
                    ),
                ))
            }
        })
        .collect()
}

/// Checks a learner's flat array of rows (images, latents, points): at least one whole row of
/// `width` values, every value finite; the error says the expected shape, or where the
/// non-finite value sits.
pub(crate) fn check_rows(what: &str, values: &[f32], width: usize) -> Result<()> {
    if width == 0 || values.is_empty() || !values.len().is_multiple_of(width) {
        return Err(Error::shape(
            what,
            format!("a whole number of rows of {width} values (at least one row)"),
            format!("{} values", values.len()),
        ));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::param(
            what,
            format!(
                "{} at index {i} (row {}, column {})",
                values[i],
                i / width,
                i % width
            ),
            format!("every value must be a finite number (rows of {width} values)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_row_is_named() {
        let err = parse_digits_csv("1,2,3\n").unwrap_err();
        assert!(err.contains("line 1") && err.contains("found 3"), "{err}");
        let mut row = vec!["0"; 64];
        row.push("12");
        let err = parse_digits_csv(&row.join(",")).unwrap_err();
        assert!(err.contains("outside 0..=9"), "{err}");
    }

    #[test]
    fn an_image_past_the_end_is_an_error_that_names_the_count() {
        let images = Images {
            x: vec![0.5; 3 * 4],
            labels: vec![0, 1, 2],
            dim: 4,
        };
        assert_eq!(images.image(2).unwrap(), &[0.5; 4]);
        let err = images.image(3).unwrap_err().to_string();
        assert!(
            err.contains("index") && err.contains("there are 3 images"),
            "{err}"
        );
    }

    #[test]
    fn batches_cover_each_index_once_per_epoch() {
        let mut b = Batches::new(10, 3, true, 0).unwrap();
        let batches: Vec<_> = b.epoch().collect();
        assert_eq!(batches.len(), 3);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        let mut b = Batches::new(10, 3, false, 0).unwrap();
        assert_eq!(b.epoch().map(|x| x.len()).sum::<usize>(), 10);
        assert!(Batches::new(10, 0, false, 0).is_err());
        assert!(Batches::new(10, 11, false, 0).is_err());
    }

    #[test]
    fn toy_sets_are_seeded() {
        assert_eq!(ring8(50, 0.02, 3), ring8(50, 0.02, 3));
        assert_ne!(ring8(50, 0.02, 3), ring8(50, 0.02, 4));
        assert_eq!(two_moons(20, 0.1, 1).xy.len(), 20);
        assert_eq!(swiss_roll(20, 0.1, 1).labels.len(), 20);
        let (x, k) = gaussian_mixture_1d(100, &[0.3, 0.7], &[-2.0, 2.0], &[0.5, 0.5], 0).unwrap();
        assert_eq!((x.len(), k.len()), (100, 100));
        assert!(gaussian_mixture_1d(5, &[1.0], &[0.0, 1.0], &[1.0], 0).is_err());
    }

    #[test]
    fn ring_points_sit_on_their_centre_at_radius_two() {
        let n = 8000;
        let p = ring8(n, 0.02, 5);
        let mut counts = [0usize; 8];
        for (xy, &k) in p.xy.iter().zip(&p.labels) {
            let angle = 2.0 * std::f32::consts::PI * k as f32 / 8.0;
            let (cx, cy) = (2.0 * angle.cos(), 2.0 * angle.sin());
            // 0.02 noise per coordinate: 6 standard deviations of the distance to the centre.
            let d = ((xy[0] - cx).powi(2) + (xy[1] - cy).powi(2)).sqrt();
            assert!(d < 0.12, "point {xy:?} of mode {k} is {d} from its centre");
            counts[k] += 1;
        }
        // Uniform over the 8 modes: each count n/8 = 1000 ± 30 (binomial), 5 standard errors.
        for (k, c) in counts.iter().enumerate() {
            assert!((*c as f64 - 1000.0).abs() < 150.0, "mode {k}: {c} points");
        }
        let r: f64 =
            p.xy.iter()
                .map(|v| ((v[0] * v[0] + v[1] * v[1]) as f64).sqrt())
                .sum::<f64>()
                / n as f64;
        assert!((r - 2.0).abs() < 1e-3, "mean radius {r}");
    }

    #[test]
    fn mixture_draws_each_component_in_its_proportion() {
        let n = 20_000;
        let (x, k) = gaussian_mixture_1d(n, &[0.3, 0.7], &[-2.0, 2.0], &[0.5, 1.0], 1).unwrap();
        let first = k.iter().filter(|&&c| c == 0).count() as f64 / n as f64;
        // Binomial standard error √(0.3 · 0.7 / n) = 0.0032; allow 5 of them.
        assert!(
            (first - 0.3).abs() < 0.016,
            "component 0 has {first} of the draws"
        );
        // Unnormalised weights mean the same mixture.
        let (_, k2) = gaussian_mixture_1d(n, &[3.0, 7.0], &[-2.0, 2.0], &[0.5, 1.0], 1).unwrap();
        assert_eq!(k, k2);
        // Each draw comes from its own component: means −2 and 2, standard deviations 0.5, 1.
        for (c, mean, std) in [(0, -2.0, 0.5), (1, 2.0, 1.0)] {
            let v: Vec<f64> = x
                .iter()
                .zip(&k)
                .filter(|(_, &j)| j == c)
                .map(|(x, _)| *x)
                .collect();
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt();
            assert!(
                (m - mean).abs() < 0.05 && (s - std).abs() < 0.05,
                "{c}: {m} {s}"
            );
        }
    }
}
