//! What the harness reads from the kernel: the CPU time of a process tree or of some of the harness's own
//! threads, a process tree's memory, the TIME_WAIT count, the machine it runs on; and the file-descriptor
//! limit it raises for itself and the peers it starts.

use std::fs;

use serde::{Deserialize, Serialize};

/// /proc reports CPU times in USER_HZ, which is 100 on every Linux architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// `pid` and every process below it: nginx's workers are children of its master, and count as the proxy.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, stat_fields(p)?.get(1)?.parse().ok()?)))
        .collect();
    let mut tree = vec![pid];
    let mut next = 0;
    while let Some(&parent) = tree.get(next) {
        tree.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        next += 1;
    }
    tree
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces): state is 0, ppid 1.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    Some(stat_at(&format!("/proc/{pid}/stat"))?.1)
}

/// A stat file's command (a thread's name) and the fields after it.
fn stat_at(path: &str) -> Option<(String, Vec<String>)> {
    let text = fs::read_to_string(path).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    Some((comm.to_owned(), rest.split_whitespace().map(str::to_owned).collect()))
}

/// utime plus stime, in ticks. The kernel scales both so that their sum is the task's exact run time
/// (sum_exec_runtime), so the only error is the tick's 10 ms.
fn cpu_ticks(fields: &[String]) -> Option<u64> {
    // utime and stime are fields 14 and 15 of the whole line.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Whose CPU time a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// A process and everything below it: nginx's workers are children of its master, and count as it.
    Tree(u32),
    /// The threads of this process whose names start with one of the prefixes: the own backend's runtime, an
    /// in-process crossgate's.
    Threads(&'static [&'static str]),
    /// This process (its exited threads included) less the threads named by those prefixes: the load client.
    ThisProcessExcept(&'static [&'static [&'static str]]),
}

impl Account {
    /// User plus system CPU seconds spent so far.
    pub fn cpu_seconds(self) -> f64 {
        let ticks: u64 = match self {
            Account::Tree(pid) => process_tree(pid).into_iter().filter_map(|p| cpu_ticks(&stat_fields(p)?)).sum(),
            Account::Threads(prefixes) => threads_named(prefixes),
            Account::ThisProcessExcept(prefixes) => {
                let all = stat_at("/proc/self/stat").and_then(|(_, fields)| cpu_ticks(&fields)).unwrap_or(0);
                all.saturating_sub(prefixes.iter().map(|prefixes| threads_named(prefixes)).sum())
            }
        };
        ticks as f64 / TICKS_PER_SECOND
    }
}

/// CPU ticks of this process's live threads whose names start with one of `prefixes`.
fn threads_named(prefixes: &[&str]) -> u64 {
    fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| stat_at(&task.path().join("stat").display().to_string()))
        .filter(|(name, _)| prefixes.iter().any(|prefix| name.starts_with(prefix)))
        .filter_map(|(_, fields)| cpu_ticks(&fields))
        .sum()
}

/// Resident memory of `pid`'s tree, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    process_tree(pid).into_iter().filter_map(|p| status_kib(&format!("/proc/{p}/status"), "VmRSS:")).sum()
}

fn status_kib(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| line.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// Sockets in TIME_WAIT on this machine (`tw` in /proc/net/sockstat).
pub fn time_wait() -> u64 {
    let text = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with("TCP:"))
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.windows(2).find(|pair| pair[0] == "tw").and_then(|pair| pair[1].parse().ok())
        })
        .unwrap_or(0)
}

/// Raises the open-file limit to `want`, hard limit included when allowed (root): children inherit it, so the
/// peers can hold 10,000 tunnels (two descriptors each) too. Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    /// The load average when the run started: a busy machine makes noisy figures.
    pub load_at_start: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| Some(line.strip_prefix("model name")?.trim_start_matches([' ', '\t', ':']).to_owned()))
            .unwrap_or_else(|| "unknown".to_owned());
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default().trim().to_owned();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: status_kib("/proc/meminfo", "MemTotal:").unwrap_or(0) as f64 / (1024.0 * 1024.0),
            kernel: read("/proc/sys/kernel/osrelease"),
            load_at_start: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }
}
