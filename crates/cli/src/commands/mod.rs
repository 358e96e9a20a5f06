//! One module per command group. `machine` and `image` have a file per subcommand, their
//! `mod.rs` keeping only the clap enum and the dispatch; `system` and `registry`, whose
//! subcommands are short, are one file each.

pub mod check;
mod events;
pub mod image;
pub mod machine;
pub mod registry;
pub mod system;
