//! `cargo xtask <command>`: the one entry point for everything a genlab user does.
//!
//! - `setup`: installs what the notebooks need, and Chromium for the browser test (idempotent;
//!   fast when done).
//! - `lab`: setup, then JupyterLab on `notebooks/`.
//! - `run [NOTEBOOK...] [--param NAME=VALUE ...]`: setup, then executes notebooks headless;
//!   executed copies and figures go to `exports/<notebook>/`.
//! - `export [NOTEBOOK...] [--param NAME=VALUE ...] [--fresh]`: setup, then runs the chapters
//!   whose executed copies are out of date and writes them as MkDocs pages with their figures
//!   into `exports/notes/` (`xtask/export_notes.py`).
//! - `test`: Miri on the engine from the start, in the background; setup; then `cargo test` and
//!   the portable build's tests in the background (see `lane.rs`) next to every notebook (and
//!   `tests/notebooks/`) run with its smoke parameters, failing on any error output; then the
//!   exported chapters built with `mkdocs build --strict`, and 01_bayes run in JupyterLab in
//!   headless Chromium.

mod lane;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use lane::{Lane, Runner};

/// evcxr_jupyter version the notebooks are tested with.
const EVCXR_VERSION: &str = "0.22.0";
/// The font with Chinese glyphs the figures use, and the Debian packages that provide it.
const CJK_FONT: &str = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc";
const DEBIAN_PACKAGES: &[&str] = &["fonts-wqy-microhei", "fontconfig"];
/// The kernel name registered in the project's virtual environment.
const KERNEL: &str = "genlab-rust";

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(&root, false).and_then(|_| setup_browser().map(|_| ())),
        Some("lab") => setup(&root, true).and_then(|_| lab(&root)),
        Some("run") => setup(&root, true).and_then(|_| run(&root, &args[1..])),
        Some("export") => setup(&root, true).and_then(|_| export(&root, &args[1..])),
        Some("test") if args.get(1).map(String::as_str) == Some("--full") => {
            setup(&root, true).and_then(|_| full(&root))
        }
        Some("test") if args.len() > 1 => Err(format!(
            "`cargo xtask test` takes no arguments but `--full` (got `{}`)",
            args[1..].join(" ")
        )),
        Some("test") => test(&root),
        Some("browser-test") => setup(&root, true).and_then(|_| browser_test(&root)),
        Some("bench") => bench(&root, &args[1..]),
        _ => {
            eprintln!("{}", USAGE);
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>
  setup                                   install the kernel, Jupyter (in .venv), fonts and
                                          Chromium (for the browser test)
  lab                                     setup, then JupyterLab on notebooks/
  run [NOTEBOOK...] [--param NAME=VALUE] [--strict]
                                          execute notebooks (all by default) into exports/;
                                          --strict: a demonstration that does not hold is an
                                          error, not a note
  export [NOTEBOOK...] [--param NAME=VALUE] [--fresh]
                                          chapters as MkDocs pages with their figures in
                                          exports/notes/ (runs those not run since a change)
  test                                    cargo test (also the portable build, and Miri on the
                                          engine), then every notebook with smoke parameters
  test --full                             every chapter at its defaults (what a learner runs),
                                          strict: every demonstration must hold (not in CI)
  browser-test                            01_bayes run through JupyterLab in headless Chromium
                                          (part of `test`)
  bench --reference DIR [--workloads W,..] [--rounds N] [--steps-scale X] [--install]
                                          (developers) W1-W3 against PyTorch's scripts in DIR";

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `what`, printing how long it took.
fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let out = f()?;
    println!("[setup] {what}: {:.1} s", start.elapsed().as_secs_f64());
    Ok(out)
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let s = cmd
        .status()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({s})"))
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
        .join("bin")
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// What a first run's setup steps take on a 2-core machine (measured on a fresh one; the
/// README's first-run table): the basis of the estimates `setup` prints.
const EST_FONTS_S: f64 = 10.0;
const EST_KERNEL_S: f64 = 240.0;
const EST_VENV_S: f64 = 20.0;
/// The notebooks' first `:dep genlab` cell, which builds dfdx, plotters and genlab once.
const EST_DEP_BUILD_S: f64 = 60.0;

/// Installs what the notebooks need. On a first run it says what it will do and about how
/// long that takes, then after each step its measured time and what is left. The Python
/// environment is made while the kernel compiles (pip mostly waits on the network).
/// `cells_follow`: a notebook runs next, so its first cell's build is part of the wait.
fn setup(root: &Path, cells_follow: bool) -> Result<()> {
    let start = Instant::now();
    let fonts = !fonts_present();
    let kernel = !evcxr_current();
    let venv = !venv_current(root);
    let dep_build = cells_follow && !notebook_build_done(root);
    let mut left: Vec<(&str, f64)> = [
        (fonts, "fonts", EST_FONTS_S),
        (
            kernel,
            "the Rust kernel (evcxr_jupyter) build",
            EST_KERNEL_S,
        ),
        (venv && !kernel, "the Python environment", EST_VENV_S),
        (
            dep_build,
            "the first notebook cell's build of dfdx, plotters and genlab",
            EST_DEP_BUILD_S,
        ),
    ]
    .into_iter()
    .filter(|(todo, ..)| *todo)
    .map(|(_, what, secs)| (what, secs))
    .collect();
    if fonts || kernel || venv {
        println!(
            "[setup] first run on this machine: {}; about {} in all (measured on 2 cores)",
            left.iter()
                .map(|(what, secs)| format!("{what} (about {})", duration(*secs)))
                .collect::<Vec<_>>()
                .join(", "),
            duration(left.iter().map(|(_, s)| s).sum()),
        );
    }
    let done = |what: &str, clock: Instant, left: &mut Vec<(&str, f64)>| {
        left.retain(|(w, _)| *w != what);
        let rest: f64 = left.iter().map(|(_, s)| s).sum();
        let rest = if left.is_empty() {
            String::new()
        } else {
            format!("; about {} left", duration(rest))
        };
        println!(
            "[setup] {what}: {:.1} s{rest}",
            clock.elapsed().as_secs_f64()
        );
    };
    if fonts {
        let clock = Instant::now();
        setup_fonts()?;
        done("fonts", clock, &mut left);
    }
    let evcxr = if kernel {
        let clock = Instant::now();
        // The Python environment in a thread while cargo builds the kernel.
        let venv_root = root.to_path_buf();
        let venv_thread = std::thread::spawn(move || {
            let clock = Instant::now();
            let made = setup_venv(&venv_root);
            if made.is_ok() && venv {
                println!(
                    "[setup] the Python environment (.venv, made while the kernel builds): {:.1} s",
                    clock.elapsed().as_secs_f64()
                );
            }
            made
        });
        let built = setup_evcxr();
        let made = venv_thread
            .join()
            .unwrap_or_else(|_| Err("the .venv thread panicked".into()));
        let evcxr = built?;
        made?;
        done("the Rust kernel (evcxr_jupyter) build", clock, &mut left);
        evcxr
    } else {
        let clock = Instant::now();
        setup_venv(root)?;
        if venv {
            done("the Python environment", clock, &mut left);
        }
        setup_evcxr()?
    };
    setup_kernel(root, &evcxr)?;
    if fonts || kernel || venv {
        println!("[setup] done in {:.1} s", start.elapsed().as_secs_f64());
    }
    if dep_build {
        println!(
            "[setup] next, the first notebook's `:dep genlab` cell builds dfdx, plotters and genlab \
             for the notebooks (about {}, once)",
            duration(EST_DEP_BUILD_S)
        );
    }
    Ok(())
}

/// `secs` as a learner reads it: "40 s", "4 min", "4 min 30 s".
fn duration(secs: f64) -> String {
    let s = (secs / 10.0).round() as u64 * 10;
    match (s / 60, s % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

/// Whether a notebook build folder under `target/evcxr/` already holds a built dfdx.
fn notebook_build_done(root: &Path) -> bool {
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    // target/evcxr/slot-N/target/<triple>/debug/deps/libdfdx-*.rlib
    dirs(&root.join("target/evcxr")).iter().any(|slot| {
        dirs(&slot.join("target")).iter().any(|triple| {
            dirs(&triple.join("debug/deps")).iter().any(|f| {
                f.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libdfdx-"))
            })
        })
    })
}

fn fonts_present() -> bool {
    Path::new(CJK_FONT).is_file() && Command::new("fc-match").arg("--version").output().is_ok()
}

fn setup_fonts() -> Result<()> {
    // fontconfig's fc-match is how figures find a CJK font on machines without the one below.
    if fonts_present() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", DEBIAN_PACKAGES.join(" "));
    if !is_root() {
        return Err(format!(
            "figures need a font with Chinese glyphs. Install it with: sudo apt-get update && sudo {install} \
             (or set GENLAB_FONT to any CJK .ttf/.otf/.ttc file and rerun)"
        ));
    }
    println!("[setup] installing {}", DEBIAN_PACKAGES.join(", "));
    apt_install(DEBIAN_PACKAGES)
}

/// `apt-get update`, then `apt-get install` of `packages` (as root, non-interactive).
fn apt_install(packages: &[&str]) -> Result<()> {
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Debian's packages for the ARM lane of `cargo xtask test`: a linker for aarch64 and user-mode
/// emulation to run its test binaries (`.cargo/config.toml` names both).
const ARM_PACKAGES: [&str; 3] = [
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user",
];
const ARM_TARGET: &str = "aarch64-unknown-linux-gnu";

/// What the test command's ARM lane needs: the aarch64 standard library (rustup) and
/// `ARM_PACKAGES` (apt-get, as root; otherwise the line to run).
fn setup_arm() -> Result<()> {
    let have = |cmd: &str| Command::new(cmd).arg("--version").output().is_ok();
    if !(have("aarch64-linux-gnu-gcc") && have("qemu-aarch64")) {
        let install = format!("apt-get install -y {}", ARM_PACKAGES.join(" "));
        if !is_root() {
            return Err(format!(
                "the test command's ARM lane needs a cross linker and qemu: sudo apt-get update && sudo {install}"
            ));
        }
        println!(
            "[setup] installing {} (the ARM lane)",
            ARM_PACKAGES.join(", ")
        );
        apt_install(&ARM_PACKAGES)?;
    }
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]));
    if !installed.is_some_and(|list| list.lines().any(|l| l.trim() == ARM_TARGET)) {
        println!("[setup] adding the {ARM_TARGET} standard library (rustup)");
        status(Command::new("rustup").args(["target", "add", ARM_TARGET]))?;
    }
    Ok(())
}

/// genlab's patch to the published evcxr and evcxr_jupyter sources: a cell's reply waits until
/// its stdout and stderr have gone out (see the patch's header).
const EVCXR_PATCH: &str = include_str!("../evcxr-0.22.0-genlab.patch");

/// Installs `~/.cargo/bin/evcxr_jupyter` built from the published 0.22.0 sources with
/// `EVCXR_PATCH` applied. The patched sources live in one per-user folder shared by every clone;
/// a stamp there (the patch that was installed) makes the warm check cheap.
fn setup_evcxr() -> Result<PathBuf> {
    let bin = cargo_bin().join("evcxr_jupyter");
    if evcxr_current() {
        return Ok(bin);
    }
    let dir = evcxr_dir();
    let jupyter = dir.join(format!("evcxr_jupyter-{EVCXR_VERSION}"));
    let installed_stamp = dir.join("installed.patch");
    println!(
        "[setup] building evcxr_jupyter {EVCXR_VERSION} with genlab's patch in {} \
         (a cold build takes about 4 to 10 minutes)",
        dir.display()
    );
    let applied_stamp = dir.join("applied.patch");
    if std::fs::read_to_string(&applied_stamp).ok().as_deref() != Some(EVCXR_PATCH) {
        patched_evcxr_sources(&dir)?;
        std::fs::write(&applied_stamp, EVCXR_PATCH).map_err(|e| e.to_string())?;
    }
    // opt-level 1 and no debug info halve the build (about 6 instead of 10 to 14 minutes on 2
    // cores) with the same cell latency (the kernel's own work is compiling and linking cells).
    status(
        Command::new("cargo")
            .args(["install", "--locked", "--force", "--path"])
            .arg(&jupyter)
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "0"),
    )?;
    std::fs::write(&installed_stamp, EVCXR_PATCH).map_err(|e| e.to_string())?;
    Ok(bin)
}

/// The folder of the patched evcxr sources (one per user, shared by every clone).
fn evcxr_dir() -> PathBuf {
    cache_dir().join(format!("evcxr-{EVCXR_VERSION}-genlab"))
}

/// Whether `~/.cargo/bin/evcxr_jupyter` is the one built with this `EVCXR_PATCH`.
fn evcxr_current() -> bool {
    let dir = evcxr_dir();
    let jupyter = dir.join(format!("evcxr_jupyter-{EVCXR_VERSION}"));
    // evcxr_jupyter has no --version; cargo's install list records what it installed and from
    // where.
    let installed = output(Command::new("cargo").args(["install", "--list"])).unwrap_or_default();
    let from_patched = format!("evcxr_jupyter v{EVCXR_VERSION} ({}):", jupyter.display());
    cargo_bin().join("evcxr_jupyter").is_file()
        && installed.contains(&from_patched)
        && std::fs::read_to_string(dir.join("installed.patch"))
            .ok()
            .as_deref()
            == Some(EVCXR_PATCH)
}

/// Fresh copies of the published evcxr and evcxr_jupyter sources in `dir`, patched.
fn patched_evcxr_sources(dir: &Path) -> Result<()> {
    let crates = ["evcxr", "evcxr_jupyter"].map(|name| format!("{name}-{EVCXR_VERSION}"));
    let mut sources = registry_sources(&crates);
    if sources.is_none() {
        // Not in cargo's registry yet: have cargo fetch them from crates.io (checksummed).
        let fetch = dir.join("fetch");
        std::fs::create_dir_all(fetch.join("src")).map_err(|e| e.to_string())?;
        write_if_changed(
            &fetch.join("Cargo.toml"),
            &format!(
                "[package]\nname = \"genlab-evcxr-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
                 publish = false\n\n[dependencies]\nevcxr_jupyter = \"={EVCXR_VERSION}\"\n\
                 \n[workspace]\n"
            ),
        )?;
        write_if_changed(&fetch.join("src/lib.rs"), "")?;
        status(
            Command::new("cargo")
                .arg("fetch")
                .arg("--manifest-path")
                .arg(fetch.join("Cargo.toml")),
        )?;
        sources = registry_sources(&crates);
    }
    let sources = sources.ok_or("cargo fetch did not unpack evcxr's sources in its registry")?;
    for (name, source) in crates.iter().zip(&sources) {
        let copy = dir.join(name);
        if copy.exists() {
            std::fs::remove_dir_all(&copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        }
        copy_dir(source, &copy)?;
    }
    let patch = dir.join("genlab.patch");
    std::fs::write(&patch, EVCXR_PATCH).map_err(|e| e.to_string())?;
    status(
        Command::new("patch")
            .args(["-p1", "--forward", "--batch", "--quiet", "-d"])
            .arg(dir)
            .arg("-i")
            .arg(&patch),
    )
    .map_err(|e| format!("{e}: applying genlab's evcxr patch needs `patch` (Debian: patch)"))
}

/// The unpacked crates.io sources of `crates` (`name-version`) in cargo's registry, if all are there.
fn registry_sources<const N: usize>(crates: &[String; N]) -> Option<[PathBuf; N]> {
    let registries = std::fs::read_dir(cargo_bin().parent()?.join("registry/src")).ok()?;
    let registries: Vec<PathBuf> = registries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("index.crates.io-") || n.starts_with("github.com-")
            })
        })
        .collect();
    let find = |name: &String| {
        registries
            .iter()
            .map(|r| r.join(name))
            .find(|p| p.join(".cargo-ok").is_file() && p.join("Cargo.toml").is_file())
    };
    let found: Vec<PathBuf> = crates.iter().filter_map(find).collect();
    found.try_into().ok()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(|e| e.to_string())?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| format!("{}: {e}", src.display()))?;
        }
    }
    Ok(())
}

/// The per-user cache folder (`$XDG_CACHE_HOME/genlab` or `~/.cache/genlab`).
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("genlab")
}

/// Whether `.venv` has the packages `xtask/requirements.txt` names (its stamp says so).
fn venv_current(root: &Path) -> bool {
    let wanted = std::fs::read_to_string(root.join("xtask/requirements.txt")).ok();
    root.join(".venv/bin/python").is_file()
        && wanted.is_some()
        && std::fs::read_to_string(root.join(".venv/genlab-requirements.txt")).ok() == wanted
}

fn setup_venv(root: &Path) -> Result<()> {
    if venv_current(root) {
        return Ok(());
    }
    let venv = root.join(".venv");
    let requirements = root.join("xtask/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .map_err(|e| format!("{}: {e}", requirements.display()))?;
    let stamp = venv.join("genlab-requirements.txt");
    let python = venv.join("bin/python");
    if !python.is_file() {
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv)).map_err(|e| {
            format!("{e}: install Python 3 with its venv module (Debian: python3-venv)")
        })?;
    }
    status(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
    )?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())
}

/// Registers the kernel in the venv's Jupyter, started through `xtask/evcxr-kernel.sh`, which
/// gives each running kernel its own persistent build folder under `target/evcxr/`.
fn setup_kernel(root: &Path, evcxr: &Path) -> Result<()> {
    let evcxr_dir = root.join("target/evcxr");
    let config_dir = evcxr_dir.join("config");
    std::fs::create_dir_all(evcxr_dir.join(".cargo")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&config_dir).map_err(|e| e.to_string())?;
    // Cargo reads this for every build folder below target/evcxr/: dependencies (dfdx,
    // plotters, genlab) build optimised once, while each cell builds at opt-level 0.
    write_if_changed(
        &evcxr_dir.join(".cargo/config.toml"),
        "# Written by `cargo xtask setup`: dependencies of notebook cells build optimised.\n\
         [profile.dev.package.\"*\"]\nopt-level = 3\ndebug-assertions = false\noverflow-checks = false\n",
    )?;
    write_if_changed(
        &config_dir.join("evcxr.toml"),
        "# Written by `cargo xtask setup`: cells build fast; dependencies are optimised by\n\
         # target/evcxr/.cargo/config.toml.\n[evcxr]\nopt_level = \"0\"\n",
    )?;
    let kernel_dir = root.join(".venv/share/jupyter/kernels").join(KERNEL);
    std::fs::create_dir_all(&kernel_dir).map_err(|e| e.to_string())?;
    let spec = format!(
        r#"{{
 "argv": [{script}, {evcxr}, "{{connection_file}}"],
 "display_name": "Rust (genlab)",
 "language": "rust",
 "interrupt_mode": "message"
}}
"#,
        script = json_string(&root.join("xtask/evcxr-kernel.sh")),
        evcxr = json_string(evcxr),
    );
    write_if_changed(&kernel_dir.join("kernel.json"), &spec)
}

fn json_string(path: &Path) -> String {
    let s = path.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn notebooks_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "ipynb"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Resolves `01_bayes`, `01_bayes.ipynb` or a path to a notebook file.
fn resolve_notebook(root: &Path, name: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from(name),
        root.join(name),
        root.join("notebooks").join(name),
        root.join("notebooks").join(format!("{name}.ipynb")),
    ];
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        let known: Vec<String> = notebooks_in(&root.join("notebooks"))
            .iter()
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .collect();
        format!(
            "no notebook `{name}`; the notebooks are: {}",
            known.join(", ")
        )
    })
}

fn nbrun(root: &Path, notebooks: &[PathBuf], extra: &[String]) -> Result<()> {
    let mut cmd = Command::new(root.join(".venv/bin/python"));
    cmd.arg(root.join("xtask/nbrun.py"))
        .args(["--kernel", KERNEL])
        .args(extra)
        .args(notebooks)
        .current_dir(root);
    let code = cmd
        .status()
        .map_err(|e| format!("could not start the notebook runner: {e}"))?;
    match code.code() {
        Some(0) => Ok(()),
        Some(2) => Err("no cell was run: fix the parameter named above".into()),
        _ => Err("a notebook failed (its cell and error are printed above)".into()),
    }
}

/// The notebooks and the runner's options (`--param`, and the flags in `flags`) of a `run` or
/// `export` command line; every notebook when none is named.
fn notebook_args(
    root: &Path,
    args: &[String],
    flags: &[&str],
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut notebooks = vec![];
    let mut extra = vec![];
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if flags.contains(&arg.as_str()) {
            extra.push(arg.clone());
        } else if arg == "--param" || arg == "-p" {
            let value = it
                .next()
                .ok_or("--param needs NAME=VALUE, e.g. --param flips=50")?;
            extra.extend(["--param".to_string(), value.clone()]);
        } else if let Some(value) = arg.strip_prefix("--param=") {
            extra.extend(["--param".to_string(), value.to_string()]);
        } else if arg.starts_with('-') {
            return Err(format!("unknown option `{arg}`\n{USAGE}"));
        } else {
            notebooks.push(resolve_notebook(root, arg)?);
        }
    }
    if notebooks.is_empty() {
        notebooks = notebooks_in(&root.join("notebooks"));
    }
    Ok((notebooks, extra))
}

fn run(root: &Path, args: &[String]) -> Result<()> {
    let (notebooks, mut extra) = notebook_args(root, args, &["--strict"])?;
    extra.extend(["--export-root".to_string(), "exports".to_string()]);
    nbrun(root, &notebooks, &extra)
}

/// `export`: the chapters as MkDocs pages in `exports/notes/` (see `xtask/export_notes.py`).
fn export(root: &Path, args: &[String]) -> Result<()> {
    let (notebooks, extra) = notebook_args(root, args, &["--fresh"])?;
    export_notes(root, &notebooks, &extra)
}

/// Runs `xtask/export_notes.py` with `extra` options on `notebooks`.
fn export_notes(root: &Path, notebooks: &[PathBuf], extra: &[String]) -> Result<()> {
    let code = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("xtask/export_notes.py"))
        .args(["--kernel", KERNEL])
        .args(extra)
        .args(notebooks)
        .current_dir(root)
        .status()
        .map_err(|e| format!("could not start the notes exporter: {e}"))?;
    match code.code() {
        Some(0) => Ok(()),
        Some(2) => Err("no cell was run: fix the parameter named above".into()),
        _ => Err("the export failed (the reason is printed above)".into()),
    }
}

/// `test`, in three lanes (see `lane.rs`): Miri from the start, in the background; then the
/// setup; then `cargo test` in the background next to the notebooks, the notes export and the
/// browser test in the foreground. Every lane runs to its end; all failures are reported.
fn test(root: &Path) -> Result<()> {
    let start = Instant::now();
    // Strict mode for every chapter this command runs (the smoke runs, the notes export's
    // runs, the browser test's JupyterLab): a demonstration that does not hold is an error.
    // Set before any thread starts; the robustness runs pass --lenient.
    std::env::set_var("GENLAB_STRICT", "1");
    let logs = root.join("target/test-logs");
    let mut lanes = vec![];
    let miri_root = root.to_path_buf();
    // The ARM step runs in Miri's lane once Miri is done (Miri ends minutes before the
    // cargo-test lane does), after the foreground has installed the aarch64 target and tools.
    let (arm_ready, arm_wait) = std::sync::mpsc::channel::<bool>();
    let foreground = Lane::start("miri, then aarch64", logs.join("miri.log"), move |run| {
        let miri_result = miri(&miri_root, run);
        let arm_result = match arm_wait.recv() {
            Ok(true) => arm_tests(&miri_root, run),
            _ => Err("the aarch64 target or its tools were not installed (see above)".into()),
        };
        miri_result.and(arm_result)
    })
    .and_then(|miri| {
        lanes.push(miri);
        setup(root, false)?;
        let arm = setup_arm();
        let _ = arm_ready.send(arm.is_ok());
        arm
    })
    .and_then(|_| {
        let cargo_root = root.to_path_buf();
        lanes.push(Lane::start(
            "cargo test",
            logs.join("cargo-test.log"),
            move |run| cargo_tests(&cargo_root, run),
        )?);
        notebook_tests(root)
    });
    let mut errors: Vec<String> = foreground.err().into_iter().collect();
    if !lanes.is_empty() {
        println!(
            "[test] foreground done at {:.1} s; waiting for the background lanes",
            start.elapsed().as_secs_f64()
        );
    }
    for lane in lanes {
        if let Err(e) = lane.join() {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        println!("[test] all done in {:.1} s", start.elapsed().as_secs_f64());
        Ok(())
    } else {
        Err(format!(
            "{} of the test command's parts failed after {:.1} s:\n  {}",
            errors.len(),
            start.elapsed().as_secs_f64(),
            errors.join("\n  ")
        ))
    }
}

/// `cargo test`, then the same tests on the portable build.
///
/// With `GENLAB_THREADS=1`: the default team of each training is then the calling thread alone.
/// Next to the notebooks and Miri, every core is busy, and a team's helper, which spins for a
/// millisecond between calls to catch the next one, only takes CPU from the other lanes (the
/// GAN, diffusion and VAE tests under nextest, two at a time: 243 s with two-thread teams,
/// 183 s with one). The engine splits a batch into the same chunks whatever the team's size,
/// so the results are the same bits; the two-thread paths are tested with explicit teams
/// (`mlp::`, Miri with two CPUs) and run in every notebook.
fn cargo_tests(root: &Path, run: &mut Runner) -> Result<()> {
    let mut cmd = run.command("cargo");
    cmd.args(["test", "--workspace"])
        .env("GENLAB_THREADS", "1")
        .current_dir(root);
    run.run(&mut cmd)?;
    println!("[test] cargo test: passed at {:.1} s", run.elapsed());
    // The build a learner on an ARM laptop gets: every x86-64 kernel compiled out. The same
    // tests, less the four that train many or large models (minutes each on the portable
    // kernel; the gradient checks against dfdx cover its arithmetic, and the cheaper tests of
    // the same models, e.g. the samplers' oracle and the GAN's steps, run here too).
    let mut cmd = run.command("cargo");
    cmd.args([
        "test",
        "-p",
        "genlab",
        "--features",
        "portable",
        "--lib",
        "--tests",
        "--",
        "--skip",
        "ddim_in_50_steps_is_within_10_percent_of_ddpm",
        "--skip",
        "the_plain_gan_covers_the_ring_at_w2_settings",
        "--skip",
        "gan_digits_have_fewer_grey_pixels_than_vae_means",
        "--skip",
        "the_minimax_gan_learns_the_ring",
    ])
    .env("GENLAB_THREADS", "1")
    .current_dir(root);
    run.run(&mut cmd)?;
    println!(
        "[test] cargo test --features portable: passed at {:.1} s",
        run.elapsed()
    );
    Ok(())
}

/// The build an ARM laptop compiles (aarch64: the portable kernel, no x86 code at all):
/// every test compiles for it, and the kernels' and the engine's tests (the code that differs
/// between targets) run under qemu's user-mode emulation. At opt-level 1 for genlab (the
/// test profile's 3 would only slow the compile of binaries that mostly do not run). In its
/// own target folder, `target/arm`: in the shared `target/` it waited for the cargo-test lane's
/// lock (a clean-clone run: 1,190 s, against 1,117 s with the folder of its own, which rebuilds
/// the host's build scripts but never waits).
fn arm_tests(root: &Path, run: &mut Runner) -> Result<()> {
    let opt = "profile.test.package.genlab.opt-level=1";
    let dir = root.join("target/arm");
    let mut cmd = run.command("cargo");
    cmd.args([
        "test", "-p", "genlab", "--target", ARM_TARGET, "--config", opt,
    ])
    .arg("--target-dir")
    .arg(&dir)
    .args(["--lib", "--tests", "--no-run"])
    .current_dir(root);
    run.run(&mut cmd)?;
    let mut cmd = run.command("cargo");
    cmd.args([
        "test", "-p", "genlab", "--target", ARM_TARGET, "--config", opt, "--lib",
    ])
    .arg("--target-dir")
    .arg(&dir)
    .args(["--", "kernels::", "mlp::"])
    .env("GENLAB_THREADS", "1")
    .current_dir(root);
    run.run(&mut cmd)?;
    println!(
        "[test] aarch64: every test compiles, the kernels' and the engine's tests pass under qemu, at {:.1} s",
        run.elapsed()
    );
    Ok(())
}

/// The Python unit tests, every notebook with its smoke parameters, the notes export and the
/// browser test.
fn notebook_tests(root: &Path) -> Result<()> {
    status(
        Command::new(root.join(".venv/bin/python"))
            .args([
                "-m",
                "unittest",
                "discover",
                "-s",
                "xtask",
                "-p",
                "test_*.py",
            ])
            .current_dir(root),
    )?;
    let mut notebooks = notebooks_in(&root.join("notebooks"));
    notebooks.extend(notebooks_in(&root.join("tests/notebooks")));
    // Strict: a demonstration that does not hold at the smoke values is an error.
    let extra = [
        "--smoke".to_string(),
        "--strict".to_string(),
        "--export-root".to_string(),
        "target/notebook-tests".to_string(),
    ];
    // Each chapter's robustness edits (lenient) run right after its strict smoke run, in the
    // same kernel, as a learner edits the parameters cell and runs all cells again.
    let mut extra = extra.to_vec();
    for (notebook, params) in ROBUSTNESS.iter() {
        extra.extend([
            "--edit".to_string(),
            format!("{notebook} {}", params.join(" ")),
        ]);
    }
    extra.extend(["--edit-root", "target/robustness"].map(String::from));
    let clock = Instant::now();
    nbrun(root, &notebooks, &extra)?;
    println!(
        "[test] every notebook at its smoke values, strict, and {} edited chapters, lenient: {:.1} s",
        ROBUSTNESS.len(),
        clock.elapsed().as_secs_f64()
    );
    // The chapters just run, exported as pages and built with `mkdocs build --strict` (every
    // image link checked); then 01_bayes again with a cell inserted: its figures keep their
    // file names.
    let clock = Instant::now();
    let chapters = notebooks_in(&root.join("notebooks"));
    let exports = ["--exports", "target/notebook-tests"].map(String::from);
    let mut build = vec!["--no-run".to_string(), "--build".to_string()];
    build.extend(exports.clone());
    build.extend(["--out", "target/notebook-tests/notes"].map(String::from));
    export_notes(root, &chapters, &build)?;
    let mut stable = vec!["--check-stable".to_string()];
    stable.extend(exports);
    export_notes(root, &[root.join("notebooks/01_bayes.ipynb")], &stable)?;
    println!(
        "[test] notes export and stable names: {:.1} s",
        clock.elapsed().as_secs_f64()
    );
    browser_test(root)
}

/// Edits a learner makes in the first hour, two per chapter, each at another seed (on top of
/// the smoke values; 04's section 5 at 1,000 iterations and one or two seeds, where the smoke
/// values run its defaults), run after the chapter's strict run in the same kernel (the
/// runner's `--edit`), into `target/robustness/<n>/`. Every one must run its chapter to the
/// end in lenient mode; a
/// demonstration that does not hold there prints its note (listed by the runner) instead of
/// stopping the chapter. The first edit of 01, 02 (seed), 03 and 04 are the ones that stopped
/// their chapters before demonstrations were told apart from identities.
const ROBUSTNESS: [(&str, &[&str]); 10] = [
    (
        "01_bayes",
        &["seed=1", "prior_a=50", "prior_b=50", "grid_points=11"],
    ),
    (
        "01_bayes",
        &[
            "seed=2",
            "prior_a=0.5",
            "prior_b=0.5",
            "flips=1000",
            "normal_obs=100",
        ],
    ),
    ("02_elbo", &["seed=1", "lr=0.5"]),
    ("02_elbo", &["seed=2", "samples=1", "sigma=0.3"]),
    ("03_vae", &["seed=1", "beta=0.0", "hidden=32", "latent=2"]),
    (
        "03_vae",
        &["seed=2", "binarise=true", "lr=0.01", "batch_size=37"],
    ),
    (
        "04_gan",
        &[
            "seed=1",
            "use_minimax=true",
            "pack=4",
            "collapse_seeds=2",
            "collapse_iters=1000",
        ],
    ),
    (
        "04_gan",
        &[
            "seed=2",
            "lr=1e-3",
            "batch_size=64",
            "pack=1",
            "collapse_seeds=1",
            "collapse_iters=1000",
        ],
    ),
    (
        "05_diffusion",
        &["seed=1", "big_step_alpha=0.9", "small_step_alpha=0.95"],
    ),
    ("05_diffusion", &["seed=2", "n_samples=30", "toy_iters=300"]),
];

/// `cargo xtask test --full`: every chapter at its default parameters, strict, into
/// `target/full-tests/`: the runs a learner makes, with every demonstration held to its claim
/// (the test command runs the chapters at their smoke values). Several minutes; not in CI.
fn full(root: &Path) -> Result<()> {
    std::env::set_var("GENLAB_STRICT", "1");
    let clock = Instant::now();
    let chapters = notebooks_in(&root.join("notebooks"));
    let extra = ["--strict", "--export-root", "target/full-tests"].map(String::from);
    nbrun(root, &chapters, &extra)?;
    println!(
        "[test --full] {} chapters at their defaults, strict: {:.1} s",
        chapters.len(),
        clock.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The engine's unsafe code (`src/kernels.rs`, `src/mlp/`) and its tests under Miri, once per
/// kernel: the portable one, AVX2 + FMA and AVX-512 (Miri takes the CPU features it may use
/// from the target features of the build). They run in `miri/`, a crate that includes those
/// files by path, because dfdx does not build on the nightly compiler Miri needs.
fn miri(root: &Path, run: &mut Runner) -> Result<()> {
    let has_miri = || {
        output(Command::new("cargo").args(["+nightly", "miri", "--version"])).is_some()
            && output(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))
                .is_some_and(|l| l.contains("rust-src"))
    };
    if !has_miri() {
        println!("[test] miri: installing the nightly toolchain's miri and rust-src (rustup)");
        let have_nightly = output(Command::new("rustup").args(["toolchain", "list"]))
            .is_some_and(|l| l.lines().any(|t| t.starts_with("nightly")));
        let mut cmd = run.command("rustup");
        if have_nightly {
            cmd.args([
                "component",
                "add",
                "--toolchain",
                "nightly",
                "miri",
                "rust-src",
            ]);
        } else {
            cmd.args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "miri",
                "--component",
                "rust-src",
            ]);
        }
        run.run(&mut cmd)?;
    }
    let miri_dir = root.join("miri");
    // Each run tests its own kernel (the kernel tests under Miri take only the newest kernel
    // the build enables). The engine's own tests (`mlp::`: the networks, which train ReLU
    // networks, the team and the aligned buffers) run once, with the AVX2 kernel: their
    // unsafe code is the same with every kernel, and
    // Miri has no 512-bit max or compare, which the AVX-512 kernel's (leaky) ReLU epilogues
    // use (the kernel tests skip those epilogues under Miri). That run also shows Miri two
    // cores, so that every `Team` there has its helper thread and Miri checks the hand-off
    // between the two threads for data races (with one core, as Miri reports by default, a
    // team runs everything on the caller): +7 s.
    // `error::` (checks and demonstrations) has no unsafe code: it runs natively only.
    for (name, rustflags, features, skip) in [
        ("portable", "", Some("portable"), &["error::", "mlp::"][..]),
        (
            "avx2",
            "-C target-feature=+avx2,+fma",
            None,
            &["error::"][..],
        ),
        (
            "avx512",
            "-C target-feature=+avx512f,+avx2,+fma",
            None,
            &["error::", "mlp::"][..],
        ),
    ] {
        // One process for all the lane's tests: Miri interprets on one thread either way, and a
        // process per test (cargo-nextest, two at a time) cost ~2.5 s of CPU each to start
        // (the portable lane alone: 121 s of CPU against 66 s in one process, same wall time
        // on an idle machine; the test command's other lanes want that CPU).
        let mut cmd = run.command("cargo");
        cmd.args(["+nightly", "miri", "test"]);
        if let Some(f) = features {
            cmd.args(["--features", f]);
        }
        cmd.arg("--");
        for prefix in skip {
            cmd.args(["--skip", prefix]);
        }
        cmd.current_dir(&miri_dir)
            .env("CARGO_TARGET_DIR", root.join(format!("target/miri-{name}")))
            .env("RUSTFLAGS", rustflags);
        if name == "avx2" {
            cmd.env("MIRIFLAGS", "-Zmiri-num-cpus=2");
        }
        run.run(&mut cmd)?;
        println!(
            "[test] miri ({name} kernel): passed at {:.1} s",
            run.elapsed()
        );
    }
    Ok(())
}

fn lab(root: &Path) -> Result<()> {
    println!("[lab] starting JupyterLab on notebooks/ (figures you export go to exports/)");
    status(&mut lab_command(root))
}

/// JupyterLab on `notebooks/`, as `lab` starts it (the browser test adds its own options).
fn lab_command(root: &Path) -> Command {
    let mut cmd = Command::new(root.join(".venv/bin/jupyter"));
    cmd.args(["lab", "--notebook-dir"])
        .arg(root.join("notebooks"))
        .env("GENLAB_EXPORT_DIR", root.join("exports"))
        .current_dir(root);
    if is_root() {
        // Jupyter refuses to run as root without this (containers and CI machines are root).
        cmd.arg("--allow-root");
    }
    cmd
}

/// Debian's Chromium for the browser test: `$GENLAB_CHROMIUM`, else the `chromium` package
/// (installed here when run as root).
fn setup_browser() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("GENLAB_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let found = || {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    };
    if let Some(path) = found() {
        return Ok(path);
    }
    if !is_root() {
        return Err(
            "the browser test needs Chromium: sudo apt-get install chromium \
                    (or set GENLAB_CHROMIUM to a Chromium executable)"
                .into(),
        );
    }
    println!("[setup] installing chromium (the browser test's browser)");
    apt_install(&["chromium"])?;
    found().ok_or_else(|| "apt-get installed chromium, but /usr/bin/chromium is missing".into())
}

/// A token no other local user can guess, for the test's JupyterLab.
fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // No /dev/urandom: the clock and the process id, hashed.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        bytes[..8].copy_from_slice(&h.finish().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The browser test (`xtask/browser_test.py`): JupyterLab started as `lab` starts it, on
/// loopback with a token and a free port, with settings of its own (autosave off, every cell
/// in the page); headless Chromium runs `01_bayes` through the UI; screenshots in
/// `exports/browser-test/`.
fn browser_test(root: &Path) -> Result<()> {
    let chromium = setup_browser()?;
    let clock = Instant::now();
    let work = root.join("target/browser-test");
    let settings = work.join("user-settings/@jupyterlab");
    for (file, json) in [
        ("docmanager-extension/plugin", r#"{ "autosave": false }"#),
        (
            "notebook-extension/tracker",
            r#"{ "windowingMode": "none" }"#,
        ),
        (
            "apputils-extension/notification",
            r#"{ "checkForUpdates": false, "fetchNews": "false" }"#,
        ),
    ] {
        let path = settings.join(format!("{file}.jupyterlab-settings"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        write_if_changed(&path, json)?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?
        .port();
    let token = random_token();
    let log_path = work.join("jupyter.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut server = lab_command(root)
        .args([
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            &format!("--ServerApp.port={port}"),
            "--ServerApp.port_retries=0",
            &format!("--IdentityProvider.token={token}"),
        ])
        .arg(format!(
            "--LabApp.user_settings_dir={}",
            work.join("user-settings").display()
        ))
        .arg(format!(
            "--LabApp.workspaces_dir={}",
            work.join("workspaces").display()
        ))
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("could not start JupyterLab: {e}"))?;
    let result = status(
        Command::new(root.join(".venv/bin/python"))
            .arg(root.join("xtask/browser_test.py"))
            .arg(format!("--url=http://127.0.0.1:{port}"))
            .arg(format!("--token={token}"))
            .arg("--notebook")
            .arg(root.join("notebooks/01_bayes.ipynb"))
            .arg("--chromium")
            .arg(&chromium)
            .arg("--screenshots")
            .arg(root.join("exports/browser-test"))
            .current_dir(root),
    );
    // The script asked the server to shut down (it stops its kernels); give it time to.
    let stop = Instant::now();
    while server.try_wait().map_err(|e| e.to_string())?.is_none() {
        if stop.elapsed().as_secs() > 30 {
            let _ = server.kill();
            let _ = server.wait();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    result.map_err(|e| format!("{e} (JupyterLab's log: {})", log_path.display()))?;
    println!(
        "[test] browser test: {:.1} s",
        clock.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A benchmark workload: our subcommand, PyTorch's script, and the numbers to compare (keys
/// of both JSON lines; `*_seconds` are times, the rest quality metrics).
struct Workload {
    name: &'static str,
    label: &'static str,
    script: &'static str,
    keys: &'static [&'static str],
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "vae-digits",
        label: "W1",
        script: "torch_vae.py",
        keys: &["train_seconds", "test_neg_elbo"],
    },
    Workload {
        name: "gan-ring",
        label: "W2",
        script: "torch_gan.py",
        keys: &["train_seconds", "modes", "high_quality"],
    },
    Workload {
        name: "ddpm-digits",
        label: "W3",
        script: "torch_ddpm.py",
        keys: &["train_seconds", "sample_seconds", "nn_ratio"],
    },
];

/// The benchmark: our `genlab-bench <workload>` and the PyTorch reference script, alternated
/// for several rounds in one run, PyTorch at its default threads and at one thread; medians
/// and ratios per workload.
fn bench(root: &Path, args: &[String]) -> Result<()> {
    let (mut reference, mut rounds, mut scale, mut install) =
        (None, 3usize, "1".to_string(), false);
    let mut chosen: Vec<String> = WORKLOADS.iter().map(|w| w.name.to_string()).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--install" => install = true,
            "--reference" | "--rounds" | "--steps-scale" | "--workloads" => {
                let value = it.next().ok_or(format!("{arg} needs a value"))?;
                match arg.as_str() {
                    "--reference" => reference = Some(PathBuf::from(value)),
                    "--rounds" => {
                        rounds = value
                            .parse()
                            .ok()
                            .filter(|r| *r >= 1)
                            .ok_or(format!("--rounds {value}: use a whole number ≥ 1"))?
                    }
                    "--workloads" => {
                        chosen = value.split(',').map(|w| w.trim().to_string()).collect();
                        if let Some(bad) = chosen
                            .iter()
                            .find(|w| !WORKLOADS.iter().any(|k| k.name == w.as_str()))
                        {
                            let known: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                            return Err(format!("--workloads: `{bad}` is not one of {known:?}"));
                        }
                    }
                    _ => scale = value.clone(),
                }
            }
            _ => return Err(format!("unknown option `{arg}`\n{USAGE}")),
        }
    }
    let reference = reference.ok_or(
        "--reference DIR is required: the folder with the torch_*.py scripts (../shared/reference)",
    )?;
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| chosen.iter().any(|c| c == w.name))
        .collect();
    for w in &workloads {
        let script = reference.join(w.script);
        if !script.is_file() {
            return Err(format!("{} not found", script.display()));
        }
    }
    let venv = root.join(".venv-bench");
    let python = venv.join("bin/python");
    let has_torch = python.is_file()
        && Command::new(&python)
            .args(["-c", "import torch, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !has_torch {
        if !install {
            return Err(format!(
                "PyTorch is not installed in {}: rerun with --install (about 5 GB from PyPI)",
                venv.display()
            ));
        }
        timed("PyTorch into .venv-bench", || {
            if !python.is_file() {
                status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            }
            status(
                Command::new(&python).args(["-m", "pip", "install", "--quiet", "torch", "numpy"]),
            )
        })?;
    }
    status(
        Command::new("cargo")
            .args(["build", "--quiet", "--release", "--bin", "genlab-bench"])
            .current_dir(root),
    )?;
    let ours = root.join("target/release/genlab-bench");
    let runners = ["genlab", "pytorch (default threads)", "pytorch (1 thread)"];
    // results[workload][runner][key] = the values of every round.
    let mut results: Vec<Vec<Vec<Vec<f64>>>> = workloads
        .iter()
        .map(|w| vec![vec![vec![]; w.keys.len()]; runners.len()])
        .collect();
    for round in 0..rounds {
        println!("[bench] round {} of {rounds}", round + 1);
        for (wi, w) in workloads.iter().enumerate() {
            for (which, per_key) in results[wi].iter_mut().enumerate() {
                let mut cmd = if which == 0 {
                    let mut c = Command::new(&ours);
                    c.args([w.name, "--steps-scale", &scale]);
                    c
                } else {
                    let mut c = Command::new(&python);
                    c.arg(reference.join(w.script))
                        .args(["--steps-scale", &scale]);
                    if which == 2 {
                        c.env("OMP_NUM_THREADS", "1").env("MKL_NUM_THREADS", "1");
                    }
                    c
                };
                let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
                let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !out.status.success() {
                    return Err(format!(
                        "{cmd:?} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                println!("{line}");
                for (values, key) in per_key.iter_mut().zip(w.keys) {
                    values.push(json_number(&line, key).ok_or(format!("no {key} in: {line}"))?);
                }
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (wi, w) in workloads.iter().enumerate() {
        println!("\n{} {}, median of {rounds} rounds:", w.label, w.name);
        print!("{:<28}", "");
        for key in w.keys {
            print!(" {key:>15}");
        }
        println!();
        for (name, per_key) in runners.iter().zip(&results[wi]) {
            print!("{name:<28}");
            for values in per_key {
                print!(" {:>15.4}", median(values));
            }
            println!();
        }
        let ours = &results[wi][0];
        for (name, theirs) in runners.iter().zip(&results[wi]).skip(1) {
            let parts: Vec<String> = w
                .keys
                .iter()
                .enumerate()
                .map(|(k, key)| {
                    let (o, t) = (median(&ours[k]), median(&theirs[k]));
                    if key.ends_with("_seconds") {
                        format!("{key}: PyTorch takes {:.2}x our time", t / o)
                    } else {
                        format!("{key}: ours / PyTorch {:.4}", o / t)
                    }
                })
                .collect();
            println!("vs {name}: {}", parts.join("; "));
        }
    }
    Ok(())
}

/// The number after `"key":` in a one-line JSON object.
fn json_number(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = line[start..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}
