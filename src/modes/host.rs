//! Facts about this machine that results, logs and `herd doctor` name: the CPU, its memory, the
//! date.

/// The CPU's model name (Linux /proc/cpuinfo).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into())
}

/// A /proc/meminfo field (`"MemTotal:"`) in bytes (Linux).
pub fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Logical CPUs this process may run on (its affinity mask and cgroup quota included).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// "CPU model xN threads": the machine column of every CPU result.
pub fn machine_name() -> String {
    format!("{} x{} threads", cpu_name(), rayon::current_num_threads())
}

/// Today's date (UTC), YYYY-MM-DD, without a date crate (civil-from-days, H. Hinnant).
pub fn today_utc() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0) as i64;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_has_the_iso_shape() {
        let d = super::today_utc();
        assert_eq!(d.len(), 10);
        assert!(
            d.starts_with("20") && &d[4..5] == "-" && &d[7..8] == "-",
            "{d}"
        );
    }
}
