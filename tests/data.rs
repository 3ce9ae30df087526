//! The digits loader, its split, and its errors on bad files.

use genlab::data::{load_digits, load_digits_from, Scale};
use std::io::Write;

#[test]
fn digits_split_matches_the_benchmark_spec() {
    let d = load_digits(Scale::Raw).unwrap();
    assert_eq!(d.train.len(), 1497);
    assert_eq!(d.test.len(), 300);
    assert_eq!(d.train.x.len(), 1497 * 64);
    assert_eq!(d.test.x.len(), 300 * 64);
    // Every digit appears in both sets, and pixels stay in 0..=16.
    for set in [&d.train, &d.test] {
        for k in 0..10u8 {
            assert!(set.labels.contains(&k));
        }
        assert!(set.x.iter().all(|&p| (0.0..=16.0).contains(&p)));
    }
    // Row 0 of the file is the first test image (0 % 6 == 0); row 1 the first training one.
    let unit = load_digits(Scale::Unit).unwrap();
    let sym = load_digits(Scale::Symmetric).unwrap();
    for i in 0..64 {
        assert!((unit.test.x[i] - d.test.x[i] / 16.0).abs() < 1e-7);
        assert!((sym.train.x[i] - (2.0 * d.train.x[i] / 16.0 - 1.0)).abs() < 1e-7);
    }
    assert_eq!(d.test.labels[0], 0, "the file's first row is a 0");

    // Read the file again by hand: test row k is file row 6k, training row j is the j-th
    // file row whose index is not a multiple of 6 (6⌊j/5⌋ + j mod 5 + 1).
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(
            std::fs::File::open(genlab::data::digits_path()).unwrap(),
        ),
        &mut text,
    )
    .unwrap();
    let rows: Vec<Vec<f32>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|v| v.trim().parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 1797);
    for k in 0..300 {
        let file = &rows[6 * k];
        assert_eq!(d.test.image(k).unwrap(), &file[..64], "test row {k}");
        assert_eq!(d.test.labels[k] as f32, file[64], "test label {k}");
    }
    for j in 0..1497 {
        let file = &rows[6 * (j / 5) + j % 5 + 1];
        assert_eq!(d.train.image(j).unwrap(), &file[..64], "training row {j}");
        assert_eq!(d.train.labels[j] as f32, file[64], "training label {j}");
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let err = load_digits_from("/nonexistent/digits.csv.gz", Scale::Unit)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/digits.csv.gz"), "{err}");
    assert!(err.contains("GENLAB_DATA"), "{err}");
}

#[test]
fn malformed_files_are_clear_errors() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let plain = dir.join("not-gzip.csv.gz");
    std::fs::write(&plain, "1,2,3\n").unwrap();
    let err = load_digits_from(&plain, Scale::Unit)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gzipped"), "{err}");

    let short = dir.join("short.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let row = vec!["0"; 64].join(",") + ",3\n";
    gz.write_all(row.repeat(10).as_bytes()).unwrap();
    std::fs::write(&short, gz.finish().unwrap()).unwrap();
    let err = load_digits_from(&short, Scale::Unit)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected 1797 rows, found 10"), "{err}");
}
