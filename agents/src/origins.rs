//! Which web pages may reach agents: the `Origin` a browser puts on a request checked against
//! the runtime's allowed origins, and the CORS answers a browser app on another origin needs.
//!
//! A browser sends `Origin` with every WebSocket handshake and every cross-site `POST`; a
//! request without it is not a browser's cross-site request (`curl`, a service, the typed
//! client) and passes. A request from the page's own origin (its host and port are the
//! request's `Host`) passes. Another origin passes only if it is allowed
//! ([`Builder::allowed_origins`](crate::Builder::allowed_origins)), and then gets the CORS
//! headers (with credentials) and its preflights answered; any other is refused with 403 before
//! an admission hook runs, so a page on another site cannot use the cookies of a user logged in
//! here.

use std::future::Future;

use axum::{
    extract::Request,
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};

/// The origins allowed besides a page's own.
#[derive(Debug, Clone, Default)]
pub(crate) enum Origins {
    /// Only same-origin pages (and requests without `Origin`).
    #[default]
    Same,
    /// These too (`scheme://host[:port]`, lowercase).
    Listed(Vec<String>),
    /// Any origin (`"*"`).
    Any,
}

impl Origins {
    /// The setting made of `origins`: `"*"` allows any; every other entry must be an origin,
    /// `scheme://host` with an optional port and nothing after it.
    pub(crate) fn new(origins: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut listed = Vec::new();
        for origin in origins {
            if origin == "*" {
                return Ok(Origins::Any);
            }
            listed.push(parse(&origin)?);
        }
        Ok(Origins::Listed(listed))
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Same => false,
            Origins::Listed(listed) => listed.iter().any(|o| o.eq_ignore_ascii_case(origin)),
            Origins::Any => true,
        }
    }
}

/// An origin as the list keeps it, or why it is not one.
fn parse(origin: &str) -> Result<String, String> {
    let invalid = |why: &str| {
        format!(
            "the allowed origin `{origin}` {why}: write it as a browser sends it, like \
             `https://app.example.com` or `http://localhost:5173`"
        )
    };
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or_else(|| invalid("has no scheme"))?;
    if !matches!(scheme, "http" | "https") {
        return Err(invalid("is not http or https"));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(invalid("is not just a host and a port"));
    }
    Ok(origin.to_ascii_lowercase())
}

/// What a request's origin comes to.
enum Verdict {
    /// No `Origin`, or the request's own: served as it is.
    Pass,
    /// An allowed other origin: served, with CORS headers for it.
    Cors(HeaderValue),
    /// Answered here: a preflight, or a refusal.
    Answer(Response),
}

fn verdict(origins: &Origins, method: &Method, headers: &HeaderMap) -> Verdict {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Verdict::Pass;
    };
    let text = origin.to_str().unwrap_or("");
    if same_origin(text, headers) {
        return Verdict::Pass;
    }
    if !origins.allows(text) {
        let refusal = format!(
            "requests from the origin `{text}` are not allowed here (the server allows its own \
             origin and those set with `Builder::allowed_origins`)"
        );
        return Verdict::Answer((StatusCode::FORBIDDEN, refusal).into_response());
    }
    if method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return Verdict::Answer(preflight(origin.clone(), headers));
    }
    Verdict::Cors(origin.clone())
}

/// Whether `origin` is the request's own: its host and port are the request's `Host`.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(authority) = origin.split_once("://").map(|(_, rest)| rest) else {
        return false; // `null` (a sandboxed or file page) is no one's own
    };
    headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .is_some_and(|host| host.eq_ignore_ascii_case(authority))
}

/// The answer to a preflight from the allowed `origin`: any method, the headers it asks for.
fn preflight(origin: HeaderValue, request: &HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    allow(headers, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
    );
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

fn allow(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Serves `request` with `next` if its origin may send it (with CORS headers for an allowed
/// other origin), or answers it here: a preflight, or 403.
pub(crate) async fn guard<F>(
    origins: &Origins,
    request: Request,
    next: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    match verdict(origins, request.method(), request.headers()) {
        Verdict::Pass => next(request).await,
        Verdict::Cors(origin) => {
            let mut response = next(request).await;
            allow(response.headers_mut(), origin);
            response
        }
        Verdict::Answer(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    fn status(origins: &Origins, method: Method, h: &HeaderMap) -> Option<StatusCode> {
        match verdict(origins, &method, h) {
            Verdict::Pass | Verdict::Cors(_) => None,
            Verdict::Answer(r) => Some(r.status()),
        }
    }

    #[test]
    fn no_origin_and_the_same_origin_pass_another_is_refused_unless_allowed() {
        let same = Origins::default();
        let none = headers(&[(header::HOST, "app.example:8080")]);
        assert!(matches!(
            verdict(&same, &Method::POST, &none),
            Verdict::Pass
        ));
        let own = headers(&[
            (header::HOST, "App.Example:8080"),
            (header::ORIGIN, "https://app.example:8080"),
        ]);
        assert!(matches!(verdict(&same, &Method::POST, &own), Verdict::Pass));
        for other in ["https://evil.example", "https://app.example:9090", "null"] {
            let h = headers(&[(header::HOST, "app.example:8080"), (header::ORIGIN, other)]);
            assert_eq!(
                status(&same, Method::POST, &h),
                Some(StatusCode::FORBIDDEN),
                "{other}"
            );
        }
        let listed = Origins::new(["https://Web.example".to_owned()]).unwrap();
        let web = headers(&[
            (header::HOST, "api.example"),
            (header::ORIGIN, "https://web.example"),
        ]);
        assert!(matches!(
            verdict(&listed, &Method::POST, &web),
            Verdict::Cors(_)
        ));
        let mut asking = web.clone();
        asking.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        assert_eq!(
            status(&listed, Method::OPTIONS, &asking),
            Some(StatusCode::NO_CONTENT)
        );
        let any = Origins::new(["*".to_owned()]).unwrap();
        assert!(matches!(
            verdict(&any, &Method::GET, &web),
            Verdict::Cors(_)
        ));
    }

    #[test]
    fn an_allowed_origin_must_be_an_origin() {
        for bad in [
            "web.example",
            "ftp://web.example",
            "https://web.example/",
            "https://",
        ] {
            let e = Origins::new([bad.to_owned()]).unwrap_err();
            assert!(
                e.contains(bad) && e.contains("https://app.example.com"),
                "{e}"
            );
        }
        assert!(Origins::new(["http://localhost:5173".to_owned()]).is_ok());
    }
}
