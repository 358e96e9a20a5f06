//! What a running VM costs the host, read when asked: memory (RSS and PSS, from
//! `/proc/PID/smaps_rollup`) and CPU time of the VMM and of each helper, and the bytes through
//! its tap (`/sys/class/net/TAP/statistics`). Nothing is kept between reads: a caller that
//! wants a rate compares two.

use std::path::Path;

use container_api::stats::{NetworkUsage, ProcessUsage};

use super::process::ProcessId;

/// One read of a VM's processes and tap.
#[derive(Debug, Clone, PartialEq)]
pub struct VmUsage {
    /// The VMM first, then the helpers still running.
    pub processes: Vec<ProcessUsage>,
    /// Absent without a tap (no network, or its counters unreadable).
    pub network: Option<NetworkUsage>,
}

/// Reads the figures of the processes still running among `ids` (one whose pid was reused
/// by another process is left out), and of `tap`.
pub fn read(ids: &[ProcessId], tap: Option<&str>) -> VmUsage {
    let processes = ids
        .iter()
        .filter(|id| id.alive())
        .filter_map(|id| process(id.pid()))
        .collect();
    VmUsage {
        processes,
        network: tap.and_then(|t| tap_counters(Path::new("/sys/class/net"), t)),
    }
}

/// Host CPU time of the processes still running among `ids`, added up: the one figure a
/// frequent check needs, without the memory walk.
pub fn cpu_time(ids: &[ProcessId]) -> u64 {
    ids.iter()
        .filter(|id| id.alive())
        .filter_map(|id| procfs::process::Process::new(id.pid()).ok()?.stat().ok())
        .map(|stat| ticks_to_ns(stat.utime + stat.stime))
        .sum()
}

fn ticks_to_ns(ticks: u64) -> u64 {
    ticks.saturating_mul(1_000_000_000) / procfs::ticks_per_second().max(1)
}

fn process(pid: i32) -> Option<ProcessUsage> {
    let p = procfs::process::Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    let (mut rss, mut pss) = (0, 0);
    // smaps_rollup sums every mapping in the kernel: one read whatever the VM's size.
    if let Ok(rollup) = p.smaps_rollup() {
        for map in rollup.memory_map_rollup.0 {
            rss += map.extension.map.get("Rss").copied().unwrap_or(0);
            pss += map.extension.map.get("Pss").copied().unwrap_or(0);
        }
    }
    Some(ProcessUsage {
        name: stat.comm,
        pid,
        rss,
        pss,
        cpu_time_ns: ticks_to_ns(stat.utime + stat.stime),
    })
}

/// The tap's counters, turned to the guest's view: what the tap sends goes into the guest.
fn tap_counters(class: &Path, tap: &str) -> Option<NetworkUsage> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(class.join(tap).join("statistics").join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(NetworkUsage {
        rx_bytes: read("tx_bytes")?,
        tx_bytes: read("rx_bytes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_shows_its_memory_and_a_dead_one_is_left_out() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        let usage = read(&[id], None);
        assert_eq!(usage.processes.len(), 1);
        let p = &usage.processes[0];
        assert_eq!((p.name.as_str(), p.pid), ("sleep", id.pid()));
        assert!(p.rss > 0 && p.pss > 0 && p.pss <= p.rss, "{p:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(read(&[id], None).processes.is_empty());
    }

    #[test]
    fn tap_counters_are_the_guests_view() {
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("tap0/statistics");
        std::fs::create_dir_all(&stats).unwrap();
        std::fs::write(stats.join("rx_bytes"), "100\n").unwrap();
        std::fs::write(stats.join("tx_bytes"), "2500\n").unwrap();
        assert_eq!(
            tap_counters(dir.path(), "tap0"),
            Some(NetworkUsage {
                rx_bytes: 2500,
                tx_bytes: 100
            })
        );
        assert_eq!(tap_counters(dir.path(), "gone"), None);
    }
}
