//! `/console`: the operator's page. Three files compiled into the binary (`console/`: one
//! HTML page, one stylesheet, one ES module; no build step, no CDN), served without
//! credentials because they hold no data: everything the page shows comes from the
//! `/admin/*` routes, which want an admin key like any other caller. Every answer carries
//! a strict Content-Security-Policy (only this origin's script, style and connections, no
//! inline script, not frameable), `nosniff` and `no-referrer`; an `ETag` lets a browser
//! keep its copy until the binary changes.

use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use http::header::{
    HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, StatusCode};

use super::http::{empty, full, ApiError, Source, SOURCE};
use super::{App, Response};

/// The policy of every console answer.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The console's files: name under `/console/`, content type, content.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("console/console.css"),
    ),
];

/// `GET /console` and `GET /console/{asset}`; `asset` is empty for the page itself.
pub fn asset(app: &App, asset: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    if !app.config.console.enabled {
        return Err(ApiError::not_found(
            "the console is turned off ([console] enabled = false)",
        ));
    }
    let index = ASSETS
        .iter()
        .position(|(name, _, _)| *name == asset)
        .ok_or_else(|| ApiError::not_found(format!("no console file {asset:?}")))?;
    let (_, content_type, content) = ASSETS[index];
    let etag = &etags()[index];
    let unchanged = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if unchanged {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(full(content));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    let map = response.headers_mut();
    map.insert(
        ETAG,
        HeaderValue::from_str(etag).expect("hex is a header value"),
    );
    map.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(map);
    map.insert(SOURCE, Source::Relay.header());
    Ok(response)
}

/// The headers that make a console answer safe to expose.
pub fn secure(map: &mut HeaderMap) {
    map.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    map.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    map.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    map.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    map.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

/// One strong `ETag` per file: a hash of the relay's version and the file.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|(name, _, content)| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                (env!("CARGO_PKG_VERSION"), name, content).hash(&mut hasher);
                format!("\"{:016x}\"", hasher.finish())
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files_and_no_inline_script() {
        let page = ASSETS[0].2;
        assert!(page.contains(r#"<script type="module" src="/console/console.js">"#));
        assert!(page.contains(r#"href="/console/console.css""#));
        // No inline script or style, which the policy would refuse anyway.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(!page.contains("<style") && !page.contains(" style="));
        assert!(!page.contains("http://") && !page.contains("https://"));
        for (_, _, content) in ASSETS {
            assert!(
                !content.contains("localStorage"),
                "the key stays in sessionStorage"
            );
        }
    }
}
