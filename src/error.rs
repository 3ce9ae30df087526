//! One error type for the whole crate.
//!
//! In an evcxr notebook a panic restarts the kernel and every trained model in memory is
//! lost, so nothing a learner can influence (a hyperparameter, a file, a shape, a loss that
//! blows up) panics: it comes back as an [`Error`] that names the value and the fix.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong in `genlab`, each variant saying what was wrong and what to do.
#[derive(Debug)]
pub enum Error {
    /// A hyperparameter or argument outside its valid range.
    InvalidParameter {
        /// The parameter's name, as the learner wrote it (`"batch_size"`).
        name: String,
        /// The offending value, printed.
        value: String,
        /// What a valid value looks like.
        fix: String,
    },
    /// A file that could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
        /// What to do about it.
        fix: String,
    },
    /// A data file that was read but does not hold what it should.
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line number where there is one.
        message: String,
    },
    /// Two things whose sizes must agree do not.
    Shape {
        /// What was being done.
        what: String,
        /// The size that was expected.
        expected: String,
        /// The size that was given.
        got: String,
    },
    /// Training produced a loss that is not a finite number.
    Diverged {
        /// The optimiser step at which the loss stopped being finite.
        step: usize,
        /// The loss value (NaN or infinite).
        loss: f32,
        /// What to try.
        fix: String,
    },
    /// A figure could not be drawn or saved.
    Plot(String),
    /// An error from dfdx (device, optimiser).
    Dfdx(String),
    /// An identity a chapter checks does not hold (see [`check`]): a bug, at any parameters.
    Check(String),
    /// A chapter's demonstration did not show what its text claims, in strict mode (see
    /// [`demo`]): what was expected, with the numbers, and why it can fail.
    Demonstration {
        /// The claim and the numbers that contradict it.
        what: String,
        /// Why it can fail at these settings, and what to try.
        why: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidParameter`].
    pub fn param(name: &str, value: impl fmt::Display, fix: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name: name.to_string(),
            value: value.to_string(),
            fix: fix.into(),
        }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(what: &str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::Shape {
            what: what.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error, fix: impl Into<String>) -> Self {
        Error::Io {
            path: path.into(),
            source,
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidParameter { name, value, fix } => {
                write!(f, "invalid parameter `{name}` = {value}: {fix}")
            }
            Error::Io { path, source, fix } => {
                write!(f, "{}: {source}. {fix}", path.display())
            }
            Error::Data { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Shape {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch in {what}: expected {expected}, got {got}"
            ),
            Error::Diverged { step, loss, fix } => {
                write!(f, "training diverged at step {step}: loss = {loss}. {fix}")
            }
            Error::Plot(message) => write!(f, "plot: {message}"),
            Error::Dfdx(message) => write!(f, "dfdx: {message}"),
            Error::Check(message) => write!(f, "check failed: {message}"),
            Error::Demonstration { what, why } => write!(
                f,
                "demonstration did not hold (strict mode, GENLAB_STRICT=1): {what}. {why}"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Checks a condition on a parameter, returning [`Error::InvalidParameter`] when it fails.
pub(crate) fn ensure(ok: bool, name: &str, value: impl fmt::Display, fix: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::param(name, value, fix))
    }
}

/// An **identity** a chapter checks: a claim true at any valid parameters (a closed form
/// against quadrature, log p(x) = ELBO + KL, probabilities summing to one). `Ok(())` when
/// `ok`, otherwise [`Error::Check`] with `what` (say the claim and the number, e.g.
/// `format!("max |Δ| = {d:.2e} < 1e-6")`), in every mode: an identity that fails is a bug.
/// A notebook's `assert!` that does not panic: the cell stops with a message while the kernel
/// (and every trained model in it) lives on. For claims that hold at the chapter's settings
/// but not at every value a learner can type, use [`demo`].
pub fn check(ok: bool, what: impl Into<String>) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Check(what.into()))
    }
}

/// The first words of the note [`demo`] prints (the test runner counts the notes by them).
pub const DEMO_NOTE: &str = "⚠ 演示没有成立 (demonstration did not hold)";

/// Strict mode: the environment variable `GENLAB_STRICT` is set to anything but `""` or `"0"`
/// (or the runner's file says so, see [`runner_setting`]).
/// `cargo xtask test` (and `cargo xtask run --strict`) set it; a learner can set it for a
/// session with `GENLAB_STRICT=1 cargo xtask lab`. Read at every call, from the environment
/// (one per process: a `static` would not do, as evcxr links a fresh copy of the crate into
/// every cell).
pub fn strict() -> bool {
    let on = |v: &str| !v.is_empty() && v != "0";
    match runner_setting("strict") {
        Some(v) => on(&v),
        None => std::env::var("GENLAB_STRICT").is_ok_and(|v| on(&v)),
    }
}

/// A setting of the notebook runner's file: when the environment variable
/// `GENLAB_RUNNER_FILE` names a file (the runner sets it when it starts a kernel), its line
/// `key=value` overrides the environment variable of the same meaning (`strict` for
/// `GENLAB_STRICT`, `export_dir` for `GENLAB_EXPORT_DIR`). The runner rewrites the file
/// between two runs of a notebook in one kernel (a learner's edit, run again), which the
/// environment of a running kernel cannot be without `unsafe` (`std::env::set_var`). Read at
/// every call; `None` without the variable, the file or the key.
pub fn runner_setting(key: &str) -> Option<String> {
    let path = std::env::var_os("GENLAB_RUNNER_FILE")?;
    setting_in(&std::fs::read_to_string(path).ok()?, key)
}

/// The value of the first `key=value` line of `text` whose key is `key`.
fn setting_in(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// A **demonstration** a chapter checks: a claim true at the chapter's defaults and smoke
/// values (a model learned, an estimator is noisier, a GAN approached the data, a grid is fine
/// enough), not at every value a learner can type. `Ok(())` when `ok`. Otherwise, in
/// [`strict`] mode (the tests), [`Error::Demonstration`]; in the default, lenient mode a note
/// on stdout that starts with [`DEMO_NOTE`] and says what was expected and what happened
/// (`what`), and why it can happen at these settings and what to try (`why`, only formatted
/// when needed), and `Ok(())`: the cell and the chapter go on.
pub fn demo(ok: bool, what: impl Into<String>, why: impl FnOnce() -> String) -> Result<()> {
    demo_to(strict(), &mut std::io::stdout(), ok, what.into(), why)
}

/// [`demo`] with its mode and output given (for tests).
fn demo_to(
    strict: bool,
    out: &mut dyn std::io::Write,
    ok: bool,
    what: String,
    why: impl FnOnce() -> String,
) -> Result<()> {
    if ok {
        return Ok(());
    }
    let why = why();
    if strict {
        return Err(Error::Demonstration { what, why });
    }
    let _ = writeln!(
        out,
        "{DEMO_NOTE}: {what}\n    为什么 (why): {why}\n    \
         本章继续运行；测试时（严格模式 GENLAB_STRICT=1）这是错误。\
         (The chapter goes on; in strict mode, as under the tests, this is an error.)"
    );
    let _ = out.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demonstration_that_holds_is_silent_in_both_modes() {
        for strict in [false, true] {
            let mut out = vec![];
            let called = std::cell::Cell::new(false);
            demo_to(strict, &mut out, true, "x".into(), || {
                called.set(true);
                String::new()
            })
            .unwrap();
            assert!(out.is_empty() && !called.get());
        }
    }

    #[test]
    fn a_demonstration_that_fails_is_a_note_when_lenient_and_an_error_when_strict() {
        let mut out = vec![];
        let what = "JS 0.05 → 0.06: p_g 没有更接近 p_data";
        demo_to(false, &mut out, false, what.into(), || {
            "一维 GAN 会振荡".into()
        })
        .unwrap();
        let note = String::from_utf8(out).unwrap();
        assert!(note.starts_with(DEMO_NOTE), "{note}");
        assert!(
            note.contains(what) && note.contains("一维 GAN 会振荡"),
            "{note}"
        );
        let mut out = vec![];
        let err = demo_to(true, &mut out, false, what.into(), || "why".into()).unwrap_err();
        assert!(out.is_empty());
        assert!(matches!(&err, Error::Demonstration { what: w, why } if w == what && why == "why"));
        assert!(err.to_string().contains("GENLAB_STRICT=1"));
    }

    #[test]
    fn the_runner_file_is_read_line_by_line() {
        let text = "export_dir=/tmp/a=b/01_bayes\nstrict = 0\n";
        assert_eq!(
            setting_in(text, "export_dir").as_deref(),
            Some("/tmp/a=b/01_bayes")
        );
        assert_eq!(setting_in(text, "strict").as_deref(), Some("0"));
        assert_eq!(setting_in(text, "export"), None);
        assert_eq!(setting_in("", "strict"), None);
    }

    #[test]
    fn check_is_an_error_in_every_mode() {
        assert!(check(true, "x").is_ok());
        assert!(matches!(check(false, "x"), Err(Error::Check(m)) if m == "x"));
    }
}
