//! A deterministic mutational fuzz suite over every kind of file loratune reads: safetensors model folders, GGUF
//! files (quantised tensors, whole models, tokenizer metadata), config.json, tokenizer.json /
//! tokenizer_config.json, chat templates, YAML training configs and dataset rows. Each case drives the library's
//! entry points in-process (open, load, generate one token, tokenise, render, data stats) and must end in `Ok` or
//! a typed error: no panic, no abort, no hang, no single allocation above [`ALLOC_BOUND`].
//!
//! The parent process runs each format in a child process (this same binary, `LORATUNE_FUZZ_CHILD` set), which
//! reports every case as it starts and ends; a case that kills its child (abort, stack overflow, an allocation
//! over the bound, which the capped allocator below refuses) is counted, and the child restarts after it. Cases
//! are generated from `seed × format × case number`, so any failure is reproducible with
//! `LORATUNE_FUZZ_ONLY=format:case`; inputs that ever failed are kept in `tests/fuzz/regressions/<format>/` and
//! replayed first on every run.
//!
//! Knobs: `LORATUNE_FUZZ_CASES` (per format, default 2000), `LORATUNE_FUZZ_SEED`, `LORATUNE_FUZZ_FORMATS`
//! (comma-separated), `LORATUNE_FUZZ_ONLY=format:case`.

mod formats;
mod mutate;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The largest single allocation a case may make. The inputs are at most a few hundred kilobytes, so anything
/// near this is a size taken from the file without a check.
pub const ALLOC_BOUND: usize = 1 << 30;

/// The seed of the committed run (any other is a new exploration; failures it finds go to the regressions).
const DEFAULT_SEED: u64 = 0x10ea_7e5e_ed00_2026;
const DEFAULT_CASES: u64 = 2000;
/// A case that reports nothing for this long is a hang.
const HANG: Duration = Duration::from_secs(60);

const OVER_MARK: &str = "LORATUNE-FUZZ-OVER-BOUND";

struct Capped;

static OVER: AtomicUsize = AtomicUsize::new(0);

/// Report an over-bound allocation on stderr without allocating (the process is about to abort).
fn note_over(size: usize) {
    OVER.store(size, Ordering::SeqCst);
    let mut buf = [0u8; 64];
    let mark = OVER_MARK.as_bytes();
    buf[..mark.len()].copy_from_slice(mark);
    let mut n = mark.len();
    buf[n] = b' ';
    n += 1;
    let mut digits = [0u8; 20];
    let mut k = 0;
    let mut v = size;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in (0..k).rev() {
        buf[n] = digits[i];
        n += 1;
    }
    buf[n] = b'\n';
    n += 1;
    // SAFETY: writing a stack buffer to fd 2.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
    }
}

// SAFETY: forwards to the system allocator; refuses (null) only allocations above the bound.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_BOUND {
            note_over(l.size());
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_BOUND {
            note_over(l.size());
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > ALLOC_BOUND {
            note_over(new);
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            }
        })
        .unwrap_or(default)
}

fn regressions_dir(format: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/regressions")
        .join(format)
}

/// The committed regression inputs of a format, sorted by name.
fn regressions(format: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(regressions_dir(format))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ------------------------------------------------------------------------------------------------ child

/// Run cases `[start, end)` of one format, one line per case start (`S n`) and end (`E n ok|err|panic text`).
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let [format, seed, start, end] = parts[..] else {
        eprintln!("bad LORATUNE_FUZZ_CHILD {spec}");
        std::process::exit(2);
    };
    let seed: u64 = seed.parse().unwrap_or(DEFAULT_SEED);
    let (start, end): (u64, u64) = (start.parse().unwrap_or(0), end.parse().unwrap_or(0));
    let fmt = formats::by_name(format).unwrap_or_else(|| {
        eprintln!("unknown format {format}");
        std::process::exit(2);
    });
    let regs = regressions(format);
    let scratch = tempfile::tempdir().expect("scratch folder");
    // Panics are caught per case; keep their message and stay quiet.
    let last_panic = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let lp = last_panic.clone();
    std::panic::set_hook(Box::new(move |info| {
        let msg = format!(
            "{} at {}",
            info.payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default(),
            info.location().map(|l| l.to_string()).unwrap_or_default()
        );
        if let Ok(mut g) = lp.lock() {
            *g = msg;
        }
    }));
    let stdout = std::io::stdout();
    for case in start..end {
        let input = case_input(fmt, &regs, seed, case);
        {
            let mut o = stdout.lock();
            let _ = writeln!(o, "S {case}");
            let _ = o.flush();
        }
        let dir = scratch.path().join(format!("c{case}"));
        let _ = std::fs::create_dir_all(&dir);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (fmt.run)(input.0, &input.1, &dir)
        }));
        let _ = std::fs::remove_dir_all(&dir);
        let line = match outcome {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) if e.trim().is_empty() => "panic an error with an empty message".to_string(),
            Ok(Err(e)) => format!("err {}", one_line(&e, 160)),
            Err(_) => format!(
                "panic {}",
                one_line(
                    &last_panic.lock().map(|g| g.clone()).unwrap_or_default(),
                    300
                )
            ),
        };
        let mut o = stdout.lock();
        let _ = writeln!(o, "E {case} {line}");
        let _ = o.flush();
    }
}

fn one_line(s: &str, max: usize) -> String {
    let s: String = s.replace(['\n', '\r'], " ⏎ ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

/// Case `n` of a format: the regression files first, then generated mutants. Returns (seed, bytes).
fn case_input<'a>(
    fmt: &'a formats::Format,
    regs: &[PathBuf],
    seed: u64,
    case: u64,
) -> (&'a formats::Seed, Vec<u8>) {
    let seeds = fmt.seeds();
    if (case as usize) < regs.len() {
        let p = &regs[case as usize];
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let seed_name = name.split("__").next().unwrap_or("");
        let s = seeds
            .iter()
            .find(|s| s.name == seed_name)
            .unwrap_or(&seeds[0]);
        return (s, std::fs::read(p).unwrap_or_default());
    }
    let mut rng = mutate::case_rng(seed, fmt.name, case);
    let s = mutate::pick(&mut rng, seeds);
    let bytes = (fmt.mutate)(&mut rng, s);
    (s, bytes)
}

// ----------------------------------------------------------------------------------------------- parent

#[derive(Default, Clone)]
struct Tally {
    cases: u64,
    ok: u64,
    err: u64,
    panic: u64,
    abort: u64,
    over: u64,
    hang: u64,
    regressions: u64,
    secs: f64,
    failures: Vec<(u64, String, String)>,
}

impl Tally {
    fn bad(&self) -> u64 {
        self.panic + self.abort + self.over + self.hang
    }
}

/// Drive one format's cases through child processes, restarting after a case that kills its child.
fn run_format(name: &'static str, seed: u64, cases: u64, only: Option<u64>) -> Tally {
    let regs = regressions(name).len() as u64;
    let (mut next, end) = match only {
        Some(c) => (c, c + 1),
        None => (0, regs + cases),
    };
    let mut t = Tally {
        regressions: if only.is_some() { 0 } else { regs },
        ..Default::default()
    };
    let t0 = Instant::now();
    while next < end {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env("LORATUNE_FUZZ_CHILD", format!("{name},{seed},{next},{end}"))
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a fuzz child");
        let out = child.stdout.take().expect("child stdout");
        let mut err = child.stderr.take().expect("child stderr");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let mut current: Option<u64> = None;
        let mut hung = false;
        loop {
            match rx.recv_timeout(HANG) {
                Ok(l) => {
                    if let Some(n) = l.strip_prefix("S ") {
                        current = n.parse().ok();
                    } else if let Some(rest) = l.strip_prefix("E ") {
                        let (n, what) = rest.split_once(' ').unwrap_or((rest, ""));
                        let n: u64 = n.parse().unwrap_or(0);
                        t.cases += 1;
                        if what == "ok" {
                            t.ok += 1;
                        } else if what.starts_with("err") {
                            t.err += 1;
                        } else {
                            t.panic += 1;
                            t.failures.push((n, "panic".into(), what.to_string()));
                        }
                        current = None;
                        next = n + 1;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().ok();
        let _ = reader.join();
        let stderr = err_reader.join().unwrap_or_default();
        if let Some(n) = current {
            // The child died (or hung) inside case n.
            t.cases += 1;
            let (kind, detail) = if hung {
                t.hang += 1;
                ("hang", format!("no answer in {}s", HANG.as_secs()))
            } else if let Some(l) = stderr.lines().find(|l| l.starts_with(OVER_MARK)) {
                t.over += 1;
                (
                    "over-bound",
                    format!(
                        "allocation of {} bytes",
                        l.trim_start_matches(OVER_MARK).trim()
                    ),
                )
            } else {
                t.abort += 1;
                (
                    "abort",
                    format!(
                        "child ended with {:?}: {}",
                        status,
                        one_line(
                            stderr
                                .lines()
                                .rev()
                                .take(3)
                                .collect::<Vec<_>>()
                                .join(" / ")
                                .as_str(),
                            300
                        )
                    ),
                )
            };
            t.failures.push((n, kind.into(), detail));
            next = n + 1;
        } else if next < end {
            // Ended between cases without finishing: a harness failure, not a case's.
            t.abort += 1;
            t.failures.push((
                next,
                "abort".into(),
                format!("child stopped early: {}", one_line(&stderr, 300)),
            ));
            next += 1;
        }
    }
    t.secs = t0.elapsed().as_secs_f64();
    t
}

/// Save a failing input where the suite can be re-run on it, and say how to keep it as a regression.
fn save_failure(name: &str, seed: u64, case: u64) -> Option<PathBuf> {
    let fmt = formats::by_name(name)?;
    let regs = regressions(name);
    let (s, bytes) = case_input(fmt, &regs, seed, case);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(name);
    std::fs::create_dir_all(&dir).ok()?;
    let p = dir.join(format!("{}__{seed:x}-{case}", s.name));
    std::fs::write(&p, bytes).ok()?;
    Some(p)
}

fn main() {
    if let Ok(spec) = std::env::var("LORATUNE_FUZZ_CHILD") {
        child(&spec);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo test <filter>` passes the filter here: run only when it names this suite or a format.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty()
        && !filters
            .iter()
            .any(|f| "fuzz".contains(f.as_str()) || formats::by_name(f).is_some())
    {
        return;
    }
    let seed = env_u64("LORATUNE_FUZZ_SEED", DEFAULT_SEED);
    let cases = env_u64("LORATUNE_FUZZ_CASES", DEFAULT_CASES);
    let only: Option<(String, u64)> = std::env::var("LORATUNE_FUZZ_ONLY").ok().and_then(|v| {
        let (f, c) = v.split_once(':')?;
        Some((f.to_string(), c.parse().ok()?))
    });
    let wanted: Option<Vec<String>> = std::env::var("LORATUNE_FUZZ_FORMATS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let mut names: Vec<&'static str> = formats::ALL
        .iter()
        .map(|f| f.name)
        .filter(|n| wanted.as_ref().is_none_or(|w| w.iter().any(|x| x == n)))
        .filter(|n| only.as_ref().is_none_or(|(f, _)| f == n))
        .collect();
    let par = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(names.len().max(1));
    println!(
        "fuzz: seed {seed:#x}, {cases} generated cases per format after the regression corpus, {par} at a time; \
         allocations above {} MiB refused",
        ALLOC_BOUND >> 20
    );
    let t0 = Instant::now();
    let results = std::sync::Mutex::new(BTreeMap::<&'static str, Tally>::new());
    let queue = std::sync::Mutex::new(std::mem::take(&mut names));
    std::thread::scope(|s| {
        for _ in 0..par {
            s.spawn(|| loop {
                let Some(name) = queue.lock().unwrap().pop() else {
                    break;
                };
                let t = run_format(name, seed, cases, only.as_ref().map(|o| o.1));
                results.lock().unwrap().insert(name, t);
            });
        }
    });
    let results = results.into_inner().unwrap();
    println!(
        "{:<16} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>10} {:>5} {:>7}",
        "format", "cases", "ok", "error", "panic", "abort", "hang", "over-bound", "regr", "seconds"
    );
    let mut total = Tally::default();
    for (name, t) in &results {
        println!(
            "{:<16} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>10} {:>5} {:>7.1}",
            name, t.cases, t.ok, t.err, t.panic, t.abort, t.hang, t.over, t.regressions, t.secs
        );
        total.cases += t.cases;
        total.ok += t.ok;
        total.err += t.err;
        total.panic += t.panic;
        total.abort += t.abort;
        total.hang += t.hang;
        total.over += t.over;
        total.regressions += t.regressions;
    }
    println!(
        "{:<16} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>10} {:>5} {:>7.1}",
        "total",
        total.cases,
        total.ok,
        total.err,
        total.panic,
        total.abort,
        total.hang,
        total.over,
        total.regressions,
        t0.elapsed().as_secs_f64()
    );
    let mut failed = false;
    for (name, t) in &results {
        if t.bad() == 0 {
            continue;
        }
        failed = true;
        for (case, kind, detail) in t.failures.iter().take(20) {
            let saved = save_failure(name, seed, *case)
                .map(|p| format!("; input saved to {}", p.display()))
                .unwrap_or_default();
            println!(
                "FAIL {name} case {case}: {kind}: {detail}\n     reproduce: LORATUNE_FUZZ_SEED={seed:#x} LORATUNE_FUZZ_ONLY={name}:{case} \
                 cargo test --release --test fuzz{saved}\n     keep it: copy the input to tests/fuzz/regressions/{name}/"
            );
        }
    }
    if failed {
        std::process::exit(1);
    }
}
