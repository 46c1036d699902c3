//! `fovea serve`: load the models, answer HTTP and gRPC, shut down
//! gracefully.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use fovea_weights::store::Store;
use tokio::sync::Notify;

use crate::cli::ServeArgs;
use crate::config::ServeConfig;
use crate::grpc;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::registry::{self, Registry};

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::resolve(&args)?;
    let device = registry::parse_device(&config.device)?;
    let dtype = registry::parse_dtype(&config.dtype)?;
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(AppState::new(metrics.clone(), config.limits.clone()));

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding {}", config.grpc_addr))?;
    tracing::info!(addr = %grpc_listener.local_addr()?, "grpc listening");
    let grpc = grpc::services(&state, config.grpc_max_message_bytes).await?;
    let health = Arc::new(grpc.health);

    // Models load in the background: /healthz answers meanwhile and
    // /readyz turns ready when all are loaded and warmed up.
    let loader = {
        let state = state.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let store = Store::new(&config.home);
            let mut models = Vec::new();
            for model in &config.models {
                let loaded =
                    registry::load_model(model, &store, config.pull, &device, dtype, &metrics)?;
                models.push(Arc::new(loaded));
            }
            let _ = state.registry.set(Arc::new(Registry::new(models)));
            tracing::info!(models = config.models.len(), "ready");
            Ok::<_, anyhow::Error>(())
        })
    };

    // One signal, two servers: each stops taking new work when it comes.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let signalled = Arc::new(Notify::new());
    let shutdown = {
        let state = state.clone();
        let signalled = signalled.clone();
        let health = health.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutting down: refusing new work, finishing what is in flight");
            state.shutting_down.store(true, Ordering::SeqCst);
            health.stopping().await;
            let _ = stop_tx.send(true);
            signalled.notify_waiters();
        }
    };
    tokio::spawn(shutdown);
    let http_server =
        axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(stopped());
    let grpc_server = grpc::serve(grpc_listener, grpc.routes, stopped());
    let servers = async {
        tokio::try_join!(async { http_server.await.context("HTTP server") }, async {
            grpc_server.await.context("gRPC server")
        },)
    };
    let timeout = config.shutdown_timeout;
    let drain_limit = async move {
        signalled.notified().await;
        tokio::time::sleep(timeout).await;
    };
    let load_failed = async {
        match loader.await {
            Ok(Ok(())) => {
                health.ready().await;
                std::future::pending::<anyhow::Error>().await
            }
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("model loading panicked: {e}"),
        }
    };
    tokio::select! {
        result = servers => {
            result?;
        }
        _ = drain_limit => tracing::warn!(timeout_s = timeout.as_secs(), "shutdown timed out with requests in flight"),
        e = load_failed => return Err(e),
    }
    // Neither server has a call left: let each batcher finish its queue.
    if let Some(registry) = state.registry.get() {
        registry.shutdown();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
