//! A test certificate authority issuing certificate pairs into a proxy's certificate
//! directory, as an operator (or an ACME client) would write them.

use std::path::Path;

/// A test certificate authority.
pub struct Pki {
    pub ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "haddock test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    pub fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap()
    }

    /// Writes `NAME.crt`/`NAME.key` for `hosts`, valid from `from` to `until` seconds from now;
    /// returns the certificate's DER (to recognise it in a handshake).
    pub fn issue(&self, dir: &Path, name: &str, hosts: &[&str], from: i64, until: i64) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        // Key first, then the certificate, each renamed into place: the reader never sees half.
        for (ext, body) in [("key", key.serialize_pem()), ("crt", cert.pem())] {
            let tmp = dir.join(format!(".{name}.{ext}.tmp"));
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
        }
        cert.der().to_vec()
    }
}
