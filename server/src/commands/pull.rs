//! `fovea pull SOURCE`: a catalog name, `hf:ORG/NAME[@REVISION]` or a URL,
//! with progress on a terminal.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use fovea_weights::hub::{HubClient, HubOptions, HubSpec};
use fovea_weights::pull::{PullOptions, PullStep};

use crate::cli::PullArgs;

pub fn pull(args: PullArgs) -> anyhow::Result<()> {
    let store = super::store(&args.home);
    let progress = progress_printer();
    let source = args.source.as_str();
    let url_only =
        |what: &str| -> anyhow::Result<()> { bail!("{what} is only for URL pulls (https://...)") };
    let stored = if source.starts_with("hf:") {
        if args.sha256.is_some() {
            url_only("--sha256")?;
        }
        if args.arch.is_some() {
            url_only("--arch")?;
        }
        let spec = HubSpec::parse(source)?;
        let options = HubOptions::from_env();
        let client = HubClient::new(&options)?;
        let pulled = fovea_weights::hub::pull_hf(
            &store,
            &spec,
            args.store_as.as_deref(),
            &client,
            &progress,
        )?;
        let fetched: Vec<String> = pulled
            .files
            .iter()
            .map(|f| {
                let how = if f.downloaded { "downloaded" } else { "cached" };
                format!("{} ({how})", f.name)
            })
            .collect();
        eprintln!(
            "pull: {} from {} into the hub cache {}",
            fetched.join(", "),
            pulled.stored.manifest.source.location,
            options.cache.root.display()
        );
        pulled.stored
    } else if source.starts_with("https://") || source.starts_with("http://") {
        let (url, sha256) = fovea_weights::url::parse_url_spec(source, args.sha256.as_deref())?;
        fovea_weights::url::pull_url(
            &store,
            &url,
            &sha256,
            args.store_as.as_deref(),
            args.arch.as_deref(),
            &progress,
        )?
    } else {
        if args.store_as.is_some() || args.sha256.is_some() || args.arch.is_some() {
            bail!("--name, --sha256 and --arch are for hf: and URL pulls; catalog models keep their names");
        }
        let options = PullOptions {
            show_pip_output: std::io::stderr().is_terminal(),
            ..PullOptions::default()
        };
        fovea_weights::pull::pull(&store, source, &options, &progress)?
    };
    let m = &stored.manifest;
    println!(
        "pulled {} ({} {}, {} classes, license {}) into {} (sha256 {})",
        m.name,
        m.task,
        m.arch,
        m.num_classes,
        m.license.as_deref().unwrap_or("unknown"),
        stored.dir.display(),
        m.sha256
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
    let current = RefCell::new(String::new());
    move |step: PullStep| {
        let message = match step {
            PullStep::Downloading { what } => {
                *current.borrow_mut() = what.to_string();
                format!("downloading {what}")
            }
            PullStep::Transferred { done, total } => {
                // Only a terminal gets the running count.
                let Some(bar) = &bar else { return };
                let mib = |n: u64| n as f64 / (1u64 << 20) as f64;
                let total = total
                    .map(|t| format!(" of {:.1} MiB", mib(t)))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "downloading {}: {:.1} MiB{total}",
                    current.borrow(),
                    mib(done)
                ));
                return;
            }
            PullStep::Cached { what } => format!("{what}: in the cache"),
            PullStep::Note { message } => {
                match &bar {
                    Some(bar) => bar.println(format!("note: {message}")),
                    None => eprintln!("pull: note: {message}"),
                }
                return;
            }
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
