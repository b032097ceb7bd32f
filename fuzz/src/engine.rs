//! A small mutational fuzzer that runs on the stable toolchain: every target is replayed over
//! its committed corpus, then fed mutations of it (bit flips, interesting values, inserted and
//! deleted ranges, dictionary tokens, splices of two inputs) until the time is up.
//!
//! It has no coverage feedback (that needs sanitizer-coverage instrumentation of every crate,
//! a separate build the CI budget does not allow); the targets make up for part of it by
//! building structured inputs from the bytes (`arbitrary`), so most mutations still reach deep.
//!
//! A panic is caught and reported with the input (saved under the artifacts directory, and
//! minimized). An abort (stack overflow, out of memory) cannot be caught: the input being run is
//! always in `<artifacts>/<target>/current` (length-prefixed), which `cargo xtask fuzz` reads
//! when the process dies from a signal. An input that runs longer than the timeout is reported
//! as a hang by a watchdog thread.
use std::{
    fs,
    io::Write,
    os::unix::fs::FileExt,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// One fuzz target: a function of arbitrary bytes that panics when the code under test
/// misbehaves (a panic of its own, or a broken invariant the target checks).
pub struct Target {
    pub name: &'static str,
    /// What it checks, for `list`.
    pub about: &'static str,
    pub run: fn(&[u8]),
    /// Tokens mutations insert (method names, escapes, field names...).
    pub dict: &'static [&'static [u8]],
    /// Longest input generated.
    pub max_len: usize,
}

/// How a run is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long to mutate after the corpus replay.
    pub time: Duration,
    /// Seed of the mutator (a run is reproducible with the same seed and corpus).
    pub seed: u64,
    /// `<corpus>/<target>/*` are the seeds.
    pub corpus: PathBuf,
    /// Crashes go to `<artifacts>/<target>/crash-<hash>`.
    pub artifacts: PathBuf,
    /// One input taking longer than this is a hang.
    pub timeout: Duration,
}

/// What a run found.
#[derive(Debug)]
pub enum Outcome {
    Clean { execs: u64, seeds: usize },
    Crash(Crash),
}

#[derive(Debug)]
pub struct Crash {
    pub target: &'static str,
    pub message: String,
    /// The smallest input found that still panics.
    pub input: Vec<u8>,
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "fuzz target `{}` crashed: {}", self.target, self.message)?;
        writeln!(f, "input ({} bytes): {}", self.input.len(), escape(&self.input))?;
        if let Some(p) = &self.saved {
            write!(
                f,
                "saved to {} (replay: cargo xtask fuzz --replay {} {})",
                p.display(),
                self.target,
                p.display()
            )?;
        }
        Ok(())
    }
}

/// The input as a Rust byte string literal body (printable ASCII kept, the rest `\xHH`).
pub fn escape(input: &[u8]) -> String {
    let mut s = String::with_capacity(input.len() + 2);
    s.push_str("b\"");
    for &b in input {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);
static QUIET: AtomicBool = AtomicBool::new(false);

/// Panics under [`run_one`] are recorded, not printed (mutations would print thousands).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.load(Ordering::Relaxed) {
                let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                if let Ok(mut m) = PANIC_MESSAGE.lock() {
                    *m = Some(format!("{msg}{at}"));
                }
            } else {
                default(info);
            }
        }));
    });
}

/// Runs `target` on `input`: `Err` with the panic message if it panicked.
pub fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    install_panic_hook();
    QUIET.store(true, Ordering::Relaxed);
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    QUIET.store(false, Ordering::Relaxed);
    result.map_err(|_| {
        PANIC_MESSAGE
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_else(|| "panicked".into())
    })
}

/// The seeds of `target`: every file of `<corpus>/<target>/` (none: one empty input).
pub fn load_corpus(corpus: &Path, target: &str) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let dir = corpus.join(target);
    let mut out = Vec::new();
    if dir.is_dir() {
        let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            let data = fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            out.push((p, data));
        }
    }
    Ok(out)
}

/// Replays the corpus, then mutates it for `opts.time`.
pub fn fuzz(target: &'static Target, opts: &Options) -> Result<Outcome> {
    let seeds = load_corpus(&opts.corpus, target.name)?;
    let dir = opts.artifacts.join(target.name);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let current = Current::open(&dir.join("current"))?;
    let watchdog = Watchdog::start(target.name, opts.timeout, dir.join("current"));
    let mut execs = 0u64;
    for (path, data) in &seeds {
        current.record(data);
        watchdog.started();
        let r = run_one(target, data);
        watchdog.finished();
        execs += 1;
        if let Err(message) = r {
            let message = format!("{message} (corpus file {})", path.display());
            return Ok(Outcome::Crash(crash(target, data.clone(), message, &dir)));
        }
    }
    let mut pool: Vec<Vec<u8>> = seeds.into_iter().map(|(_, d)| d).collect();
    let nseeds = pool.len();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut m = Mutator::new(opts.seed, target);
    let end = Instant::now() + opts.time;
    while Instant::now() < end {
        for _ in 0..64 {
            let input = m.next(&pool);
            current.record(&input);
            watchdog.started();
            let r = run_one(target, &input);
            watchdog.finished();
            execs += 1;
            if let Err(message) = r {
                return Ok(Outcome::Crash(crash(target, input, message, &dir)));
            }
            // A bounded pool of recent inputs besides the seeds: mutations drift further.
            if m.rng.u8(..) < 8 {
                if pool.len() < nseeds.max(1) + 256 {
                    pool.push(input);
                } else {
                    let i = m.rng.usize(nseeds.max(1)..pool.len());
                    pool[i] = input;
                }
            }
        }
    }
    Ok(Outcome::Clean { execs, seeds: nseeds })
}

/// Minimizes and saves a crashing input.
fn crash(target: &'static Target, input: Vec<u8>, message: String, dir: &Path) -> Crash {
    let input = minimize(target, input, Duration::from_secs(5));
    // The message of the minimized input (the same bug, usually with a shorter story).
    let message = run_one(target, &input).err().unwrap_or(message);
    let hash = input.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    let path = dir.join(format!("crash-{hash:016x}"));
    let saved = fs::write(&path, &input).ok().map(|_| path);
    Crash {
        target: target.name,
        message,
        input,
        saved,
    }
}

/// Removes ranges of the input (halves first, then smaller) while it still panics.
pub fn minimize(target: &Target, mut input: Vec<u8>, budget: Duration) -> Vec<u8> {
    let end = Instant::now() + budget;
    let mut chunk = input.len() / 2;
    while chunk > 0 && Instant::now() < end {
        let mut i = 0;
        while i + chunk <= input.len() && Instant::now() < end {
            let mut shorter = input.clone();
            shorter.drain(i..i + chunk);
            if run_one(target, &shorter).is_err() {
                input = shorter;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    input
}

/// `<artifacts>/<target>/current`: the input being run, for a crash the process cannot report.
struct Current(fs::File);

impl Current {
    fn open(path: &Path) -> Result<Self> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Current(f))
    }

    /// One `pwrite`: an 8-byte length, then the input (what follows it may be stale).
    fn record(&self, input: &[u8]) {
        let mut buf = Vec::with_capacity(8 + input.len());
        buf.extend_from_slice(&(input.len() as u64).to_le_bytes());
        buf.extend_from_slice(input);
        let _ = self.0.write_all_at(&buf, 0);
    }
}

/// The input `current` holds (after the process died).
pub fn read_current(path: &Path) -> Option<Vec<u8>> {
    let data = fs::read(path).ok()?;
    let len = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
    data.get(8..8 + len).map(<[u8]>::to_vec)
}

/// Reports an input that runs longer than the timeout, and exits.
struct Watchdog {
    /// Milliseconds since `epoch` at which the running input started; 0: none running.
    started_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Watchdog {
    fn start(target: &'static str, timeout: Duration, current: PathBuf) -> Self {
        let started_ms = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let s = started_ms.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let at = s.load(Ordering::Relaxed);
            if at == 0 {
                continue;
            }
            let ran = Duration::from_millis((epoch.elapsed().as_millis() as u64).saturating_sub(at));
            if ran > timeout {
                let input = read_current(&current).unwrap_or_default();
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "fuzz target `{target}` hangs: one input ran for more than {timeout:?}\ninput ({} bytes): {}\nkept in {}",
                    input.len(),
                    escape(&input),
                    current.display()
                );
                std::process::exit(3);
            }
        });
        Watchdog { started_ms, epoch }
    }

    fn started(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.started_ms.store(now.max(1), Ordering::Relaxed);
    }

    fn finished(&self) {
        self.started_ms.store(0, Ordering::Relaxed);
    }
}

/// Values that often sit on a boundary.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Byte-level mutations of pool inputs, several stacked per input.
pub struct Mutator {
    rng: fastrand::Rng,
    dict: &'static [&'static [u8]],
    max_len: usize,
}

impl Mutator {
    pub fn new(seed: u64, target: &Target) -> Self {
        Mutator {
            rng: fastrand::Rng::with_seed(seed),
            dict: target.dict,
            max_len: target.max_len.max(1),
        }
    }

    /// A new input from the pool.
    pub fn next(&mut self, pool: &[Vec<u8>]) -> Vec<u8> {
        if pool.is_empty() || self.rng.u8(..) < 4 {
            let n = self.rng.usize(..=self.max_len.min(64));
            return std::iter::repeat_with(|| self.rng.u8(..)).take(n).collect();
        }
        let mut input = pool[self.rng.usize(..pool.len())].clone();
        let n = 1 << self.rng.u32(0..4);
        for _ in 0..n {
            self.mutate(&mut input, pool);
        }
        input.truncate(self.max_len);
        input
    }

    fn mutate(&mut self, v: &mut Vec<u8>, pool: &[Vec<u8>]) {
        let r = &mut self.rng;
        match r.u8(0..12) {
            0 if !v.is_empty() => {
                let i = r.usize(..v.len());
                v[i] ^= 1 << r.u8(0..8);
            }
            1 if !v.is_empty() => {
                let i = r.usize(..v.len());
                v[i] = r.u8(..);
            }
            2 if !v.is_empty() => {
                let x = INTERESTING[r.usize(..INTERESTING.len())];
                let width = [1usize, 2, 4, 8][r.usize(..4)].min(v.len());
                let i = r.usize(..=v.len() - width);
                let bytes = if r.bool() { x.to_le_bytes() } else { x.to_be_bytes() };
                v[i..i + width].copy_from_slice(&bytes[..width]);
            }
            3 => {
                let i = r.usize(..=v.len());
                let n = r.usize(1..=16);
                let bytes: Vec<u8> = std::iter::repeat_with(|| r.u8(..)).take(n).collect();
                v.splice(i..i, bytes);
            }
            4 if !v.is_empty() => {
                let i = r.usize(..v.len());
                let n = r.usize(1..=(v.len() - i).min(32));
                v.drain(i..i + n);
            }
            5 if !v.is_empty() => {
                // Copies a range elsewhere (repeats structure: headers, segments, fields).
                let i = r.usize(..v.len());
                let n = r.usize(1..=(v.len() - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = r.usize(..=v.len());
                v.splice(at..at, chunk);
            }
            6 | 7 if !self.dict.is_empty() => {
                let tok = self.dict[r.usize(..self.dict.len())];
                let at = r.usize(..=v.len());
                if r.bool() || at + tok.len() > v.len() {
                    v.splice(at..at, tok.iter().copied());
                } else {
                    v[at..at + tok.len()].copy_from_slice(tok);
                }
            }
            8 if !pool.is_empty() => {
                let other = &pool[r.usize(..pool.len())];
                let cut = r.usize(..=v.len());
                let from = r.usize(..=other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            9 if !v.is_empty() => {
                let i = r.usize(..v.len());
                v[i] = if r.bool() {
                    v[i].wrapping_add(1)
                } else {
                    v[i].wrapping_sub(1)
                };
            }
            10 if !v.is_empty() => {
                let n = r.usize(..v.len());
                v.truncate(n);
            }
            _ => {
                let i = r.usize(..=v.len());
                v.insert(i, r.u8(..));
            }
        }
    }
}
