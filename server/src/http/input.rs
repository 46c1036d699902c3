//! Request bodies: a raw image, multipart with image parts, or JSON with
//! base64 images; options from the query string and the body.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

use super::error::ApiError;

/// The images of a request (still encoded) and its options.
#[derive(Debug, Default)]
pub struct ImageRequest {
    pub images: Vec<Bytes>,
    pub options: Options,
}

/// Options by name, from the query string, multipart text fields or JSON.
#[derive(Debug, Default)]
pub struct Options {
    values: BTreeMap<String, Value>,
}

impl Options {
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let mut values = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode(k);
            let v = percent_decode(v);
            values.insert(k, Value::String(v));
        }
        Ok(Options { values })
    }

    /// Options given as typed values (gRPC fields) rather than text.
    pub fn from_values<'a>(values: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Options {
            values: values
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    fn set(&mut self, key: &str, value: Value) {
        self.values.insert(key.to_string(), value);
    }

    /// Refuse options the route does not know, so a typo is not ignored.
    pub fn check_known(&self, known: &[&str]) -> Result<(), ApiError> {
        for key in self.values.keys() {
            if !known.contains(&key.as_str()) {
                return Err(ApiError::invalid_option(format!(
                    "unknown option {key:?} (known: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::invalid_option(format!(
                "{key} must be a non-empty string, got {other}"
            ))),
        }
    }

    /// A whole number in `min..=max`, given as a JSON number or a string.
    pub fn integer(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let value = match self.values.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        let parsed = match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::invalid_option(format!(
                "{key} must be an integer from {min} to {max}, got {value}"
            ))),
        }
    }
}

impl Options {
    /// A number in `min..=max`, given as a JSON number or a string.
    pub fn number(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        let value = match self.values.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        let parsed = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match parsed {
            Some(x) if x.is_finite() && (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::invalid_option(format!(
                "{key} must be a number from {min} to {max}, got {value}"
            ))),
        }
    }

    /// `true`/`false` (also `1`/`0`, and a bare `?key` meaning true).
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "" | "true" | "1" | "yes" => Ok(Some(true)),
                "false" | "0" | "no" => Ok(Some(false)),
                _ => Err(ApiError::invalid_option(format!(
                    "{key} must be true or false, got {s:?}"
                ))),
            },
            Some(other) => Err(ApiError::invalid_option(format!(
                "{key} must be true or false, got {other}"
            ))),
        }
    }

    /// A list of names or numbers: a JSON array, or a comma-separated string.
    pub fn list(&self, key: &str) -> Result<Option<Vec<String>>, ApiError> {
        let item = |v: &Value| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(ApiError::invalid_option(format!(
                "{key} must list names or ids, got {other}"
            ))),
        };
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items.iter().map(item).collect::<Result<_, _>>().map(Some),
            Some(Value::String(s)) => Ok(Some(s.split(',').map(str::to_string).collect())),
            Some(other) => Ok(Some(vec![item(other)?])),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Read the whole body, refusing more than `limit` bytes (413) before
/// buffering it where the length is declared.
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large =
        || ApiError::payload_too_large(format!("the request body is larger than {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        drain(body).await;
        return Err(too_large());
    }
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if buffer.len() + data.len() > limit {
                drain(body).await;
                return Err(too_large());
            }
            buffer.extend_from_slice(data);
        }
    }
    Ok(buffer.freeze())
}

/// How much of a refused body is still read and dropped, and for how long:
/// a client that is still sending then gets the 413 rather than a
/// connection reset in the middle of its upload (a lingering close).
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

async fn drain(mut body: Body) {
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Split a body into images and options according to its Content-Type.
pub async fn parse_request(
    headers: &HeaderMap,
    body: Bytes,
    mut options: Options,
) -> Result<ImageRequest, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The boundary parameter is case-sensitive: only the type is lowered.
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let images = match mime.as_str() {
        "multipart/form-data" => parse_multipart(content_type, body, &mut options).await?,
        "application/json" => parse_json(&body, &mut options)?,
        m if m.starts_with("image/") || m == "application/octet-stream" || m.is_empty() => {
            if body.is_empty() {
                Vec::new()
            } else {
                vec![body]
            }
        }
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "unsupported Content-Type {other:?}: send an image (image/jpeg, image/png, ...), \
                 multipart/form-data with image parts, or application/json with base64 images"
            )))
        }
    };
    if images.is_empty() {
        return Err(ApiError::bad_request("the request holds no image"));
    }
    Ok(ImageRequest { images, options })
}

async fn parse_multipart(
    content_type: &str,
    body: Bytes,
    options: &mut Options,
) -> Result<Vec<Bytes>, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("bad multipart Content-Type: {e}")))?;
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut images = Vec::new();
    let bad = |e: multer::Error| ApiError::bad_request(format!("malformed multipart body: {e}"));
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let is_file = field.file_name().is_some()
            || field.content_type().is_some_and(|m| {
                m.type_() == "image" || m.essence_str() == "application/octet-stream"
            });
        let name = field.name().unwrap_or("").to_string();
        let data = field.bytes().await.map_err(bad)?;
        if is_file || matches!(name.as_str(), "image" | "images" | "file" | "files") {
            images.push(data);
        } else {
            let text = String::from_utf8(data.to_vec()).map_err(|_| {
                ApiError::invalid_option(format!("option {name:?} is not UTF-8 text"))
            })?;
            options.set(&name, Value::String(text));
        }
    }
    Ok(images)
}

fn parse_json(body: &[u8], options: &mut Options) -> Result<Vec<Bytes>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::bad_request(
            "the JSON body must be an object with \"images\"",
        ));
    };
    let mut images = Vec::new();
    for (key, value) in fields {
        match key.as_str() {
            "images" => {
                let Value::Array(items) = value else {
                    return Err(ApiError::bad_request(
                        "\"images\" must be an array of base64 strings",
                    ));
                };
                for (i, item) in items.iter().enumerate() {
                    images.push(
                        decode_base64(item)
                            .map_err(|m| ApiError::bad_request(format!("images[{i}]: {m}")))?,
                    );
                }
            }
            "image" => images.push(
                decode_base64(&value).map_err(|m| ApiError::bad_request(format!("image: {m}")))?,
            ),
            _ => options.set(&key, value),
        }
    }
    Ok(images)
}

/// Base64 (standard or URL-safe, padded or not), or a `data:` URL.
fn decode_base64(value: &Value) -> Result<Bytes, String> {
    let Value::String(s) = value else {
        return Err("expected a base64 string".into());
    };
    let data = match s.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, d)| d)
            .ok_or("malformed data: URL")?,
        None => s.as_str(),
    };
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        if let Ok(bytes) = engine.decode(&cleaned) {
            return Ok(Bytes::from(bytes));
        }
    }
    Err("not valid base64".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn raw_json_and_multipart_bodies() {
        let raw = parse_request(
            &headers("image/png"),
            Bytes::from_static(b"PNG"),
            Options::default(),
        )
        .await
        .unwrap();
        assert_eq!(raw.images, vec![Bytes::from_static(b"PNG")]);

        let json = br#"{"images": ["aGVsbG8=", "data:image/png;base64,d29ybGQ"], "top_k": 3}"#;
        let req = parse_request(
            &headers("application/json"),
            Bytes::from_static(json),
            Options::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            req.images,
            vec![Bytes::from_static(b"hello"), Bytes::from_static(b"world")]
        );
        assert_eq!(req.options.integer("top_k", 1, 10).unwrap(), Some(3));

        let body = "--XX\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.png\"\r\n\
                    Content-Type: image/png\r\n\r\nAAA\r\n--XX\r\nContent-Disposition: form-data; \
                    name=\"top_k\"\r\n\r\n2\r\n--XX\r\nContent-Disposition: form-data; name=\"b\"; \
                    filename=\"b.jpg\"\r\n\r\nBBB\r\n--XX--\r\n";
        let req = parse_request(
            &headers("multipart/form-data; boundary=XX"),
            Bytes::from(body),
            Options::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            req.images,
            vec![Bytes::from_static(b"AAA"), Bytes::from_static(b"BBB")]
        );
        assert_eq!(req.options.integer("top_k", 1, 10).unwrap(), Some(2));
    }

    #[tokio::test]
    async fn bad_bodies_get_the_right_status() {
        let status = |r: Result<ImageRequest, ApiError>| r.unwrap_err().status.as_u16();
        let h = headers("text/plain");
        assert_eq!(
            status(parse_request(&h, Bytes::from_static(b"x"), Options::default()).await),
            415
        );
        let h = headers("application/json");
        assert_eq!(
            status(parse_request(&h, Bytes::from_static(b"{"), Options::default()).await),
            400
        );
        let bad_b64 = Bytes::from_static(br#"{"images": ["@@@"]}"#);
        assert_eq!(
            status(parse_request(&h, bad_b64, Options::default()).await),
            400
        );
        let none = Bytes::from_static(br#"{"images": []}"#);
        assert_eq!(
            status(parse_request(&h, none, Options::default()).await),
            400
        );
        let h = headers("image/jpeg");
        assert_eq!(
            status(parse_request(&h, Bytes::new(), Options::default()).await),
            400
        );
    }

    #[test]
    fn options_are_validated() {
        let o = Options::from_query(Some("top_k=0&model=a%2Db")).unwrap();
        assert_eq!(o.string("model").unwrap().as_deref(), Some("a-b"));
        assert_eq!(o.integer("top_k", 1, 5).unwrap_err().status.as_u16(), 422);
        let o = Options::from_query(Some("topk=3")).unwrap();
        assert_eq!(o.check_known(&["top_k"]).unwrap_err().status.as_u16(), 422);
        assert_eq!(
            Options::from_query(Some("top_k=abc"))
                .unwrap()
                .integer("top_k", 1, 5)
                .unwrap_err()
                .status
                .as_u16(),
            422
        );
    }
}
