//! `tendrilctl`: the command-line view of a Tendril cluster (also `kubectl tendril`).
//!
//! Pure parts live here with their tests ([`trace`], [`table`], [`status`]'s summary); the
//! binary (`src/bin/tendrilctl.rs`) only parses arguments, fetches objects and prints.

pub mod bpf;
pub mod observe;
pub mod status;
pub mod table;
pub mod trace;

use serde::Serialize;

/// Exit codes scripts can rely on.
pub mod exit {
    /// Everything asked about is fine (trace: the packet passes).
    pub const OK: i32 = 0;
    /// The command ran and found a problem (a node not Realized, a trace denied, ...).
    pub const PROBLEM: i32 = 1;
    /// Bad usage, or the cluster / server could not be reached.
    pub const ERROR: i32 = 2;
}

/// `any`, `cidr:N` (node-local CIDR identity), `reserved:world`, or the number.
pub fn identity_name(id: u32) -> String {
    if id == 0 {
        "any".into()
    } else if id & crate::bpf::policy::LOCAL_IDENTITY_FLAG != 0 {
        format!("cidr:{}", id & !crate::bpf::policy::LOCAL_IDENTITY_FLAG)
    } else if let Some(r) = tendril_crds::facts::Reserved::from_id(i64::from(id)) {
        format!("reserved:{}", r.name())
    } else {
        id.to_string()
    }
}

/// `-o`: how results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Columns that fit the terminal.
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML, or the table `render` builds.
pub fn emit<T: Serialize>(
    output: Output,
    value: &T,
    render: impl FnOnce() -> table::Table,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Output::Table => print!("{}", render().render(table::terminal_width())),
    }
    Ok(())
}
