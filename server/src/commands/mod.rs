//! The subcommands other than `serve`'s server.

pub mod bench;
mod classify;
mod models;
mod pull;
mod run;

use crate::cli::{Command, ModelArgs};
use crate::registry::{self, ClassifierModel};

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(crate::serve::serve(args)),
        Command::Classify(args) => classify::classify(args),
        Command::Run(args) => run::run(args),
        Command::Import(args) => {
            let report = fovea_weights::pth::import_pth(&args.input, &args.output)?;
            println!("{report}");
            Ok(())
        }
        Command::Pull(args) => pull::pull(args),
        Command::Models(args) => models::models(args),
        Command::Bench(args) => bench::bench(args),
    }
}

/// Load the model a command names, pulling it when it is a catalog name.
pub fn load(args: &ModelArgs) -> anyhow::Result<ClassifierModel> {
    let device = registry::parse_device(&args.device)?;
    let dtype = registry::parse_dtype(&args.dtype)?;
    let store = store(&args.home);
    let resolved = registry::resolve_spec(&args.model, &store, true, &pull::progress_printer())?;
    registry::load_classifier(&resolved, &device, dtype, None)
}

pub fn store(home: &Option<std::path::PathBuf>) -> fovea_weights::store::Store {
    match home {
        Some(home) => fovea_weights::store::Store::new(home),
        None => fovea_weights::store::Store::open_default(),
    }
}
