//! What the scale benchmark reads from outside the processes: CPU time per thread from /proc (nanoseconds,
//! from `schedstat`), resident memory, and a gateway's HTTP ports with a plain HTTP/1.1 GET.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// CPU nanoseconds of every live thread of `pid` (`"self"` for this process) whose name `keep` accepts:
/// the first field of each `/proc/PID/task/TID/schedstat` (run time, in nanoseconds; `stat`'s utime and stime
/// are 10 ms ticks, too coarse for one change).
pub fn threads_cpu_ns(pid: &str, keep: impl Fn(&str) -> bool) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter(|task| keep(fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim()))
        .filter_map(|task| {
            let schedstat = fs::read_to_string(task.path().join("schedstat")).ok()?;
            schedstat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// CPU nanoseconds of a whole process (every live thread).
pub fn process_cpu_ns(pid: &str) -> u64 {
    threads_cpu_ns(pid, |_| true)
}

/// A `/proc/PID/status` field in bytes (`VmRSS:`, `VmHWM:`).
pub fn status_bytes(pid: &str, key: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// GET `path` over HTTP/1.1: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/1.1 response"))
}

fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    Some((status, if chunked { dechunk(body)? } else { body.to_vec() }))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// The value of an unlabelled sample in a Prometheus text page.
pub fn prometheus_value(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.starts_with(' ').then(|| rest.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain), Some((200, b"hello".to_vec())));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((503, b"hello".to_vec())));
        let page = "# TYPE crossgate_config_endpoints gauge\ncrossgate_config_endpoints 1234\ncrossgate_config_endpoints_x 1\n";
        assert_eq!(prometheus_value(page, "crossgate_config_endpoints"), Some(1234.0));
        assert!(process_cpu_ns("self") > 0);
        assert!(status_bytes("self", "VmRSS:") > 0);
    }
}
