//! One module per command group, one file per subcommand where they grow large.

pub mod image;
pub mod machine;
pub mod registry;
pub mod system;
