//! SPIFFE IDs and certificates (`identity`): a SPIFFE ID that parses prints back as sent; a
//! certificate (DER, or a PEM bundle as a CA answers) is read or refused with a typed error,
//! and the identity `/certs` shows is the one connections are authorized with.
use nodeway_proxy::identity::{cert_info, identity_of, istio_ca::pem_certs, Identity};
use rustls::pki_types::CertificateDer;

use crate::Target;

pub const TARGET: Target = Target {
    name: "identity",
    about: "SPIFFE ID parsing (round trip) and certificate (DER, PEM) reading",
    run,
    dict: &[
        b"spiffe://",
        b"/ns/",
        b"/sa/",
        b"cluster.local",
        b"-----BEGIN CERTIFICATE-----\n",
        b"\n-----END CERTIFICATE-----\n",
        b"\x06\x03\x55\x1d\x11",
        b"\x86",
        b"\x30\x82",
        b"\x17\x0d",
        b"\x18\x0f",
    ],
    max_len: 4096,
};

/// The first byte picks what the rest is.
fn run(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => spiffe_id(&super::text(rest)),
        1 => certificate(rest),
        _ => {
            let what = "fuzz";
            if let Ok(certs) = pem_certs(&super::text(rest), &what) {
                certs.iter().for_each(|c| certificate(c.as_ref()));
            }
        }
    }
}

fn spiffe_id(s: &str) {
    let Ok(id) = s.parse::<Identity>() else {
        return;
    };
    assert_eq!(id.to_string(), s, "a SPIFFE ID prints back as it was parsed");
    for part in [&id.trust_domain, &id.namespace, &id.service_account] {
        assert!(
            !part.is_empty() && !part.contains('/'),
            "{s:?}: part {part:?} is empty or holds a /"
        );
    }
}

fn certificate(der: &[u8]) {
    let cert = CertificateDer::from(der.to_vec());
    let Ok(info) = cert_info(&cert) else {
        assert!(
            identity_of(&cert).is_err(),
            "identity_of accepts what cert_info refuses"
        );
        return;
    };
    assert!(info.identity.starts_with("spiffe://"));
    match identity_of(&cert) {
        Ok(id) => assert_eq!(id.to_string(), info.identity, "the identity shown is not the one used"),
        Err(_) => assert!(info.identity.parse::<Identity>().is_err()),
    }
}
