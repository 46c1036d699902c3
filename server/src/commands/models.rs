//! `fovea models`: the store and the catalog.

use serde_json::json;

use crate::cli::ModelsArgs;

pub fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let store = super::store(&args.home);
    let stored = store.list()?;
    let catalog = fovea_weights::catalog::catalog();
    if args.json {
        let stored: Vec<_> = stored
            .iter()
            .map(|m| json!({"dir": m.dir, "manifest": m.manifest}))
            .collect();
        let catalog: Vec<_> = catalog
            .iter()
            .map(|e| json!({"name": e.name, "family": e.family, "task": e.task, "license": e.license, "description": e.description}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"store": stored, "catalog": catalog}))?
        );
        return Ok(());
    }
    println!("store: {}", store.root().display());
    if stored.is_empty() {
        println!("  (empty)");
    }
    for m in &stored {
        let mf = &m.manifest;
        println!(
            "  {:<24} {:<14} {:<14} {:<24} {:>5} classes  {}",
            mf.name, mf.task, mf.family, mf.arch, mf.num_classes, mf.source.location
        );
    }
    println!("catalog (fovea pull NAME):");
    for e in catalog {
        let pulled = if stored.iter().any(|m| m.manifest.name == e.name) {
            "pulled"
        } else {
            ""
        };
        println!(
            "  {:<24} {:<14} {:<14} {:<11} {:<7} {}",
            e.name, e.task, e.family, e.license, pulled, e.description
        );
    }
    Ok(())
}
