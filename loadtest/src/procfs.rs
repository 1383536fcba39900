//! What /proc says about a server process on this machine: which process listens on a port, and
//! the CPU time and resident memory it has used. The cost figures then cover any server, whether
//! or not its own stats report them, and every server compared is measured the same way.
//!
//! CPU time comes in clock ticks (10 ms on Linux): a window's figure is off by at most two ticks,
//! under 1 % of the CPU seconds a window of a few seconds under load spends.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// CPU seconds (user + system) process `pid` has used, every thread counted, exited ones too.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_times(&stat)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: unexpected format")))?;
    Ok((utime + stime) as f64 * tick_seconds())
}

/// The unit of `cpu_seconds`: one clock tick, in seconds (10 ms on Linux).
pub fn tick_seconds() -> f64 {
    1.0 / clock_ticks_per_second()
}

/// Resident set size of process `pid`, bytes (`VmRSS`, as roomcast's own `rss_bytes`).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: no VmRSS")))
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses itself: fields are counted from the
/// last `)`.
fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, so utime (14) is the 12th from here.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a configuration value; it has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// The process listening on `addr` (on its address or on every address), if it is on this
/// machine and its file descriptors are readable by this user; the first found when several
/// share the socket.
pub fn listener_pid(addr: SocketAddr) -> Option<u32> {
    let inode = listening_inode(addr)?;
    let want = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// The inode of the listening socket for `addr` in /proc/net/tcp or tcp6.
fn listening_inode(addr: SocketAddr) -> Option<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|table| find_listener(&table, addr))
}

/// `st` of a socket in LISTEN state.
const LISTEN: &str = "0A";

/// Finds the listener for `addr` in one /proc/net/tcp table: its port, in LISTEN state, bound
/// to `addr`'s address or to every address (IPv6 entries: any address, as an IPv6 wildcard
/// socket also accepts IPv4).
fn find_listener(table: &str, addr: SocketAddr) -> Option<u64> {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
            continue;
        };
        if *state != LISTEN {
            continue;
        }
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        if u16::from_str_radix(port, 16).ok() != Some(addr.port()) {
            continue;
        }
        let ip_matches = match (ip.len(), addr.ip()) {
            // The kernel prints the address as a native-endian u32.
            (8, IpAddr::V4(want)) => u32::from_str_radix(ip, 16)
                .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
                .is_ok_and(|got| got == want || got.is_unspecified()),
            (32, _) => true,
            _ => false,
        };
        if ip_matches {
            if let Ok(inode) = inode.parse::<u64>() {
                return Some(inode);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_skip_a_name_with_spaces_and_parentheses() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 265 0 0 20 0 \
                    3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_times(line), Some((731, 265)));
        assert_eq!(parse_stat_times("garbage"), None);
    }

    #[test]
    fn finds_a_listener_by_port_and_address() {
        let me = std::process::id();
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_eq!(listener_pid(addr), Some(me));
        // A port nobody listens on (the probe listener is gone when the block runs).
        let other = SocketAddr::from(([127, 0, 0, 1], addr.port().wrapping_add(1)));
        if std::net::TcpListener::bind(other).is_ok() {
            assert_eq!(listener_pid(other), None);
        }
    }

    #[test]
    fn own_cpu_and_rss_are_readable() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(me).expect("stat") >= 0.0);
        assert!(rss_bytes(me).expect("status") > 0);
        assert!(cpu_seconds(u32::MAX).is_err());
    }
}
