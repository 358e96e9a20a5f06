//! The unprivileged users VMs run as. Each running VM's QEMU and vhost-device-vsock run as a
//! user of its own, taken from a range reserved in config.toml (`vm-users` under
//! [runtime]), with the group of the same number and no other (but the KVM device's group
//! where KVM is used). Invariant: no two running VMs share a uid, and no uid that has an
//! account or a group of the host (password and group databases) is ever handed out, so a
//! VMM taken over by its guest reaches no file but those of its own VM.

use std::collections::HashSet;

use super::RuntimeError;
use crate::config::VmUsers;

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
