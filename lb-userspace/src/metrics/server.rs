//! The /metrics endpoint (hyper); every scrape asks the agent for the text.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};

/// Binds the metrics listener (at start, so a taken port fails the start).
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("metrics_listen {address}"))?;
    log::info!("metrics at http://{address}/metrics");
    Ok(listener)
}

/// Serves GET /metrics; every scrape asks the agent for the text.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: mpsc::Sender<oneshot::Sender<String>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, scrapes).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "see /metrics\n".into());
    }
    let (tx, rx) = oneshot::channel();
    if scrapes.send(tx).await.is_err() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "the agent is shutting down\n".into());
    }
    match rx.await {
        Ok(text) => reply(StatusCode::OK, text),
        Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "no answer from the agent\n".into()),
    }
}
