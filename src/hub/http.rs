//! The HTTP side of Hub downloads: plain `ureq` GETs with loratune's own redirect handling.
//!
//! ureq follows no redirect itself (`max_redirects(0)`); [`Client::get`] does, so that the rule for the token is
//! in one place: `Authorization: Bearer <token>` goes only to the configured endpoint's origin (scheme, host and
//! port), and only while every hop so far stayed there. A redirect to another host (the Hub sends file contents
//! to a CDN this way) is followed without it, as huggingface_hub does; a redirect without a usable `Location`,
//! or more than [`MAX_REDIRECTS`] of them, is an error. Every message that can carry a URL or a server's words
//! goes through [`redact`] before the user sees it (see `fetch_model`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ureq::http::{HeaderMap, Response, Uri};
use ureq::Body;

/// Redirects followed per request (a Hub needs at most two: a renamed repo, then the CDN).
pub const MAX_REDIRECTS: usize = 10;

/// The most a JSON answer (repo info) may weigh.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// `text` with credentials masked: the userinfo of every URL in it (`https://user:pw@host` →
/// `https://***@host`) and every occurrence of `token` (tokens shorter than 4 characters are left alone, masking
/// them would garble the text). Used on every message that names an endpoint or URL, or quotes a server.
pub fn redact(text: &str, token: Option<&str>) -> String {
    let mut text = text.to_string();
    if let Some(t) = token.map(str::trim).filter(|t| t.len() >= 4) {
        text = text.replace(t, "***");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URL runs to the first blank or quoting character; its userinfo ends at the last `@` before any
        // query or fragment. (An `@` later in the path masks a little too much, never too little.)
        let end = tail
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '<' | '>' | '?' | '#')
            })
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// At most `max` characters of `s`, control characters replaced (for quoting server-chosen text).
pub(crate) fn shorten(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// Percent-encode `s` for a URL path (RFC 3986 unreserved characters kept; `/` kept when `keep_slash`).
pub(crate) fn encode_path(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What went wrong with a request, before it is phrased for the user (`Ctx::describe` in `mod.rs`).
#[derive(Debug)]
pub(crate) enum FetchError {
    /// No HTTP answer: DNS, connection, TLS, timeout, reset.
    Network(String),
    /// The final answer has an error status (`server_message`: its `X-Error-Message`, shortened;
    /// `elsewhere`: the host that gave it, when a redirect led away from the endpoint).
    Status {
        code: u16,
        server_message: Option<String>,
        elsewhere: Option<String>,
    },
    /// A redirect without a usable `Location`, or too many redirects.
    Redirect(String),
    /// An answer that is not what a Hub sends (bad JSON, missing or invalid header, too many bytes, ...).
    Malformed(String),
    /// The body ended before the announced size (`cause`: the read error, if the connection broke).
    Truncated {
        got: u64,
        want: u64,
        cause: Option<String>,
    },
    /// A local file operation failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Network(m) | FetchError::Redirect(m) | FetchError::Malformed(m) => {
                f.write_str(m)
            }
            FetchError::Status {
                code,
                server_message,
                elsewhere,
            } => {
                match elsewhere {
                    Some(host) => write!(
                        f,
                        "{host} (where the Hub redirected the request) answered HTTP {code}"
                    )?,
                    None => write!(f, "the Hub answered HTTP {code}")?,
                }
                match server_message {
                    Some(m) => write!(f, " ({m})"),
                    None => Ok(()),
                }
            }
            FetchError::Truncated { got, want, cause } => {
                write!(f, "received {got} of {want} bytes")?;
                if let Some(c) = cause {
                    write!(f, " ({c})")?;
                }
                f.write_str("; run again to resume the download")
            }
            FetchError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl FetchError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FetchError::Io {
            path: path.into(),
            source,
        }
    }
}

/// A ureq failure as a [`FetchError`]: connection-level failures are [`FetchError::Network`] (the caller may
/// fall back to the cache), anything else is a malformed exchange.
pub(crate) fn transport_error(e: ureq::Error, url: &str) -> FetchError {
    match e {
        ureq::Error::Io(io) => FetchError::Network(io.to_string()),
        ureq::Error::HostNotFound => FetchError::Network("host not found".into()),
        ureq::Error::ConnectionFailed => FetchError::Network("connection failed".into()),
        ureq::Error::Timeout(t) => FetchError::Network(format!("timeout: {t}")),
        ureq::Error::Tls(m) => FetchError::Network(format!("TLS: {m}")),
        ureq::Error::Rustls(r) => FetchError::Network(format!("TLS: {r}")),
        ureq::Error::ConnectProxyFailed(m) => FetchError::Network(format!("proxy: {m}")),
        ureq::Error::BodyStalled => FetchError::Network("the connection stalled".into()),
        ureq::Error::BodyExceedsLimit(n) => {
            FetchError::Malformed(format!("{url} answered more than {n} bytes"))
        }
        other => FetchError::Malformed(format!("{url}: {other}")),
    }
}

/// Scheme, host and port: what must match the endpoint for the token to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// The origin of an absolute `http`/`https` URL.
    pub(crate) fn of(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        if host.is_empty() {
            return None;
        }
        Some(Origin {
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
            host,
        })
    }
}

/// The scheme of `s` if it starts with one (`scheme:`).
fn scheme_of(s: &str) -> Option<&str> {
    let scheme = &s[..s.find(':')?];
    let mut chars = scheme.chars();
    (chars.next()?.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// The absolute URL a `Location` header points to, seen from `base`: absolute, scheme-relative (`//host/…`),
/// absolute-path (`/…`) or relative (`x`, resolved against `base`'s folder). Only `http`/`https` targets.
/// The error completes "… answered HTTP 302 with …".
pub(crate) fn resolve_location(base: &Uri, location: &str) -> Result<String, String> {
    let loc = location.trim();
    if loc.is_empty() {
        return Err("an empty Location header".into());
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let absolute = if let Some(s) = scheme_of(loc) {
        if !matches!(s.to_ascii_lowercase().as_str(), "http" | "https") {
            return Err(format!(
                "a Location with an unsupported scheme (`{}:`)",
                shorten(s, 20)
            ));
        }
        loc.to_string()
    } else if let Some(rest) = loc.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if loc.starts_with('/') {
        format!("{scheme}://{authority}{loc}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{authority}{dir}{loc}")
    };
    let invalid = || format!("an invalid Location `{}`", shorten(loc, 200));
    let uri: Uri = absolute.parse().map_err(|_| invalid())?;
    Origin::of(&uri).ok_or_else(invalid)?;
    Ok(absolute)
}

/// A header as text, if present and visible ASCII.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// The final answer to a [`Client::get`].
pub(crate) struct Answer {
    pub response: Response<Body>,
    /// The URL that gave it (after redirects).
    pub url: String,
    /// Whether every hop, this answer included, was on the endpoint's origin.
    pub from_endpoint: bool,
    /// The headers of the last answer from the endpoint's origin: where the Hub puts `X-Repo-Commit`,
    /// `X-Linked-Etag` and `X-Linked-Size` before sending the content to a CDN.
    pub hub_headers: HeaderMap,
}

impl Answer {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.response.status().as_u16()
    }

    /// `self` if its status is 2xx, else [`FetchError::Status`].
    pub fn success(self) -> Result<Self, FetchError> {
        let code = self.status();
        if (200..300).contains(&code) {
            return Ok(self);
        }
        let elsewhere = (!self.from_endpoint).then(|| {
            self.url
                .parse::<Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_string))
                .unwrap_or_default()
        });
        Err(FetchError::Status {
            code,
            server_message: header(self.response.headers(), "x-error-message")
                .filter(|m| !m.is_empty())
                .map(|m| shorten(m, 300)),
            elsewhere,
        })
    }

    /// The body as text (at most 64 MiB).
    pub fn text(self) -> Result<String, FetchError> {
        let url = self.url;
        self.response
            .into_body()
            .into_with_config()
            .limit(MAX_JSON_BYTES)
            .read_to_string()
            .map_err(|e| transport_error(e, &url))
    }
}

/// A Hub client: one endpoint, one optional token.
pub(crate) struct Client {
    agent: ureq::Agent,
    origin: Origin,
    token: Option<String>,
}

impl Client {
    /// A client for `endpoint` (an `http(s)://host[:port][/prefix]` URL). The error is a sentence (unredacted).
    pub fn new(endpoint: &str, token: Option<&str>) -> Result<Client, String> {
        let origin = endpoint
            .parse::<Uri>()
            .ok()
            .and_then(|u| Origin::of(&u))
            .ok_or_else(|| {
                format!("HF_ENDPOINT `{endpoint}` is not an http:// or https:// URL with a host")
            })?;
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("loratune/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build();
        Ok(Client {
            agent: config.into(),
            origin,
            token: token.map(str::to_string).filter(|t| !t.is_empty()),
        })
    }

    /// GET `url` (on the endpoint) with `headers`, following redirects: the token only while on the endpoint's
    /// origin, at most [`MAX_REDIRECTS`], each `Location` checked. Error statuses are returned as answers.
    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Answer, FetchError> {
        let mut url = url.to_string();
        let mut on_endpoint = true;
        let mut hub_headers = HeaderMap::new();
        let mut redirects = 0;
        loop {
            let uri: Uri = url.parse().map_err(|_| {
                FetchError::Malformed(format!("invalid URL `{}`", shorten(&url, 200)))
            })?;
            on_endpoint &= Origin::of(&uri).as_ref() == Some(&self.origin);
            let mut request = self.agent.get(url.as_str());
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            if on_endpoint {
                if let Some(t) = &self.token {
                    request = request.header("Authorization", format!("Bearer {t}"));
                }
            }
            let response = request.call().map_err(|e| transport_error(e, &url))?;
            if on_endpoint {
                hub_headers = response.headers().clone();
            }
            let status = response.status().as_u16();
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok(Answer {
                    response,
                    url,
                    from_endpoint: on_endpoint,
                    hub_headers,
                });
            }
            let location = match response.headers().get("location") {
                None => {
                    return Err(FetchError::Redirect(format!(
                        "{url} answered HTTP {status} (a redirect) without a Location header"
                    )))
                }
                Some(l) => l.to_str().map_err(|_| {
                    FetchError::Redirect(format!(
                        "{url} answered HTTP {status} with a Location header that is not plain text"
                    ))
                })?,
            };
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(FetchError::Redirect(format!(
                    "more than {MAX_REDIRECTS} redirects (the last from {url})"
                )));
            }
            url = resolve_location(&uri, location).map_err(|m| {
                FetchError::Redirect(format!("{url} answered HTTP {status} with {m}"))
            })?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_masks_userinfo_and_token() {
        let t = Some("hf_abcdef");
        assert_eq!(
            redact(
                "cannot reach https://user:pw@hub.example:8443/x (refused)",
                t
            ),
            "cannot reach https://***@hub.example:8443/x (refused)"
        );
        assert_eq!(
            redact("on http://tok@h and `http://a:b@k/`", None),
            "on http://***@h and `http://***@k/`"
        );
        assert_eq!(redact("http://h/p?q=a@b", None), "http://h/p?q=a@b");
        assert_eq!(
            redact("no url, user@example.com", None),
            "no url, user@example.com"
        );
        assert_eq!(
            redact("Bearer hf_abcdef twice hf_abcdef", t),
            "Bearer *** twice ***"
        );
        assert_eq!(redact("http://127.0.0.1:9", t), "http://127.0.0.1:9");
        // Idempotent, and short tokens are not masked.
        assert_eq!(redact("https://***@h", t), "https://***@h");
        assert_eq!(redact("a b c", Some("a")), "a b c");
    }

    #[test]
    fn locations_resolve_against_the_current_url() {
        let base: Uri = "https://u:p@hub.example/org/m/resolve/abc/config.json"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l);
        assert_eq!(
            r("https://cdn.example/x?sig=1").unwrap(),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(r("//cdn.example/x").unwrap(), "https://cdn.example/x");
        assert_eq!(r("/api/x").unwrap(), "https://u:p@hub.example/api/x");
        assert_eq!(
            r("other.json").unwrap(),
            "https://u:p@hub.example/org/m/resolve/abc/other.json"
        );
        assert!(r("").unwrap_err().contains("empty"));
        assert!(r("ftp://cdn.example/x")
            .unwrap_err()
            .contains("unsupported scheme"));
        assert!(r("file:///etc/passwd")
            .unwrap_err()
            .contains("unsupported scheme"));
        assert!(r("http://[::1").unwrap_err().contains("invalid Location"));
        assert!(r("http:///nohost")
            .unwrap_err()
            .contains("invalid Location"));
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let o = |s: &str| Origin::of(&s.parse::<Uri>().unwrap());
        assert_eq!(o("https://HF.co/a"), o("https://hf.co:443/b"));
        assert_eq!(o("http://u:p@127.0.0.1:80/"), o("http://127.0.0.1/"));
        assert_ne!(o("https://hf.co/"), o("http://hf.co/"));
        assert_ne!(o("http://127.0.0.1:1/"), o("http://127.0.0.1:2/"));
        assert_ne!(o("https://hf.co/"), o("https://cdn.hf.co/"));
        assert_eq!(o("ftp://hf.co/"), None);
        assert_eq!(o("/relative"), None);
    }

    #[test]
    fn paths_are_percent_encoded() {
        assert_eq!(encode_path("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(
            encode_path("sub dir/a+b.json", true),
            "sub%20dir/a%2Bb.json"
        );
        assert_eq!(
            encode_path("model-00001.safetensors", true),
            "model-00001.safetensors"
        );
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        assert!(Client::new("https://huggingface.co", None).is_ok());
        assert!(Client::new("http://user:pw@127.0.0.1:8080/mirror", Some("t")).is_ok());
        for bad in ["huggingface.co", "ftp://x", "http://", ""] {
            let e = Client::new(bad, None).err().unwrap();
            assert!(e.contains("HF_ENDPOINT"), "{e}");
        }
    }
}
