//! One module per command group. `machine` has a file per subcommand, its `mod.rs` keeping only
//! the clap enum and the dispatch; the other groups, whose subcommands are short, are one file
//! each.

pub mod image;
pub mod machine;
pub mod registry;
pub mod system;
