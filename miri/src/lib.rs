//! genlab's engine (`src/kernels.rs` and `src/mlp/`) compiled on its own, so that its tests run
//! under Miri (`cargo +nightly miri test` in this folder; `cargo xtask test` does it with the
//! portable kernel, with AVX2 and with AVX-512 enabled). The files are genlab's own, included
//! by path: nothing here is a copy.
#![allow(dead_code, unused_imports)]
#![deny(unsafe_op_in_unsafe_fn)]

#[path = "../../src/error.rs"]
pub mod error;
#[path = "../../src/kernels.rs"]
pub mod kernels;
#[path = "../../src/mlp/mod.rs"]
pub mod mlp;

pub use error::{Error, Result};
