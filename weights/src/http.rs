//! HTTP for `fovea pull hf:...` and `fovea pull https://...`: a blocking
//! client (rustls with the ring provider) that follows redirects itself, so
//! that a token is only ever sent to the origin it belongs to and never to
//! the storage host a hub redirects large files to, and resumable downloads
//! (a partial file continued with an HTTP `Range` request).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{
    HeaderMap, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, LOCATION, RANGE,
};
use reqwest::{Method, StatusCode, Url};

use crate::pull::{PullError, PullStep};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 10;
/// Tries of one download (each one continuing the partial file).
pub const ATTEMPTS: usize = 5;

/// A client, with the bearer token of one origin.
pub struct Http {
    client: Client,
    auth: Option<(String, String)>,
    /// Pause before a retry (shortened by the tests).
    pub retry_pause: Duration,
}

/// What a `HEAD` of a URL told, after the redirects within its origin.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: StatusCode,
    /// Where the content is fetched from: the last URL asked, or the
    /// redirect target on another origin (a storage host).
    pub url: Url,
    pub headers: HeaderMap,
    /// The headers of every response on the way (the hub answers a large
    /// file's `resolve` with a redirect that carries its metadata).
    pub hops: Vec<HeaderMap>,
}

impl Head {
    /// A header from the last response that has it.
    pub fn header(&self, name: &str) -> Option<String> {
        self.hops
            .iter()
            .rev()
            .find_map(|h| h.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// Errors worth another try: the connection, and the server's own (5xx).
enum Failure {
    Retry(PullError),
    Fatal(PullError),
}

/// Installs rustls' ring crypto provider for the process. reqwest is built
/// without a provider of its own (`rustls-no-provider`, so no C toolchain is
/// needed), so any reqwest client in the program, this crate's or another's,
/// panics when built before this has run. Idempotent.
pub fn install_crypto_provider() {
    // A second install (or one by another part of the program) is refused,
    // which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Http {
    /// `token` is sent as `Authorization: Bearer` to `token_origin` only.
    pub fn new(token: Option<&str>, token_origin: Option<&Url>) -> Result<Http, PullError> {
        install_crypto_provider();
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("fovea/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PullError::Other(format!("HTTP client: {e}")))?;
        let auth = match (token, token_origin) {
            (Some(t), Some(o)) if !t.is_empty() => Some((origin(o), t.to_string())),
            _ => None,
        };
        Ok(Http {
            client,
            auth,
            retry_pause: Duration::from_secs(2),
        })
    }

    fn send(&self, method: Method, url: &Url, from: u64) -> reqwest::Result<Response> {
        // As huggingface_hub does: the sizes announced are of the bytes sent.
        let mut request = self
            .client
            .request(method, url.clone())
            .header(ACCEPT_ENCODING, "identity");
        if let Some((o, token)) = &self.auth {
            if *o == origin(url) {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
        }
        if from > 0 {
            request = request.header(RANGE, format!("bytes={from}-"));
        }
        request.send()
    }

    /// `HEAD url`, following redirects within its origin; a redirect to
    /// another origin is not followed (signed storage URLs may answer only
    /// `GET`) but becomes [`Head::url`].
    pub fn head(&self, url: &Url) -> Result<Head, PullError> {
        let mut url = url.clone();
        let mut hops = Vec::new();
        for _ in 0..=MAX_REDIRECTS {
            let response = self
                .send(Method::HEAD, &url, 0)
                .map_err(|e| transport(&url, e))?;
            let status = response.status();
            let headers = response.headers().clone();
            hops.push(headers.clone());
            if status.is_redirection() {
                let next = redirect_target(&url, &headers)?;
                if origin(&next) != origin(&url) {
                    return Ok(Head {
                        status: StatusCode::OK,
                        url: next,
                        headers,
                        hops,
                    });
                }
                url = next;
                continue;
            }
            return Ok(Head {
                status,
                url,
                headers,
                hops,
            });
        }
        Err(PullError::Other(format!("{url}: too many redirects")))
    }

    /// Download `url` into `partial`, continuing what it already holds, with
    /// up to [`ATTEMPTS`] tries. `size`, when known, is the complete length.
    pub fn download(
        &self,
        url: &Url,
        partial: &Path,
        size: Option<u64>,
        progress: &dyn Fn(PullStep),
    ) -> Result<(), PullError> {
        let mut last = None;
        for attempt in 1..=ATTEMPTS {
            let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
            match size {
                Some(size) if have == size => return Ok(()),
                Some(size) if have > size => truncate(partial)?,
                _ => {}
            }
            match self.get_into(url, partial, size, progress) {
                Ok(()) => return Ok(()),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) => {
                    progress(PullStep::Note {
                        message: &format!("download interrupted (try {attempt}/{ATTEMPTS}): {e}"),
                    });
                    last = Some(e);
                    if attempt < ATTEMPTS {
                        std::thread::sleep(self.retry_pause * attempt as u32);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| PullError::Other(format!("{url}: download failed"))))
    }

    /// One `GET`, following redirects, appended to `partial` (or replacing
    /// it when the server ignores the range).
    fn get_into(
        &self,
        url: &Url,
        partial: &Path,
        size: Option<u64>,
        progress: &dyn Fn(PullStep),
    ) -> Result<(), Failure> {
        let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        let mut url = url.clone();
        let mut redirects = 0;
        let mut response = loop {
            let response = self
                .send(Method::GET, &url, have)
                .map_err(|e| Failure::Retry(transport(&url, e)))?;
            if !response.status().is_redirection() {
                break response;
            }
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(Failure::Fatal(PullError::Other(format!(
                    "{url}: too many redirects"
                ))));
            }
            url = redirect_target(&url, response.headers()).map_err(Failure::Fatal)?;
        };
        let status = response.status();
        let append = match status {
            StatusCode::PARTIAL_CONTENT => {
                let start = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(have) {
                    // Not the range asked for: start again from nothing.
                    truncate(partial).map_err(Failure::Fatal)?;
                    return Err(Failure::Retry(PullError::Other(format!(
                        "{url}: the server sent another range than bytes={have}-"
                    ))));
                }
                true
            }
            StatusCode::OK => false,
            // Asked beyond the end: the partial file is already whole (the
            // caller checks its size and checksum).
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => return Ok(()),
            s if s.is_server_error() => {
                return Err(Failure::Retry(status_error(&url, s)));
            }
            s => return Err(Failure::Fatal(status_error(&url, s))),
        };
        let expected_len = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let total = size.or(expected_len.map(|n| if append { n + have } else { n }));
        let io = |e: std::io::Error| {
            Failure::Fatal(PullError::Other(format!("{}: {e}", partial.display())))
        };
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(partial)
            .map_err(io)?;
        let mut done = if append { have } else { 0 };
        let mut buf = vec![0u8; 1 << 16];
        let mut since_report = 0u64;
        loop {
            let n = match response.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    file.flush().map_err(io)?;
                    return Err(Failure::Retry(PullError::Other(format!(
                        "{url}: connection lost after {done} bytes: {e}"
                    ))));
                }
            };
            file.write_all(&buf[..n]).map_err(io)?;
            done += n as u64;
            since_report += n as u64;
            if since_report >= 1 << 20 {
                since_report = 0;
                progress(PullStep::Transferred { done, total });
            }
        }
        file.flush().map_err(io)?;
        progress(PullStep::Transferred { done, total });
        if let Some(total) = total {
            if done < total {
                return Err(Failure::Retry(PullError::Other(format!(
                    "{url}: connection closed after {done} of {total} bytes"
                ))));
            }
        }
        Ok(())
    }
}

fn truncate(path: &Path) -> Result<(), PullError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PullError::Other(format!("{}: {e}", path.display()))),
    }
}

fn redirect_target(url: &Url, headers: &HeaderMap) -> Result<Url, PullError> {
    let location = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| PullError::Other(format!("{url}: a redirect without a Location")))?;
    url.join(location)
        .map_err(|e| PullError::Other(format!("{url}: bad redirect {location:?}: {e}")))
}

/// `bytes 100-199/200` -> 100.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

fn transport(url: &Url, e: reqwest::Error) -> PullError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    PullError::Other(format!("{url}: {message}"))
}

fn status_error(url: &Url, status: StatusCode) -> PullError {
    PullError::Http {
        url: url.to_string(),
        status: status.as_u16(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn tokens_stay_with_their_origin() {
        let hub = Url::parse("http://127.0.0.1:9/a").unwrap();
        let http = Http::new(Some("secret"), Some(&hub)).unwrap();
        let (o, _) = http.auth.as_ref().unwrap();
        assert_eq!(
            *o,
            origin(&Url::parse("http://127.0.0.1:9/other/path").unwrap())
        );
        assert_ne!(*o, origin(&Url::parse("http://127.0.0.1:10/a").unwrap()));
        assert_ne!(*o, origin(&Url::parse("https://127.0.0.1:9/a").unwrap()));
        assert!(Http::new(Some(""), Some(&hub)).unwrap().auth.is_none());
    }
}
