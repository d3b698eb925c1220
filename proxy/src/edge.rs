//! How the proxy faces users at the edge: the scheme a request arrived over, the redirect of
//! plain HTTP to HTTPS, HSTS, and the `X-Forwarded-*` headers an instance receives.
//!
//! The proxy is meant to be the first hop users reach. So by default it does not believe the
//! `X-Forwarded-For` a client sends (anyone can write one) and replaces it with the address it
//! saw; behind another balancer that sets the header, `trust_forwarded` appends to it instead.

use std::net::IpAddr;
use std::str::FromStr;

use http::uri::Authority;
use pingora_proxy::Session;

use crate::acme::Challenges;

/// Requests under this path are ACME HTTP-01 challenges: answered over plain HTTP before any
/// redirect (a CA may follow a redirect to HTTPS, but the host may have no valid certificate
/// yet: that is what is being ordered).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The edge behaviour (`proxy serve --redirect-https --hsts-max-age --trust-forwarded`).
#[derive(Debug, Clone, Default)]
pub struct EdgeOptions {
    /// Plain HTTP requests are redirected (308) to HTTPS on this port; `None`: served as they
    /// come.
    pub redirect_to_port: Option<u16>,
    /// The port users reach HTTPS on (`--https-port`, else `--tls-listen`'s): where a
    /// service's own `redirect_https` sends plain requests; `None`: no HTTPS to send them to.
    pub https_port: Option<u16>,
    /// `Strict-Transport-Security: max-age=N` on answers over HTTPS (`None`: not sent, the
    /// default, since a browser then refuses plain HTTP to the host for N seconds).
    pub hsts_max_age: Option<u64>,
    /// Append to the client's `X-Forwarded-For` rather than replace it, and believe its
    /// `X-Forwarded-Proto: https` (the cookie is then `Secure`, no redirect, HSTS sent).
    pub trust_forwarded: bool,
    /// Pending ACME challenges answered on the plain listener (set with a certificate
    /// directory).
    pub challenges: Option<Challenges>,
}

/// Whether the request came over TLS (its connection has a TLS digest).
pub fn is_tls(session: &Session) -> bool {
    session
        .as_ref()
        .digest()
        .is_some_and(|d| d.ssl_digest.is_some())
}

/// The client's IP address, if the connection is over IP (an IPv4 client on a dual-stack
/// socket as IPv4, not `::ffff:a.b.c.d`).
pub fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .as_ref()
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

/// Whether the request says it came over HTTPS to a balancer in front (`X-Forwarded-Proto:
/// https`): believed only with `trust_forwarded`, where that balancer terminated TLS.
pub fn forwarded_https(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// Why a plain request cannot be redirected.
#[derive(Debug, PartialEq, Eq)]
pub enum RedirectError {
    /// No `Host` header, or one that is not a host name (with an optional port).
    BadHost,
}

/// The `Location` of the HTTPS redirect of a request for `path_and_query` on `host` (the
/// `Host` header: the port it names is replaced by `port`, left out when it is 443).
pub fn redirect_location(
    host: Option<&str>,
    path_and_query: &str,
    port: u16,
) -> Result<String, RedirectError> {
    let host = host.ok_or(RedirectError::BadHost)?;
    let authority = Authority::from_str(host).map_err(|_| RedirectError::BadHost)?;
    // An authority may carry user information (`user@host`): a Host header must not.
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(RedirectError::BadHost);
    }
    let path = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        "/"
    };
    Ok(if port == 443 {
        format!("https://{}{path}", authority.host())
    } else {
        format!("https://{}:{port}{path}", authority.host())
    })
}

/// The `X-Forwarded-For` an instance receives: the client's address, after what the client sent
/// when that is trusted.
pub fn forwarded_for(sent: Option<&str>, client: Option<IpAddr>, trust: bool) -> Option<String> {
    let client = client.map(|ip| ip.to_string());
    match (trust, sent.map(str::trim).filter(|s| !s.is_empty()), client) {
        (true, Some(sent), Some(ip)) => Some(format!("{sent}, {ip}")),
        (true, Some(sent), None) => Some(sent.to_string()),
        (_, _, ip) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_keep_the_host_and_path_and_name_the_https_port() {
        let cases = [
            (
                Some("app.example.com"),
                "/a?b=1",
                443,
                "https://app.example.com/a?b=1",
            ),
            (
                Some("app.example.com:8080"),
                "/",
                8443,
                "https://app.example.com:8443/",
            ),
            (Some("[::1]:80"), "/x", 443, "https://[::1]/x"),
            (Some("127.0.0.1"), "*", 443, "https://127.0.0.1/"),
        ];
        for (host, path, port, expected) in cases {
            assert_eq!(redirect_location(host, path, port).as_deref(), Ok(expected));
        }
        for bad in [
            None,
            Some(""),
            Some("a b"),
            Some("user@evil.example"),
            Some("x:y:z"),
        ] {
            assert_eq!(
                redirect_location(bad, "/", 443),
                Err(RedirectError::BadHost),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_client_supplied_forwarded_for_is_replaced_unless_trusted() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(
            forwarded_for(Some("6.6.6.6"), Some(ip), false).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            forwarded_for(Some("198.51.100.1"), Some(ip), true).as_deref(),
            Some("198.51.100.1, 203.0.113.7")
        );
        assert_eq!(
            forwarded_for(None, Some(ip), true).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(forwarded_for(Some("6.6.6.6"), None, false), None);
    }
}
