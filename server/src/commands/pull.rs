//! `fovea pull NAME`, with progress on a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use fovea_weights::pull::{PullOptions, PullStep};

use crate::cli::PullArgs;

pub fn pull(args: PullArgs) -> anyhow::Result<()> {
    let store = super::store(&args.home);
    let options = PullOptions {
        show_pip_output: std::io::stderr().is_terminal(),
        ..PullOptions::default()
    };
    let stored = fovea_weights::pull::pull(&store, &args.name, &options, &progress_printer())?;
    println!(
        "pulled {} into {} (sha256 {})",
        stored.manifest.name,
        stored.dir.display(),
        stored.manifest.sha256
    );
    Ok(())
}

/// A spinner with the current step on a terminal, plain lines otherwise.
pub fn progress_printer() -> impl Fn(PullStep) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    move |step: PullStep| {
        let message = match step {
            PullStep::Downloading { what } => format!("downloading {what} with pip"),
            PullStep::Verifying => "verifying checksums".into(),
            PullStep::Importing => "importing the checkpoint".into(),
            PullStep::Storing => "storing".into(),
        };
        match &bar {
            Some(bar) => bar.set_message(message),
            None => eprintln!("pull: {message}"),
        }
    }
}
