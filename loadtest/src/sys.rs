//! What the operating system allows and costs: the open-file limit, the sysctls that bound a
//! large connection count, and CPU time used.

use std::io;

/// Open-file limit of this process: (soft, hard).
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u64 on 64-bit Linux but not on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// Raises the soft open-file limit to the hard one; returns the new (soft, hard).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit only reads the struct we pass, which lives for the call.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nofile()
}

/// CPU seconds (user + system) of this process and of its waited-for children.
pub fn cpu_seconds() -> (f64, f64) {
    (rusage(libc::RUSAGE_SELF), rusage(libc::RUSAGE_CHILDREN))
}

fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Asks the kernel to pick a socket's local port at `connect` rather than at `bind`
/// (`IP_BIND_ADDRESS_NO_PORT`). A client bound to a source address otherwise gets a port at
/// bind time, which must be free for every destination; with tens of thousands of sockets per
/// address that search is slow and runs out early. At connect time the kernel knows the
/// destination, so a port only has to be unique per (source, destination) pair.
/// A no-op returning `Ok` where the option does not exist (not Linux).
pub fn set_bind_address_no_port(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let one: libc::c_int = 1;
        // SAFETY: the fd is a live socket borrowed for the call; the option value pointer and
        // length describe `one`, a c_int on this stack frame that outlives the call, and
        // setsockopt only reads it.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
    Ok(())
}

/// Reads a sysctl from /proc/sys (`net/core/somaxconn`); `None` where it cannot be read.
pub fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Width of `net.ipv4.ip_local_port_range` (ports one source address can use).
pub fn local_port_range() -> Option<(u32, u32)> {
    let s = sysctl("net/ipv4/ip_local_port_range")?;
    let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
    let lo = it.next()??;
    let hi = it.next()??;
    Some((lo, hi))
}

/// Short name of an OS error, as the failure tables show it (`refused`, `addrnotavail`, …).
pub fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EADDRNOTAVAIL) => "addrnotavail".into(),
        Some(libc::EADDRINUSE) => "addrinuse".into(),
        Some(libc::ETIMEDOUT) => "tcp_timeout".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "broken_pipe".into(),
        Some(libc::EMFILE) => "emfile".into(),
        Some(libc::ENFILE) => "enfile".into(),
        Some(libc::ENOBUFS) => "enobufs".into(),
        Some(libc::ENOMEM) => "enomem".into(),
        Some(libc::ENETUNREACH) => "netunreach".into(),
        Some(libc::EHOSTUNREACH) => "hostunreach".into(),
        Some(n) => format!("errno_{n}"),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof => "eof".into(),
            io::ErrorKind::TimedOut => "timeout".into(),
            k => format!("io_{k:?}").to_lowercase(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_readable() {
        let (soft, hard) = nofile().expect("getrlimit");
        assert!(soft <= hard);
        let (s2, h2) = raise_nofile().expect("setrlimit to hard is always allowed");
        assert_eq!(s2, h2);
        assert_eq!(h2, hard);
    }

    #[test]
    fn errno_names() {
        assert_eq!(
            errno_name(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "refused"
        );
        assert_eq!(
            errno_name(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)),
            "addrnotavail"
        );
        assert_eq!(
            errno_name(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "eof"
        );
    }

    #[test]
    fn bind_address_no_port_defers_the_port_to_connect() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let to = s.local_addr().expect("addr");
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        set_bind_address_no_port(&sock).expect("setsockopt");
        sock.bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind");
        if cfg!(target_os = "linux") {
            assert_eq!(
                sock.local_addr().expect("local").port(),
                0,
                "no port is taken at bind"
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stream = rt.block_on(sock.connect(to)).expect("connect");
        let local = stream.local_addr().expect("local");
        assert_eq!(local.ip().to_string(), "127.0.0.2");
        assert_ne!(local.port(), 0);
    }

    #[test]
    fn cpu_time_moves() {
        let (a, _) = cpu_seconds();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let (b, _) = cpu_seconds();
        assert!(b >= a);
    }
}
