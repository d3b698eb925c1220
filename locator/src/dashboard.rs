//! The operator dashboard: one static page, shipped inside the binary, served at `/`.
//!
//! The files are plain HTML/CSS/JS (no build step, no Node toolchain, no external assets:
//! the page must work on a machine that reaches nothing but the locator). They are served
//! without auth because they hold no data: the page fetches `/v1/snapshot`, follows
//! `/v1/watch` and calls `/v1/releases/{id}/control` with a token the operator pastes, so the
//! API's roles apply exactly as they do to any other client. See docs/dashboard.md.

const INDEX: &str = include_str!("dashboard/index.html");
const APP: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Headers sent with every dashboard file. The policy allows nothing but the locator itself,
/// so a token pasted into the page can only ever be sent back to the locator that served it.
pub const HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    // Small files that change with the binary: revalidating is cheaper than a stale page.
    ("cache-control", "no-cache"),
];

/// The dashboard file at `path` (`/`, `/dashboard`, `/dashboard/…`): its content type and bytes.
/// `None` for every other path, which then goes to the API router.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" | "/dashboard" | "/dashboard/" | "/dashboard/index.html" => {
            Some((HTML, INDEX.as_bytes()))
        }
        "/dashboard/app.js" => Some((JS, APP.as_bytes())),
        "/dashboard/style.css" => Some((CSS, STYLE.as_bytes())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_page_and_its_files_only() {
        assert_eq!(asset("/").map(|a| a.0), Some(HTML));
        assert_eq!(asset("/dashboard/").map(|a| a.0), Some(HTML));
        assert_eq!(asset("/dashboard/app.js").map(|a| a.0), Some(JS));
        assert_eq!(asset("/dashboard/style.css").map(|a| a.0), Some(CSS));
        assert!(asset("/dashboard/../Cargo.toml").is_none());
        assert!(asset("/v1/snapshot").is_none());
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // The page references its own files by absolute path (it is also served at `/`) and
        // nothing external: there is no network but the locator where it runs.
        assert!(INDEX.contains("/dashboard/app.js") && INDEX.contains("/dashboard/style.css"));
        for text in [INDEX, APP, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }
}
