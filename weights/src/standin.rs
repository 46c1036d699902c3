//! A stand-in for the Hugging Face hub, for tests without internet (the
//! unit tests here and the end-to-end tests, through the `standin` feature).
//!
//! It answers the way the hub does where `fovea pull` depends on it:
//! `/{repo}/resolve/{revision}/{file}` gives small files directly (`ETag`,
//! `X-Repo-Commit`) and answers large (LFS) files with a `302` to a storage
//! host on another origin, carrying `X-Linked-Etag` (the sha256) and
//! `X-Linked-Size`; the storage host serves byte ranges, answers only `GET`
//! (as signed storage URLs do) and can be told to cut a body short once.
//! Missing files are `404` with `X-Error-Code: EntryNotFound`, requests
//! without the token a repository requires are `401`. Plain files for URL
//! pulls are served by the storage host under `/files/`. Every request is
//! logged so tests can see what was asked, with which range and token.
#![allow(clippy::missing_panics_doc)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    /// `hub` or `cdn`.
    pub host: &'static str,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Clone)]
struct File {
    body: Vec<u8>,
    lfs: bool,
    /// The sha256 announced in `X-Linked-Etag` (normally the body's).
    etag: String,
}

struct Repo {
    commit: String,
    files: BTreeMap<String, File>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    /// Storage objects by sha256 (as announced).
    blobs: HashMap<String, Vec<u8>>,
    /// Plain files under `/files/`.
    plain: HashMap<String, Vec<u8>>,
    /// Bodies (by storage path) to cut short after so many bytes, once.
    cut_once: HashMap<String, usize>,
    log: Vec<Logged>,
}

/// The stand-in: `endpoint` is the hub (for `HF_ENDPOINT`), `storage` the
/// host large files are redirected to.
pub struct StandinHub {
    pub endpoint: String,
    pub storage: String,
    state: Arc<Mutex<State>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::store::hex(&Sha256::digest(bytes))
}

impl StandinHub {
    /// Listen on two loopback ports (hub and storage), each served by a
    /// thread for as long as the process runs.
    pub fn start() -> StandinHub {
        let state = Arc::new(Mutex::new(State::default()));
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", hub.local_addr().unwrap());
        let storage = format!("http://{}", cdn.local_addr().unwrap());
        for (listener, host) in [(hub, "hub"), (cdn, "cdn")] {
            let state = state.clone();
            let storage = storage.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = state.clone();
                    let storage = storage.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, host, &state, &storage);
                    });
                }
            });
        }
        StandinHub {
            endpoint,
            storage,
            state,
        }
    }

    /// Publish `repo` (`org/name`) at `commit` with `(path, body, lfs)` files.
    pub fn add_repo(&self, repo: &str, commit: &str, files: &[(&str, &[u8], bool)]) {
        let mut state = self.state.lock().unwrap();
        let mut map = BTreeMap::new();
        for (path, body, lfs) in files {
            let etag = sha256_hex(body);
            if *lfs {
                state.blobs.insert(etag.clone(), body.to_vec());
            }
            map.insert(
                path.to_string(),
                File {
                    body: body.to_vec(),
                    lfs: *lfs,
                    etag,
                },
            );
        }
        state.repos.insert(
            repo.to_string(),
            Repo {
                commit: commit.to_string(),
                files: map,
                token: None,
            },
        );
    }

    /// Answer `401` to requests for `repo` without `Authorization: Bearer token`.
    pub fn require_token(&self, repo: &str, token: &str) {
        let mut state = self.state.lock().unwrap();
        state.repos.get_mut(repo).unwrap().token = Some(token.to_string());
    }

    /// Make the storage host serve `served` for the LFS file `path` of
    /// `repo`, while the hub still announces the original sha256.
    pub fn corrupt(&self, repo: &str, path: &str, served: &[u8]) {
        let mut state = self.state.lock().unwrap();
        let etag = state.repos[repo].files[path].etag.clone();
        state.blobs.insert(etag, served.to_vec());
    }

    /// Cut the next body of the LFS file `path` of `repo` after `bytes`.
    pub fn cut_once(&self, repo: &str, path: &str, bytes: usize) {
        let mut state = self.state.lock().unwrap();
        let key = format!("/cdn/{}", state.repos[repo].files[path].etag);
        state.cut_once.insert(key, bytes);
    }

    /// Serve `body` at `{storage}/files/{name}`; returns that URL.
    pub fn add_plain(&self, name: &str, body: &[u8]) -> String {
        let mut state = self.state.lock().unwrap();
        state.plain.insert(name.to_string(), body.to_vec());
        format!("{}/files/{name}", self.storage)
    }

    /// Cut the next body of the plain file `name` after `bytes`.
    pub fn cut_plain_once(&self, name: &str, bytes: usize) {
        let mut state = self.state.lock().unwrap();
        state.cut_once.insert(format!("/files/{name}"), bytes);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    /// `GET`s of the storage object of `path` in `repo` so far.
    pub fn storage_gets(&self, repo: &str, path: &str) -> Vec<Logged> {
        let state = self.state.lock().unwrap();
        let key = format!("/cdn/{}", state.repos[repo].files[path].etag);
        state
            .log
            .iter()
            .filter(|l| l.host == "cdn" && l.method == "GET" && l.path.starts_with(&key))
            .cloned()
            .collect()
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send the headers for the whole body but only this many bytes.
    cut: Option<usize>,
}

impl Answer {
    fn new(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Answer {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn body(mut self, body: &[u8]) -> Answer {
        self.body = body.to_vec();
        self
    }
}

fn serve(
    stream: TcpStream,
    host: &'static str,
    state: &Mutex<State>,
    storage: &str,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    let logged = Logged {
        host,
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    let answer = {
        let mut state = state.lock().unwrap();
        state.log.push(logged.clone());
        match host {
            "hub" => hub_answer(&state, &logged, storage),
            _ => storage_answer(&mut state, &logged),
        }
    };
    write_answer(stream, &method, answer)
}

fn hub_answer(state: &State, req: &Logged, storage: &str) -> Answer {
    let Some((repo_id, rest)) = req.path.trim_start_matches('/').split_once("/resolve/") else {
        return Answer::new(404).body(b"not a resolve URL");
    };
    let Some((revision, file)) = rest.split_once('/') else {
        return Answer::new(404).body(b"no file");
    };
    let revision = revision.replace("%2F", "/");
    let Some(repo) = state.repos.get(repo_id) else {
        return Answer::new(401)
            .header("X-Error-Code", "RepoNotFound")
            .body(b"Repository not found");
    };
    if let Some(token) = &repo.token {
        if req.authorization.as_deref() != Some(&format!("Bearer {token}")) {
            return Answer::new(401)
                .header("X-Error-Code", "RepoNotFound")
                .body(b"Invalid credentials");
        }
    }
    if revision != "main" && revision != repo.commit {
        return Answer::new(404)
            .header("X-Error-Code", "RevisionNotFound")
            .body(b"Revision not found");
    }
    let Some(f) = repo.files.get(file) else {
        return Answer::new(404)
            .header("X-Error-Code", "EntryNotFound")
            .header("X-Repo-Commit", &repo.commit)
            .body(b"Entry not found");
    };
    if f.lfs {
        // A git-style etag for the pointer file, the sha256 for the content.
        Answer::new(302)
            .header("Location", format!("{storage}/cdn/{}/{file}?sig=x", f.etag))
            .header("X-Repo-Commit", &repo.commit)
            .header("ETag", format!("\"{}\"", &f.etag[..40]))
            .header("X-Linked-Etag", format!("\"{}\"", f.etag))
            .header("X-Linked-Size", f.body.len().to_string())
    } else {
        Answer::new(200)
            .header("X-Repo-Commit", &repo.commit)
            .header("ETag", format!("\"{}\"", &f.etag[..40]))
            .body(&f.body)
    }
}

fn storage_answer(state: &mut State, req: &Logged) -> Answer {
    if req.method != "GET" {
        return Answer::new(403).body(b"signature does not match");
    }
    let body = if let Some(rest) = req.path.strip_prefix("/cdn/") {
        let sha = rest.split('/').next().unwrap_or_default();
        state.blobs.get(sha).cloned()
    } else if let Some(name) = req.path.strip_prefix("/files/") {
        state.plain.get(name).cloned()
    } else {
        None
    };
    let Some(body) = body else {
        return Answer::new(404).body(b"no such object");
    };
    let key = req
        .path
        .strip_prefix("/cdn/")
        .map(|rest| format!("/cdn/{}", rest.split('/').next().unwrap_or_default()))
        .unwrap_or_else(|| req.path.clone());
    let cut = state.cut_once.remove(&key);
    let start = req
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    let mut answer = match start {
        Some(start) if start >= body.len() => {
            return Answer::new(416).header("Content-Range", format!("bytes */{}", body.len()))
        }
        Some(start) => Answer::new(206)
            .header(
                "Content-Range",
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            )
            .body(&body[start..]),
        None => Answer::new(200).body(&body),
    };
    answer.cut = cut;
    answer
}

fn write_answer(mut stream: TcpStream, method: &str, answer: Answer) -> std::io::Result<()> {
    let reason = match answer.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", answer.status);
    for (k, v) in &answer.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let n = answer
            .cut
            .unwrap_or(answer.body.len())
            .min(answer.body.len());
        stream.write_all(&answer.body[..n])?;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}
