//! The unprivileged users VMs run as. Each running VM's QEMU and vhost-device-vsock run as a
//! user of its own, taken from a range reserved in config.toml (`vm-users` under
//! [runtime]), with the group of the same number and no other (but the KVM device's group
//! where KVM is used). Invariant: no two running VMs share a uid, and no uid that has an
//! account or a group of the host (password and group databases) is ever handed out, so a
//! VMM taken over by its guest reaches no file but those of its own VM.

use std::collections::HashSet;

use super::RuntimeError;

/// The reserved range: `first` to `last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUsers {
    pub first: u32,
    pub last: u32,
}

impl Default for VmUsers {
    /// 65536 ids high above the usual account (1000+) and subordinate-id (100000+) ranges.
    fn default() -> Self {
        VmUsers {
            first: 0x7000_0000,
            last: 0x7000_ffff,
        }
    }
}

impl std::str::FromStr for VmUsers {
    type Err = String;

    /// `FIRST-LAST`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a uid range FIRST-LAST (e.g. 1879048192-1879113727)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first == 0 || last < first || last == u32::MAX {
            return Err(format!(
                "`{s}`: the range must not hold 0 or 4294967295 and must not be empty"
            ));
        }
        Ok(VmUsers { first, last })
    }
}

impl std::fmt::Display for VmUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl VmUsers {
    /// The first uid of the range that is not `taken` and has neither an account nor a
    /// group on the host.
    pub fn pick(&self, taken: &HashSet<u32>) -> Result<u32, RuntimeError> {
        (self.first..=self.last)
            .filter(|u| !taken.contains(u))
            .find(|&u| unknown_to_the_host(u))
            .ok_or(RuntimeError::NoVmUser {
                first: self.first,
                last: self.last,
            })
    }
}

/// Neither a user nor a group of this number exists (a lookup that fails counts as existing).
fn unknown_to_the_host(id: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
        && matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_root_and_nonsense() {
        assert_eq!(
            "100-200".parse::<VmUsers>(),
            Ok(VmUsers {
                first: 100,
                last: 200
            })
        );
        for bad in ["0-10", "20-10", "x-1", "5", "1-4294967295"] {
            assert!(bad.parse::<VmUsers>().is_err(), "{bad}");
        }
        assert_eq!(VmUsers::default().to_string(), "1879048192-1879113727");
    }

    #[test]
    fn a_uid_with_an_account_or_in_use_is_never_picked() {
        // 65534 is nobody (and nogroup) on every Debian host; 65533 usually nothing.
        let users = VmUsers {
            first: 65534,
            last: 65534,
        };
        assert!(matches!(
            users.pick(&HashSet::new()),
            Err(RuntimeError::NoVmUser { .. })
        ));
        let users = VmUsers::default();
        let first = users.pick(&HashSet::new()).unwrap();
        let second = users.pick(&HashSet::from([first])).unwrap();
        assert_ne!(first, second);
    }
}
