//! The subcommands other than `serve`'s server.

pub mod bench;
mod classify;
mod detect;
mod models;
mod pull;
mod run;

use crate::cli::{Command, ModelArgs};
use crate::network::{load_network, LoadOverrides, LoadedNetwork, Task};
use crate::registry;

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(crate::serve::serve(args)),
        Command::Classify(args) => classify::classify(args),
        Command::Detect(args) => detect::detect(args),
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

/// Load the model a command names (or `default`), pulling it when it is a
/// catalog name. With `task`, a model of another task is refused.
pub fn load(
    args: &ModelArgs,
    default: &str,
    task: Option<Task>,
    overrides: &LoadOverrides,
) -> anyhow::Result<LoadedNetwork> {
    let spec = args.model.as_deref().unwrap_or(default);
    let device = registry::parse_device(&args.device)?;
    let dtype = registry::parse_dtype(&args.dtype)?;
    let store = store(&args.home);
    let resolved = registry::resolve_spec(spec, &store, true, &pull::progress_printer())?;
    let loaded = load_network(&resolved, &device, dtype, overrides)?;
    let its_task = loaded.network.task();
    if let Some(task) = task.filter(|t| *t != its_task) {
        anyhow::bail!(
            "{spec} is a {} model; this command needs {}",
            its_task.as_str(),
            task.as_str()
        );
    }
    Ok(loaded)
}

pub fn store(home: &Option<std::path::PathBuf>) -> fovea_weights::store::Store {
    match home {
        Some(home) => fovea_weights::store::Store::new(home),
        None => fovea_weights::store::Store::open_default(),
    }
}
