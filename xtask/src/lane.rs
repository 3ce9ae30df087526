//! Lanes: how `cargo xtask test` keeps both cores busy.
//!
//! Much of the test command uses one core: Miri interprets on one thread, and the notebooks
//! spend most of their time in evcxr compiling one cell at a time (measured: 1.0 to 1.1 busy
//! cores while they run). So the command runs in three lanes at once: Miri from the start
//! (it needs neither the kernel nor the virtual environment), then `cargo test` next to the
//! notebooks. The background lanes run at a lower priority (`nice`), so the notebooks, whose
//! kernel and browser waits are the ones with time limits, run at nearly their own speed,
//! and their output goes to a log file under `target/test-logs/`; the console gets one line
//! per step, and a failed step's log.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::Result;

/// A background lane's commands: they write to its log file, at a lower priority.
pub struct Runner {
    log: (File, PathBuf),
    nice: bool,
    clock: Instant,
}

impl Runner {
    /// Commands write to `log` (created anew) and run under `nice` where there is one.
    pub fn background(log: &Path) -> Result<Runner> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let nice = Command::new("nice")
            .arg("true")
            .status()
            .is_ok_and(|s| s.success());
        Ok(Runner {
            log: (file, log.to_path_buf()),
            nice,
            clock: Instant::now(),
        })
    }

    /// `program`, under `nice -n 10` in a background lane.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if self.nice {
            let mut cmd = Command::new("nice");
            cmd.args(["-n", "10"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    /// Runs `cmd` to its end; an error unless it succeeds.
    pub fn run(&mut self, cmd: &mut Command) -> Result<()> {
        let shown = format!("{cmd:?}");
        let (file, path) = &mut self.log;
        let _ = writeln!(file, "\n$ {shown}");
        let out = file
            .try_clone()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
        crate::status(cmd).map_err(|_| format!("{shown} failed"))
    }

    /// Seconds since this lane started.
    pub fn elapsed(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }
}

/// A lane running in its own thread.
pub struct Lane {
    name: &'static str,
    log: PathBuf,
    handle: JoinHandle<Result<()>>,
}

impl Lane {
    /// Starts `work` in a background lane that logs to `log`.
    pub fn start(
        name: &'static str,
        log: PathBuf,
        work: impl FnOnce(&mut Runner) -> Result<()> + Send + 'static,
    ) -> Result<Lane> {
        let mut runner = Runner::background(&log)?;
        println!(
            "[test] {name}: started in the background (its output: {})",
            log.display()
        );
        let handle = std::thread::spawn(move || work(&mut runner));
        Ok(Lane { name, log, handle })
    }

    /// Waits for the lane; on failure prints the end of its log and returns the error.
    pub fn join(self) -> Result<()> {
        let result = self
            .handle
            .join()
            .unwrap_or_else(|_| Err(format!("the {} lane's thread panicked", self.name)));
        if let Err(e) = &result {
            println!(
                "[test] {} FAILED: {e}\n[test] the end of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 64 * 1024)
            );
        }
        result.map_err(|e| format!("{}: {e} (log: {})", self.name, self.log.display()))
    }
}

/// The last `bytes` of the file at `path` (whole lines), or a note that it cannot be read.
fn tail(path: &Path, bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut buf = vec![];
        f.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok(if len > bytes {
            let from = text.find('\n').map_or(0, |i| i + 1);
            format!("[... earlier lines in the log]\n{}", &text[from..])
        } else {
            text
        })
    };
    read().unwrap_or_else(|e| format!("({} cannot be read: {e})", path.display()))
}
