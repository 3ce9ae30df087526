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
    /// A chapter's demonstration no longer shows what its text claims (see [`check`]).
    Check(String),
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

/// A notebook's `assert!` that does not panic: `Ok(())` when `ok`, otherwise
/// [`Error::Check`] with `what` (say the claim and the number, e.g.
/// `format!("max |Δ| = {d:.2e} < 1e-6")`). A chapter's check cells end in
/// `check(...)?;` so a run fails when a demonstration stops demonstrating, while the
/// kernel (and every trained model in it) lives on.
pub fn check(ok: bool, what: impl Into<String>) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Check(what.into()))
    }
}
