//! CPU time of another process (the backend under test), from procfs.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// Reads the CPU time a process has used.
#[derive(Debug, Clone)]
pub struct CpuProbe {
    pid: u32,
    ticks_per_sec: u64,
}

impl CpuProbe {
    /// A probe for `pid`; fails if the process cannot be read.
    pub fn new(pid: u32) -> Result<CpuProbe> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if tck <= 0 {
            bail!("sysconf(_SC_CLK_TCK) failed");
        }
        let probe = CpuProbe {
            pid,
            ticks_per_sec: tck as u64,
        };
        probe
            .ticks()
            .with_context(|| format!("--backend-pid {pid}: cannot read its CPU time"))?;
        Ok(probe)
    }

    /// User plus system time of every thread of the process, in clock ticks.
    ///
    /// This reads `/proc/PID/stat`, whose utime and stime cover the whole thread group: the
    /// live threads (what summing `/proc/PID/task/*/stat` gives) plus threads that already
    /// exited, so a worker pool that retires threads mid-run does not lose their time.
    pub fn ticks(&self) -> Result<u64> {
        let path = PathBuf::from(format!("/proc/{}/stat", self.pid));
        let stat = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        parse_stat_cpu(&stat).with_context(|| format!("cannot parse {}", path.display()))
    }

    /// Convert ticks to seconds.
    pub fn seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_sec as f64
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/.../stat` line. The command name (field 2)
/// is in parentheses and may contain spaces and parentheses, so fields are counted after the
/// last ')'.
pub fn parse_stat_cpu(stat: &str) -> Result<u64> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no ')' after the command name")?;
    // After the name: field 3 (state) is the first; utime is field 14, stime field 15.
    let mut fields = rest.split_ascii_whitespace().skip(14 - 3);
    let mut next = |name| -> Result<u64> {
        fields
            .next()
            .with_context(|| format!("missing {name}"))?
            .parse::<u64>()
            .with_context(|| format!("bad {name}"))
    };
    let utime = next("utime")?;
    let stime = next("stime")?;
    Ok(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines() {
        let line = "1234 (vu blk) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 5 0";
        assert_eq!(parse_stat_cpu(line).unwrap(), 325);
        assert!(parse_stat_cpu("1234 (x) S 1 2").is_err());
        assert!(parse_stat_cpu("garbage").is_err());
    }

    #[test]
    fn reads_our_own_process() {
        let p = CpuProbe::new(std::process::id()).unwrap();
        let t0 = p.ticks().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 60 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(p.ticks().unwrap() >= t0);
        assert!(CpuProbe::new(u32::MAX).is_err());
    }
}
